"""IterMask reference checkpoints -> Flax variables of its two BatchNorm U-Nets (spec
`methods/itermask.md` §5), for `tools.import_torch`.

The state_dict mapping is the shared DDPM++ one (`convert/ddpmpp.py`, norm 'batch'). The
reference scores with the EMA parameters and the raw model's BatchNorm running statistics (its
EMA never covers buffers), so a stage's scoring weights are `ema_params` + `batch_stats`.
"""

import pathlib
import re

from uad_jax.convert import accelerate, ddpmpp
from uad_jax.errors import DataError
from uad_jax.methods.itermask.method import build_model
from uad_jax.networks.ddpmpp import DDPMpp

# The reference's run folders (checkpoints/<run>/checkpoint_<k>) of the two stages.
RUN_NAMES = {"first": "IterMaskFirst", "ae": "IterMaskAE"}


def variables_from_torch(state_dict, model: DDPMpp, source: str = "state_dict") -> dict:
  """{'params', 'batch_stats'} of `model` from a reference state_dict (parameters and running
  statistics; `step` and `num_batches_tracked` dropped)."""
  return {"params": ddpmpp.torch_to_flax(state_dict, model, source),
          "batch_stats": ddpmpp.batch_stats_from_torch(state_dict, model, source)}


def checkpoint_folder(run: pathlib.Path) -> pathlib.Path:
  """`run` itself when it holds model weights, else its highest `checkpoint_<k>`."""
  if any((run / f).is_file() for f in accelerate.MODEL_FILES):
    return run
  numbered = [(int(m.group(1)), p) for p in run.glob("checkpoint_*")
              if (m := re.fullmatch(r"checkpoint_(\d+)", p.name)) and p.is_dir()]
  if not numbered:
    raise DataError(f"{run}: neither model weights ({' or '.join(accelerate.MODEL_FILES)}) nor "
                    "checkpoint_<k> folders")
  return max(numbered)[1]


def stage_fields(folder: pathlib.Path, model: DDPMpp, ema_from_model: bool):
  """({'params', 'ema_params', 'batch_stats'}, warnings) of one accelerate folder."""
  weights, model_file = accelerate.read_model_weights(folder)
  variables = variables_from_torch(weights, model, str(model_file))
  if ema_from_model:
    return (dict(variables, ema_params=variables["params"]),
            [accelerate.ema_from_model_warning(model_file)])
  shadow = accelerate.read_ema_shadow(folder)
  source = str(folder / accelerate.EMA_FILE)
  ema = ddpmpp.torch_to_flax(ddpmpp.shadow_params_to_state_dict(shadow, model, source), model,
                             source)
  return dict(variables, ema_params=ema), []


def reference_states(config, src: pathlib.Path, ema_from_model: bool):
  """Both stages of a reference run. `src` is the reference's `checkpoints/` folder: it holds
  the run folders `IterMaskFirst` and `IterMaskAE`, each an accelerate `save_state` folder or a
  folder of `checkpoint_<k>` (the highest k is used; the reference never writes the AE's
  checkpoint_20, spec §4.1). Returns ({'first', 'ae': {'params', 'ema_params', 'batch_stats'}},
  warnings)."""
  src = pathlib.Path(src)
  states, warnings = {}, []
  for stage, run in RUN_NAMES.items():
    if not (src / run).is_dir():
      raise DataError(f"{src}: no folder {run} (IterMask imports both reference runs, "
                      f"{' and '.join(RUN_NAMES.values())})")
    folder = checkpoint_folder(src / run)
    states[stage], stage_warnings = stage_fields(folder, build_model(config, stage),
                                                 ema_from_model)
    warnings += [f"stage {stage} imported from {folder}"] + stage_warnings
  return states, warnings
