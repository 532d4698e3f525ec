"""PyTorch reference Reverse Distillation checkpoint -> Flax variables (spec §3).

The reference model (`RD_model.ReverseDist`) has three parts, with state_dict prefixes:
* `extractor.backbone.` the frozen teacher, a torchvision ResNet (`convert/torchvision.py`);
* `bn.` the OCBE -> Flax `ocbe/` (`bn.bn_layer.0` -> `ocbe/bn_layer_0`);
* `decoder.` the decoder -> Flax `decoder/` (`decoder.layer2.3` -> `decoder/layer2_3`);
plus a `step` buffer (dropped). A multi-GPU (DDP) run prefixes every key with `module.`.
`downsample.0/1` -> `downsample_conv/bn`, `upsample.0/1` -> `upsample_deconv/bn`. The OCBE's
`conv4`/`bn4` are built but never called by the reference (§6.2); they are dropped.

Leaves:

| torch | Flax |
|---|---|
| Conv2d weight (O, I, kh, kw) | params/.../kernel = w.transpose(2, 3, 1, 0) |
| ConvTranspose2d weight (I, O, 2, 2) (*) | params/.../kernel = w.transpose(2, 3, 0, 1) |
| BatchNorm2d weight, bias | params/.../scale, bias |
| BatchNorm2d running_mean, running_var | batch_stats/.../mean, var |
| num_batches_tracked | dropped |

(*) `upsample.0` and the `conv2` of each decoder stage's block 0 (`ops/conv_transpose.py`).

The expected tree comes from the Flax student itself, so every key and shape is checked: a
missing or unexpected key, or a wrong shape, is a DataError naming the key.
"""

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import traverse_util

from uad_jax.convert.accelerate import read_model_weights
from uad_jax.convert.torchvision import torchvision_to_flax
from uad_jax.errors import DataError
from uad_jax.methods import reverse_distillation
from uad_jax.networks import feature_extractor
from uad_jax.networks.rd_student import Student, abstract_variables

TEACHER_PREFIX = "extractor.backbone."
_WRAPPER_PREFIX = "module."
_DROPPED = re.compile(r"step|bn\.(conv4|bn4)\..*|.*\.num_batches_tracked")
_SUBMODULES = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn",
               "upsample.0": "upsample_deconv", "upsample.1": "upsample_bn"}
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def strip_wrapper(state_dict: Mapping) -> dict:
  """Removes DDP's leading `module.` from every key that has it."""
  return {k[len(_WRAPPER_PREFIX):] if k.startswith(_WRAPPER_PREFIX) else k: v
          for k, v in state_dict.items()}


def _flax_module(torch_module: str) -> tuple[str, ...]:
  """Flax module path of a student module (`bn.bn_layer.0.conv1` -> ocbe/bn_layer_0/conv1)."""
  m = re.fullmatch(r"bn\.(?:bn_layer\.(\d+)\.)?([a-z]+\d*(?:\.[01])?)", torch_module)
  if m:
    block = (f"bn_layer_{m.group(1)}",) if m.group(1) is not None else ()
    return ("ocbe", *block, _SUBMODULES.get(m.group(2), m.group(2)))
  m = re.fullmatch(r"decoder\.layer(\d+)\.(\d+)\.([a-z]+\d*(?:\.[01])?)", torch_module)
  if m:
    return ("decoder", f"layer{m.group(1)}_{m.group(2)}", _SUBMODULES.get(m.group(3), m.group(3)))
  raise DataError(f"{torch_module!r} is not a module of the Reverse Distillation student")


def _is_transposed(path: tuple[str, ...]) -> bool:
  """ConvTranspose2d modules: every upsample shortcut and the mid conv of decoder block 0."""
  return path[-1] == "upsample_deconv" or (
      path[0] == "decoder" and path[1].endswith("_0") and path[-1] == "conv2")


def student_to_flax(state_dict: Mapping, student: Student, *, source: str = "state_dict") -> dict:
  """{'params', 'batch_stats'} of `student` from a reference state_dict (name -> array).

  Keys of the teacher (`extractor.`), `step`, the dead `conv4`/`bn4` and `num_batches_tracked`
  are ignored. source: names the file in errors.
  """
  expected = traverse_util.flatten_dict(abstract_variables(student))
  flat = {}
  for key, value in strip_wrapper(state_dict).items():
    if key.startswith("extractor.") or _DROPPED.fullmatch(key):
      continue
    if "." not in key:
      raise DataError(f"{source}: key {key!r} is not a student parameter")
    torch_module, leaf = key.rsplit(".", 1)
    path = _flax_module(torch_module)
    is_conv = ("params", *path, "kernel") in expected
    if is_conv and leaf == "weight":
      target = ("params", *path, "kernel")
    else:
      target = (*_BN_LEAVES.get(leaf, (None, None)),)
      target = (target[0], *path, target[1])
    if target not in expected:
      raise DataError(f"{source}: key {key!r} has no matching Flax variable "
                      f"({'/'.join(map(str, target))})")
    array = np.asarray(value, dtype=np.float32)
    if is_conv:
      if array.ndim != 4:
        raise DataError(f"{source}: key {key!r}: conv weight must be 4-D, got {array.shape}")
      array = array.transpose(2, 3, 0, 1) if _is_transposed(path) else array.transpose(2, 3, 1, 0)
    if array.shape != tuple(expected[target].shape):
      raise DataError(f"{source}: key {key!r}: shape {np.shape(value)} does not fit the student "
                      f"(Flax {'/'.join(target)} expects {expected[target].shape})")
    flat[target] = np.ascontiguousarray(array)
  missing = sorted("/".join(p) for p in set(expected) - set(flat))
  if missing:
    raise DataError(f"{source}: lacks {len(missing)} tensors of the student, e.g. {missing[:5]}")
  return traverse_util.unflatten_dict(flat)


def reference_states(config, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """{'model': {'params', 'batch_stats', 'frozen'}} of a reference checkpoint folder `src`
  (accelerate save_state), and warnings.

  The teacher comes from the checkpoint's `extractor.backbone.*` (the weights it was trained
  with); 'frozen' is left out when the checkpoint has none (then model.backbone_weights is used).
  RD keeps no EMA, so `ema_from_model` changes nothing.
  """
  del ema_from_model
  weights, model_file = read_model_weights(Path(src))
  weights = strip_wrapper(weights)
  student = reverse_distillation.build_student(config)
  state = dict(student_to_flax(weights, student, source=str(model_file)))
  warnings = []
  if any(k.startswith(TEACHER_PREFIX) for k in weights):
    state["frozen"] = torchvision_to_flax(
        weights, feature_extractor.backbone_module(config.model), prefix=TEACHER_PREFIX)
  else:
    warnings.append(f"{model_file} holds no teacher ({TEACHER_PREFIX}*); the teacher is "
                    "model.backbone_weights")
  return {"model": state}, warnings
