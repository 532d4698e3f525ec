"""Imports a checkpoint of the PyTorch reference (UAD-IMAG) as a uad_jax run directory.

  python -m uad_jax.tools.import_torch --method andi --src checkpoint_6 --out runs/andi_ref \
      [--config configs/andi.py] [--step 15000]
  python -m uad_jax.eval --config configs/andi.py --ckpt runs/andi_ref --calibrate

`--src` is the reference's accelerate `save_state` folder (model weights in `model.safetensors`
or `pytorch_model.bin`, EMA shadow weights in `custom_checkpoint_0.pkl` for methods with EMA).
Each method's converter (`uad_jax/convert/<method>.py`, function `reference_states`) maps it to
the fields of its stages' train states. `--ema-from-model` uses the raw model weights as the EMA
weights (not what the reference scores with; flagged in the checkpoint's warnings). The
optimiser state is not imported (a fresh one is stored), so training can continue from the
weights but not bit-exactly as the reference would.
"""

import argparse
import importlib
import sys
from pathlib import Path

import jax
import numpy as np

from uad_jax import methods
from uad_jax.convert.accelerate import reference_step
from uad_jax.engine import run_dir
from uad_jax.engine.checkpoints import CheckpointStore
from uad_jax.engine.config import REPO_ROOT, load_config
from uad_jax.errors import DataError, UadError
from uad_jax.methods.contract import TrainContext


def converter(method: str):
  """The module `uad_jax.convert.<method>` (it provides `reference_states`)."""
  try:
    return importlib.import_module(f"uad_jax.convert.{method}")
  except ModuleNotFoundError as e:
    raise DataError(f"--method {method}: no reference checkpoint import for this method") from e


def _init_config(config, fields: dict):
  """The config the train state is built from: when the checkpoint brings the frozen encoder
  itself, its ImageNet weight file is not needed (the state's random encoder is replaced)."""
  if "frozen" not in fields or "allow_random_backbone" not in config.get("model", {}):
    return config
  config = config.copy_and_resolve_references()
  config.model.allow_random_backbone = True
  return config


def import_checkpoint(method_name: str, src, out, config, step: int | None = None,
                      ema_from_model: bool = False) -> Path:
  """Converts `src` and writes every stage's checkpoint under `out`; returns the final stage's
  step folder."""
  src, out = Path(src), Path(out).resolve()
  method = methods.get_method(method_name)
  if method.is_fitted:
    raise DataError(f"--method {method_name}: a fitted method has no trained checkpoint to "
                    "import; run `python -m uad_jax.train` to fit it")
  if not src.is_dir():
    raise DataError(f"{src}: not a checkpoint folder")
  fields, warnings = converter(method_name).reference_states(config, src, ema_from_model)
  step = reference_step(src, config.training.snapshot_freq, step)
  out.mkdir(parents=True, exist_ok=True)
  run_dir.write_run_config(out, config)
  for stage in method.stages:
    state = stage.init(_init_config(config, fields[stage.name]), jax.random.key(0),
                       TrainContext())
    state = state.replace(step=np.int32(step), **fields[stage.name])
    store = CheckpointStore(run_dir.checkpoint_dir(out, method, stage.name))
    store.save(step, state, {}, {"step": step, "method": method_name, "stage": stage.name,
                                 "imported_from": str(src), "warnings": warnings})
    store.close()
  return run_dir.checkpoint_dir(out) / str(step)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m uad_jax.tools.import_torch",
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--method", required=True, choices=methods.METHODS)
  parser.add_argument("--src", required=True, type=Path, help="reference checkpoint folder")
  parser.add_argument("--out", required=True, type=Path, help="uad_jax workdir to write")
  parser.add_argument("--config", default=None,
                      help="config[:preset] of the reference model (default configs/<method>.py)")
  parser.add_argument("--step", type=int, default=None, help="training step of the checkpoint")
  parser.add_argument("--ema-from-model", action="store_true",
                      help="use the raw weights as EMA weights (when the EMA file is missing)")
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
