"""torchvision ResNet / EfficientNet (and EfficientNet-Lite) state_dict -> Flax variables.

The single mapping used by `python -m uad_jax.tools.import_weights`, by the packaged Lite
weights and by the parity tests. Module paths are renamed per family (`layer2.0.downsample.1`
-> `layer2_0/downsample_bn`, `features.3.1.block.2.fc1` -> `features_3_1/se_fc1`; Lite's
lukemelas names in `efficientnet_lite.py`); leaves by what the Flax module is:

| torch leaf | Flax conv | Flax BatchNorm |
|---|---|---|
| weight (O, I, kh, kw) | params/.../kernel = w.transpose(2, 3, 1, 0) | params/.../scale |
| bias | params/.../bias | params/.../bias |
| running_mean, running_var | - | batch_stats/.../mean, var |
| num_batches_tracked | dropped | dropped |

Depthwise weights (E, 1, k, k) become (k, k, 1, E), used with feature_group_count=E.
The expected tree comes from the Flax module itself (built up to its deepest tap), so the
conversion checks the key set and every shape: a missing or unexpected key, or a wrong shape, is
a DataError naming the key. Keys of stages after the deepest tap and of the classifier head are
ignored (never run by the feature extractor).
"""

import functools
import re
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from uad_jax.convert.efficientnet_lite import lite_module
from uad_jax.errors import DataError
from uad_jax.networks.backbones import abstract_variables
from uad_jax.networks.efficientnet import EfficientNet
from uad_jax.networks.resnet import ResNet

_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
_CONV_LEAVES = {"weight": ("params", "kernel"), "bias": ("params", "bias")}


def _resnet_module(torch_module: str, tree_modules: set) -> tuple | None:
  """Flax module path of a torchvision ResNet module; None for parts the feature extractor skips."""
  if torch_module in ("conv1", "bn1"):
    return (torch_module,)
  m = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv\d+|bn\d+|downsample\.[01])", torch_module)
  if m:
    block = f"layer{m.group(1)}_{m.group(2)}"
    if (block,) not in tree_modules:
      return None  # a stage after the deepest tap
    sub = {"downsample.0": "downsample_conv", "downsample.1": "downsample_bn"}.get(
        m.group(3), m.group(3))
    return (block, sub)
  if torch_module == "fc":
    return None
  raise DataError(f"{torch_module!r} is not a module of a torchvision ResNet")


def _efficientnet_module(torch_module: str, tree_modules: set) -> tuple | None:
  """Flax module path of a torchvision EfficientNet module; None for skipped parts."""
  stem = {"features.0.0": "stem_conv", "features.0.1": "stem_bn"}
  if torch_module in stem:
    return (stem[torch_module],)
  m = re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(0|1|fc1|fc2)", torch_module)
  if m:
    block = f"features_{m.group(1)}_{m.group(2)}"
    if (block,) not in tree_modules:
      return None  # a stage after the deepest tap
    # The expand conv exists only when E != I (stage 1 of B0-B7), which shifts block.<j>.
    parts = ["expand", "dw", "se", "project"] if (block, "expand_conv") in tree_modules else [
        "dw", "se", "project"]
    j, sub = int(m.group(3)), m.group(4)
    if j >= len(parts) or (parts[j] == "se") != (sub in ("fc1", "fc2")):
      raise DataError(f"{torch_module!r} does not fit the MBConv layout {parts}")
    name = f"se_{sub}" if parts[j] == "se" else f"{parts[j]}_{'conv' if sub == '0' else 'bn'}"
    return (block, name)
  # features.8 (final 1x1 conv) and the classifier never run before a features.1-7 tap.
  if re.fullmatch(r"features\.\d+\.\d+|classifier\.\d+", torch_module):
    return None
  raise DataError(f"{torch_module!r} is not a module of a torchvision EfficientNet")


def torchvision_to_flax(state_dict: Mapping, module, *, prefix: str = "") -> dict:
  """Converts a state_dict (name -> array) for `module` (ResNet or EfficientNet: torchvision
  names; EfficientNet-Lite: the names of its PyTorch port).

  prefix: only keys starting with it are read, with it stripped (e.g. 'extractor.backbone.' for
    the backbone inside a reference training checkpoint); other keys are ignored.
  Returns {'params': ..., 'batch_stats': ...} as nested dicts of float32 numpy arrays, exactly
  the tree `module.init` creates.
  """
  if isinstance(module, ResNet):
    module_path = _resnet_module
  elif isinstance(module, EfficientNet) and module.config.lite:
    module_path = functools.partial(lite_module, config=module.config)
  elif isinstance(module, EfficientNet):
    module_path = _efficientnet_module
  else:
    raise TypeError(f"no torchvision mapping for {type(module).__name__}")
  # {(collection, *module_path, leaf): ShapeDtypeStruct}
  expected = traverse_util.flatten_dict(abstract_variables(module))
  # Every Flax module path and its parents, e.g. ('layer1_0',) and ('layer1_0', 'conv1'): the
  # family mappings use them to skip stages the module does not build.
  tree_modules = {path[1:i] for path in expected for i in range(2, len(path))}

  flat = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    name = key[len(prefix):]
    if "." not in name:
      raise DataError(f"state_dict key {key!r}: not a torchvision module parameter")
    torch_module, leaf = name.rsplit(".", 1)
    if leaf == "num_batches_tracked":
      continue
    path = module_path(torch_module, tree_modules)
    if path is None:
      continue
    leaves = _CONV_LEAVES if ("params", *path, "kernel") in expected else _BN_LEAVES
    collection, flax_leaf = leaves.get(leaf, (None, None))
    target = (collection, *path, flax_leaf)
    if target not in expected:
      raise DataError(f"state_dict key {key!r}: unexpected for this architecture "
                      f"(no matching Flax variable under {'/'.join(path)})")
    array = np.asarray(value, dtype=np.float32)
    if flax_leaf == "kernel":
      if array.ndim != 4:
        raise DataError(f"state_dict key {key!r}: conv weight must be (O, I, kh, kw), "
                        f"got shape {array.shape}")
      array = array.transpose(2, 3, 1, 0)
    if array.shape != tuple(expected[target].shape):
      raise DataError(f"state_dict key {key!r}: shape {np.shape(value)} does not fit the "
                      f"architecture (Flax {'/'.join(target)} expects {expected[target].shape})")
    flat[target] = np.ascontiguousarray(array)

  missing = sorted("/".join(p) for p in set(expected) - set(flat))
  if missing:
    raise DataError(f"state_dict lacks {len(missing)} tensors the architecture needs "
                    f"(prefix {prefix!r}), e.g. {missing[:5]}")
  return traverse_util.unflatten_dict(flat)
