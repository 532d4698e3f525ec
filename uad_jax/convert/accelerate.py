"""Reading a checkpoint folder of the PyTorch reference (accelerate `save_state`).

  <src>/model.safetensors | pytorch_model.bin   the model's state_dict (neither needs torch)
  <src>/custom_checkpoint_0.pkl                  the EMA state {decay, num_updates, shadow_params}
                                                 (methods with EMA; shadow list in
                                                 named_parameters() order)
"""

import re
from pathlib import Path

import numpy as np

from uad_jax.convert import ddpmpp
from uad_jax.convert.weight_files import read_state_dict, to_numpy, torch_load
from uad_jax.errors import DataError

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
EMA_FILE = "custom_checkpoint_0.pkl"


def read_model_weights(src: Path) -> tuple[dict, Path]:
  """(state_dict of numpy arrays, the file it came from)."""
  if not Path(src).is_dir():
    raise DataError(f"{src}: not a checkpoint folder")
  model_file = next((src / f for f in MODEL_FILES if (src / f).is_file()), None)
  if model_file is None:
    raise DataError(f"{src}: no model weights ({' or '.join(MODEL_FILES)})")
  weights, _ = read_state_dict(model_file)
  return weights, model_file


def read_ema_shadow(src: Path) -> list[np.ndarray]:
  """The EMA shadow parameters of `src/custom_checkpoint_0.pkl`, in named_parameters() order."""
  path = src / EMA_FILE
  if not path.is_file():
    raise DataError(f"{src}: no EMA file {EMA_FILE}; pass --ema-from-model to score with the "
                    "raw weights instead")
  ema = torch_load(path)
  if not isinstance(ema, dict) or "shadow_params" not in ema:
    raise DataError(f"{path}: expected the EMA state {{decay, num_updates, shadow_params}}")
  return [to_numpy(p) for p in ema["shadow_params"]]


def ema_from_model_warning(model_file: Path) -> str:
  return (f"EMA weights replaced by the raw model weights of {model_file.name} "
          "(--ema-from-model); the reference scores with the EMA weights")


def step_buffer(src: Path) -> int | None:
  """The model's `step` buffer (the reference sets it before saving), read alone from
  model.safetensors; None when absent, zero or not in a safetensors file."""
  path = Path(src) / MODEL_FILES[0]
  if not path.is_file():
    return None
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  with safe_open(str(path), framework="numpy") as f:
    name = next((k for k in ("step", "module.step") if k in f.keys()), None)
    value = int(np.asarray(f.get_tensor(name)).ravel()[0]) if name else 0
  return value or None


def reference_step(src: Path, snapshot_freq: int, step: int | None) -> int:
  """The training step of the checkpoint folder `src`: `step`, else the `step` buffer, else
  k·snapshot_freq from a folder named checkpoint_<k>."""
  if step is not None:
    return step
  buffered = step_buffer(src)
  if buffered:
    return buffered
  match = re.fullmatch(r"checkpoint_(\d+)", Path(src).name)
  if match:
    return int(match.group(1)) * snapshot_freq
  raise DataError(f"{src}: cannot tell the training step (no `step` buffer, folder not named "
                  "checkpoint_<k>); pass --step")


def ddpmpp_with_ema(model, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """({'params', 'ema_params'}, warnings) of a DDPM++ method's checkpoint folder (ANDi, DISYRE):
  the model weights and the EMA shadow list, both mapped by `convert/ddpmpp.py`."""
  src = Path(src)
  weights, model_file = read_model_weights(src)
  warnings = []
  if ema_from_model:
    warnings.append(ema_from_model_warning(model_file))
    ema, ema_source = weights, model_file
  else:
    ema_source = src / EMA_FILE
    ema = ddpmpp.shadow_params_to_state_dict(read_ema_shadow(src), model, str(ema_source))
  return {"params": ddpmpp.torch_to_flax(weights, model, str(model_file)),
          "ema_params": ddpmpp.torch_to_flax(ema, model, str(ema_source))}, warnings
