"""IterMask reference checkpoints -> Flax variables of its two BatchNorm U-Nets (spec
`methods/itermask.md` §5).

The state_dict mapping is the shared DDPM++ one (`convert/ddpmpp.py`, norm 'batch'). The
reference scores with the EMA parameters and the raw model's BatchNorm running statistics (its
EMA never covers buffers), so a stage's scoring weights are `ema_params` + `batch_stats`.
"""

import pathlib
import re

from uad_jax.convert import ddpmpp
from uad_jax.convert.weight_files import read_state_dict, to_numpy, torch_load
from uad_jax.errors import DataError
from uad_jax.networks.ddpmpp import DDPMpp

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
EMA_FILE = "custom_checkpoint_0.pkl"
# The reference's run folders (checkpoints/<run>/checkpoint_<k>) of the two stages.
RUN_NAMES = {"first": "IterMaskFirst", "ae": "IterMaskAE"}


def variables_from_torch(state_dict, model: DDPMpp, source: str = "state_dict") -> dict:
  """{'params', 'batch_stats'} of `model` from a reference state_dict (parameters and running
  statistics; `step` and `num_batches_tracked` dropped)."""
  return {"params": ddpmpp.torch_to_flax(state_dict, model, source),
          "batch_stats": ddpmpp.batch_stats_from_torch(state_dict, model, source)}


def _checkpoint_folder(run: pathlib.Path) -> pathlib.Path:
  """`run` itself when it holds model weights, else its highest `checkpoint_<k>`."""
  if any((run / f).is_file() for f in MODEL_FILES):
    return run
  numbered = [(int(m.group(1)), p) for p in run.glob("checkpoint_*")
              if (m := re.fullmatch(r"checkpoint_(\d+)", p.name)) and p.is_dir()]
  if not numbered:
    raise DataError(f"{run}: neither model weights ({' or '.join(MODEL_FILES)}) nor "
                    "checkpoint_<k> folders")
  return max(numbered)[1]


def _read_stage(folder: pathlib.Path, model: DDPMpp, ema_from_model: bool):
  model_file = next((folder / f for f in MODEL_FILES if (folder / f).is_file()), None)
  if model_file is None:
    raise DataError(f"{folder}: no model weights ({' or '.join(MODEL_FILES)})")
  weights, _ = read_state_dict(model_file)
  variables = variables_from_torch(weights, model, str(model_file))
  if ema_from_model:
    return variables, variables["params"]
  if not (folder / EMA_FILE).is_file():
    raise DataError(f"{folder}: no EMA file {EMA_FILE}; pass --ema-from-model to score with "
                    "the raw weights instead")
  ema = torch_load(folder / EMA_FILE)
  if not isinstance(ema, dict) or "shadow_params" not in ema:
    raise DataError(f"{folder / EMA_FILE}: expected the EMA state {{decay, num_updates, "
                    "shadow_params}}")
  shadow = [to_numpy(p) for p in ema["shadow_params"]]
  named = ddpmpp.shadow_params_to_state_dict(shadow, model, str(folder / EMA_FILE))
  return variables, ddpmpp.torch_to_flax(named, model, str(folder / EMA_FILE))


def reference_states(config, src: pathlib.Path, ema_from_model: bool):
  """Both stages of a reference run: `src` holds the run folders `IterMaskFirst` and
  `IterMaskAE` (the reference's `checkpoints/`), each an accelerate `save_state` folder or a
  folder of `checkpoint_<k>` (the highest k is used). Returns ({'first', 'ae': {'params',
  'ema_params', 'batch_stats'}}, warnings)."""
  from uad_jax.methods.itermask.method import build_model  # pylint: disable=import-outside-toplevel
  src = pathlib.Path(src)
  states, warnings = {}, []
  for stage, run in RUN_NAMES.items():
    if not (src / run).is_dir():
      raise DataError(f"{src}: no folder {run} (IterMask needs both reference runs, "
                      f"{' and '.join(RUN_NAMES.values())})")
    folder = _checkpoint_folder(src / run)
    variables, ema = _read_stage(folder, build_model(config, stage), ema_from_model)
    states[stage] = {"params": variables["params"], "ema_params": ema,
                     "batch_stats": variables["batch_stats"]}
    warnings.append(f"stage {stage}: {folder}")
    if ema_from_model:
      warnings.append(f"stage {stage}: EMA weights replaced by the raw model weights "
                      "(--ema-from-model); the reference scores with the EMA weights")
  return states, warnings
