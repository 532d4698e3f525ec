"""torchvision's ResNet family (resnet18/50, wide_resnet50_2, ...) as a frozen feature extractor.

One module builds every member from a `ResNetConfig` (block type, blocks per stage,
width_per_group, groups), exactly as `torchvision.models.resnet.ResNet` does:

* stem: conv1 7x7/2 pad 3 (3 -> 64, no bias) -> bn1 -> ReLU -> max-pool 3x3/2 pad 1 (-inf pad);
* stage s (1-based) has planes 64 * 2^(s-1); stride 1 for stage 1, else 2 in block 0;
* BasicBlock: 3x3(stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU (expansion 1);
* Bottleneck (v1.5: the stride sits on the 3x3 conv): 1x1 -> BN -> ReLU -> 3x3(stride, groups)
  -> BN -> ReLU -> 1x1 -> BN, + shortcut, ReLU; width = int(planes * width_per_group / 64) * groups,
  output 4 * planes;
* shortcut = `downsample` (1x1 conv with the block's stride -> BN) when the stride is not 1 or the
  channel count changes, else identity.

Flax names mirror the torchvision keys: `conv1`, `bn1`, `layer{s}_{b}/{conv,bn}{i}`,
`layer{s}_{b}/downsample_{conv,bn}` (see `uad_jax/convert/torchvision.py`).

Taps follow the reference's forward hooks (`utils/feature_extractor.py`): 'maxpool' is the output
of the max-pool, 'layer{s}' the output of the LAST block of stage s. The forward stops after the
deepest requested tap, so later stages are neither run nor given parameters.
"""

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from uad_jax.errors import ConfigError
from uad_jax.networks import torchvision_layers as tvl

BLOCKS = ("basic", "bottleneck")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Architecture of a torchvision ResNet (`ResNet(block, layers, groups, width_per_group)`).

  block: 'basic' (BasicBlock) or 'bottleneck' (Bottleneck).
  layers: blocks per stage, e.g. (2, 2, 2, 2) for resnet18, (3, 4, 6, 3) for wide_resnet50_2.
  width_per_group: 64 for standard ResNets, 128 for wide_resnet50_2 (Bottleneck only).
  groups: convolution groups of the Bottleneck 3x3 conv (1 except ResNeXt).
  bn_eps: BatchNorm epsilon (torchvision: 1e-5).
  """
  block: str
  layers: tuple[int, ...]
  width_per_group: int = 64
  groups: int = 1
  bn_eps: float = 1e-5

  def __post_init__(self):
    if self.block not in BLOCKS:
      raise ConfigError(f"ResNetConfig.block={self.block!r}: expected one of {BLOCKS}")
    if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
      # torchvision's BasicBlock raises on these too.
      raise ConfigError("ResNetConfig: BasicBlock supports only groups=1, width_per_group=64, "
                        f"got groups={self.groups}, width_per_group={self.width_per_group}")
    object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))

  @property
  def expansion(self) -> int:
    return 1 if self.block == "basic" else 4

  def tap_names(self) -> tuple[str, ...]:
    return ("maxpool",) + tuple(f"layer{s}" for s in range(1, len(self.layers) + 1))

  def tap_depth(self, tap: str) -> int:
    """0 for 'maxpool', s for 'layer{s}'; ConfigError for a name the network does not have."""
    if tap == "maxpool":
      return 0
    m = re.fullmatch(r"layer(\d+)", tap)
    if m is None or not 1 <= int(m.group(1)) <= len(self.layers):
      raise ConfigError(f"unknown ResNet tap {tap!r}: expected one of {self.tap_names()}")
    return int(m.group(1))


class BasicBlock(nn.Module):
  """torchvision BasicBlock (expansion 1), NHWC."""
  planes: int
  stride: int
  config: ResNetConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    eps = self.config.bn_eps
    h = tvl.conv(self.planes, 3, self.stride, name="conv1", **kw)(x)
    h = nn.relu(tvl.batch_norm(eps, dtype=self.dtype, name="bn1")(h))
    h = tvl.conv(self.planes, 3, name="conv2", **kw)(h)
    h = tvl.batch_norm(eps, dtype=self.dtype, name="bn2")(h)
    return nn.relu(h + _shortcut(self, x, self.planes, kw))


class Bottleneck(nn.Module):
  """torchvision Bottleneck v1.5 (stride on the 3x3 conv, expansion 4), NHWC."""
  planes: int
  stride: int
  config: ResNetConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    cfg, eps = self.config, self.config.bn_eps
    width = int(self.planes * (cfg.width_per_group / 64.0)) * cfg.groups
    out = self.planes * cfg.expansion
    h = tvl.conv(width, 1, name="conv1", **kw)(x)
    h = nn.relu(tvl.batch_norm(eps, dtype=self.dtype, name="bn1")(h))
    h = tvl.conv(width, 3, self.stride, groups=cfg.groups, name="conv2", **kw)(h)
    h = nn.relu(tvl.batch_norm(eps, dtype=self.dtype, name="bn2")(h))
    h = tvl.conv(out, 1, name="conv3", **kw)(h)
    h = tvl.batch_norm(eps, dtype=self.dtype, name="bn3")(h)
    return nn.relu(h + _shortcut(self, x, out, kw))


def _shortcut(block: nn.Module, x, out: int, kw):
  """Identity, or torchvision's `downsample` (1x1 conv, stride s, no bias -> BN)."""
  if block.stride == 1 and x.shape[-1] == out:
    return x
  h = tvl.conv(out, 1, block.stride, name="downsample_conv", **kw)(x)
  return tvl.batch_norm(block.config.bn_eps, dtype=block.dtype, name="downsample_bn")(h)


class ResNet(nn.Module):
  """Frozen torchvision ResNet up to the deepest tap.

  Input: (B, H, W, 3) images (channel order as torchvision's RGB; no normalisation applied here).
  Output: {tap: (B, h, w, C)} in `dtype` (a dict: iterate over `taps` for their order).
  `precision` is passed to every conv (use 'highest' for float32 parity on GPUs that default
  to TF32).
  """
  config: ResNetConfig
  taps: tuple[str, ...]
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    if not self.taps:
      raise ConfigError("ResNet: no taps requested")
    last = max(cfg.tap_depth(t) for t in self.taps)
    kw = dict(dtype=self.dtype, precision=self.precision)
    block_cls = BasicBlock if cfg.block == "basic" else Bottleneck

    x = jnp.asarray(x, self.dtype)
    x = tvl.conv(64, 7, 2, name="conv1", **kw)(x)
    x = nn.relu(tvl.batch_norm(cfg.bn_eps, dtype=self.dtype, name="bn1")(x))
    # Post-ReLU input, so -inf padding (torch) and zero padding would agree; reduce_window pads
    # with -inf, as torch does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    outputs = {"maxpool": x}
    for s in range(1, last + 1):
      planes = 64 * 2 ** (s - 1)
      for b in range(cfg.layers[s - 1]):
        stride = 2 if (s > 1 and b == 0) else 1
        x = block_cls(planes, stride, cfg, name=f"layer{s}_{b}", **kw)(x)
      outputs[f"layer{s}"] = x
    return {t: outputs[t] for t in self.taps}
