"""Imports a checkpoint of the PyTorch reference (UAD-IMAG) as a uad_jax checkpoint.

  python -m uad_jax.tools.import_torch --method andi --src checkpoint_6 --out runs/andi_ref \
      [--config configs/andi.py] [--step 15000]
  python -m uad_jax.eval --config configs/andi.py --ckpt runs/andi_ref --calibrate

`--src` is an accelerate `save_state` folder: model weights in `model.safetensors` (read
without PyTorch) or `pytorch_model.bin`, and the EMA shadow weights (what the reference scores
with) in `custom_checkpoint_0.pkl` (both need `torch`). Without torch, `--ema-from-model` uses
the raw model weights as the EMA weights (not what the reference scores; flagged in the
checkpoint's warnings). The optimiser state is not imported (a fresh AdamW state is stored), so
training can continue from the weights but not bit-exactly as the reference would.
"""

import argparse
import re
import sys
from pathlib import Path

import jax
import numpy as np

from uad_jax.convert import ddpmpp as ddpmpp_convert
from uad_jax.convert.weight_files import read_state_dict, to_numpy, torch_load
from uad_jax.engine.checkpoints import CheckpointStore
from uad_jax.engine.config import REPO_ROOT, load_config
from uad_jax.engine.trainer import image_shape, write_run_config
from uad_jax.errors import DataError, UadError
from uad_jax.methods import andi, get_method

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
EMA_FILE = "custom_checkpoint_0.pkl"


def _network_of(method: str, config):
  """(flax module, torch state_dict -> flax params) of a method's network."""
  if method == "andi":
    model = andi.build_model(config)
    return model, lambda sd, source: ddpmpp_convert.torch_to_flax(sd, model, source)
  raise DataError(f"--method {method}: no reference checkpoint import for this method")


def read_reference_checkpoint(src: Path, model, ema_from_model: bool):
  """(model state_dict, EMA state_dict, warnings) of an accelerate checkpoint folder."""
  model_file = next((src / f for f in MODEL_FILES if (src / f).is_file()), None)
  if model_file is None:
    raise DataError(f"{src}: no model weights ({' or '.join(MODEL_FILES)})")
  weights, _ = read_state_dict(model_file)
  warnings = []
  if ema_from_model:
    warnings.append(f"EMA weights replaced by the raw model weights of {model_file.name} "
                    "(--ema-from-model); the reference scores with the EMA weights")
    return weights, weights, warnings
  if not (src / EMA_FILE).is_file():
    raise DataError(f"{src}: no EMA file {EMA_FILE}; pass --ema-from-model to score with the "
                    "raw weights instead")
  ema = torch_load(src / EMA_FILE)
  if not isinstance(ema, dict) or "shadow_params" not in ema:
    raise DataError(f"{src / EMA_FILE}: expected the EMA state {{decay, num_updates, "
                    "shadow_params}}")
  shadow = [to_numpy(p) for p in ema["shadow_params"]]
  ema_sd = ddpmpp_convert.shadow_params_to_state_dict(shadow, model, str(src / EMA_FILE))
  return weights, ema_sd, warnings


def reference_step(src: Path, weights: dict, snapshot_freq: int, step: int | None) -> int:
  """The training step of the checkpoint: --step, else the `step` buffer, else k·snapshot_freq
  from a folder named checkpoint_<k>."""
  if step is not None:
    return step
  buffer = weights.get("step", weights.get("module.step"))
  if buffer is not None and int(np.asarray(buffer).ravel()[0]) > 0:
    return int(np.asarray(buffer).ravel()[0])
  match = re.fullmatch(r"checkpoint_(\d+)", src.name)
  if match:
    return int(match.group(1)) * snapshot_freq
  raise DataError(f"{src}: cannot tell the training step (no `step` buffer, folder not named "
                  "checkpoint_<k>); pass --step")


def import_checkpoint(method: str, src, out, config, step: int | None = None,
                      ema_from_model: bool = False) -> Path:
  """Converts `src` and writes `<out>/checkpoints/<step>`; returns that folder."""
  src, out = Path(src), Path(out).resolve()
  if not src.is_dir():
    raise DataError(f"{src}: not a checkpoint folder")
  model, convert = _network_of(method, config)
  weights, ema, warnings = read_reference_checkpoint(src, model, ema_from_model)
  step = reference_step(src, weights, config.training.snapshot_freq, step)
  state = get_method(method).init_state(config, jax.random.key(0), image_shape(config))
  state = state.replace(step=np.int32(step), params=convert(weights, str(src)),
                        ema_params=convert(ema, str(src / EMA_FILE)))
  out.mkdir(parents=True, exist_ok=True)
  write_run_config(out, config)
  store = CheckpointStore(out / "checkpoints")
  store.save(step, state, {}, {"step": step, "method": method, "imported_from": str(src),
                               "warnings": warnings})
  store.close()
  return store.step_dir(step)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m uad_jax.tools.import_torch",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--method", required=True, choices=["andi"])
  parser.add_argument("--src", required=True, type=Path, help="reference checkpoint folder")
  parser.add_argument("--out", required=True, type=Path, help="uad_jax workdir to write")
  parser.add_argument("--config", default=None,
                      help="config[:preset] of the reference model (default configs/<method>.py)")
  parser.add_argument("--step", type=int, default=None, help="training step of the checkpoint")
  parser.add_argument("--ema-from-model", action="store_true",
                      help="use the raw weights as EMA weights (when torch is unavailable)")
  args = parser.parse_args(argv)
  try:
    config = load_config(args.config or str(REPO_ROOT / "configs" / f"{args.method}.py"))
    path = import_checkpoint(args.method, args.src, args.out, config, args.step,
                             args.ema_from_model)
  except UadError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  config_arg = args.config or f"configs/{args.method}.py"
  print(f"next: python -m uad_jax.eval --config {config_arg} --ckpt {args.out} --calibrate")
  return 0


if __name__ == "__main__":
  sys.exit(main())
