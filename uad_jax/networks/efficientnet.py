"""torchvision's EfficientNet (B0-B7 builder) as a frozen feature extractor.

Stages come from torchvision's builder rules (`_efficientnet_conf`), not from a hard-coded
table: the B0 rows (expand, kernel, stride, in, out, blocks) are scaled with
`make_divisible(c * width_mult)` for channels and `ceil(blocks * depth_mult)` for depth;
efficientnet_b4 is width 1.4, depth 1.8.

* `features.0` (stem): conv 3x3/2 pad 1 (3 -> stage-1 input, no bias) -> BN -> SiLU.
* `features.s` (s = 1..7): MBConv blocks; block 0 has the stage's stride and input, blocks 1..
  take the stage output as input and stride 1.
* MBConv(I -> E -> O, k, s): [1x1 expand -> BN -> SiLU, only when E != I] -> depthwise k x k
  stride s pad (k-1)//2 -> BN -> SiLU -> squeeze-excitation (mean over H, W -> 1x1 conv E -> Q
  (bias) -> SiLU -> 1x1 conv Q -> E (bias) -> sigmoid, multiplies) -> 1x1 project -> BN;
  residual only when s == 1 and I == O. Q = max(1, I // 4), counted on the block INPUT.
  Stochastic depth is the identity in eval mode and therefore absent.

Flax names: `stem_conv`, `stem_bn`, `features_{s}_{b}/{expand,dw,project}_{conv,bn}` and
`features_{s}_{b}/se_fc{1,2}`. A tap 'features.s' is the output of the LAST block of stage s
(the reference's forward hook); the forward stops after the deepest tap.
"""

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from uad_jax.errors import ConfigError
from uad_jax.networks import torchvision_layers as tvl

# torchvision `_efficientnet_conf` B0 rows: (expand_ratio, kernel, stride, in, out, blocks).
B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
             (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
             (6, 3, 1, 192, 320, 1))


def make_divisible(v: float, divisor: int = 8) -> int:
  """torchvision `_make_divisible`: nearest multiple of 8, at least 8, never below 0.9 * v."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  if new_v < 0.9 * v:
    new_v += divisor
  return new_v


@dataclasses.dataclass(frozen=True)
class StageConfig:
  expand_ratio: int
  kernel: int
  stride: int
  in_channels: int
  out_channels: int
  blocks: int


@dataclasses.dataclass(frozen=True)
class EfficientNetConfig:
  """torchvision EfficientNet multipliers: B4 = (1.4, 1.8); BN eps 1e-5 for B0-B4, 1e-3 B5-B7."""
  width_mult: float
  depth_mult: float
  bn_eps: float = 1e-5

  def stages(self) -> tuple[StageConfig, ...]:
    """The 7 MBConv stages (features.1..7) after width/depth scaling."""
    return tuple(
        StageConfig(e, k, s, make_divisible(i * self.width_mult),
                    make_divisible(o * self.width_mult), int(math.ceil(n * self.depth_mult)))
        for e, k, s, i, o, n in B0_STAGES)

  def tap_names(self) -> tuple[str, ...]:
    return tuple(f"features.{s}" for s in range(len(B0_STAGES) + 1))

  def tap_depth(self, tap: str) -> int:
    """s for 'features.s' (0 = stem); ConfigError for a name the network does not have."""
    m = re.fullmatch(r"features\.(\d+)", tap)
    if m is None or int(m.group(1)) > len(B0_STAGES):
      raise ConfigError(f"unknown EfficientNet tap {tap!r}: expected one of {self.tap_names()}")
    return int(m.group(1))


class MBConv(nn.Module):
  """torchvision MBConv with squeeze-excitation (eval mode), NHWC."""
  expanded: int
  out: int
  kernel: int
  stride: int
  bn_eps: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, precision=self.precision)
    bn = lambda name: tvl.batch_norm(self.bn_eps, dtype=self.dtype, name=name)
    in_channels = x.shape[-1]
    h = x
    if self.expanded != in_channels:
      h = nn.silu(bn("expand_bn")(tvl.conv(self.expanded, 1, name="expand_conv", **kw)(h)))
    h = tvl.conv(self.expanded, self.kernel, self.stride, groups=self.expanded, name="dw_conv",
                 **kw)(h)
    h = nn.silu(bn("dw_bn")(h))
    squeeze = max(1, in_channels // 4)
    g = jnp.mean(h, axis=(1, 2), keepdims=True)
    g = nn.silu(tvl.conv(squeeze, 1, use_bias=True, name="se_fc1", **kw)(g))
    g = nn.sigmoid(tvl.conv(self.expanded, 1, use_bias=True, name="se_fc2", **kw)(g))
    h = bn("project_bn")(tvl.conv(self.out, 1, name="project_conv", **kw)(h * g))
    if self.stride == 1 and in_channels == self.out:
      h = h + x
    return h


class EfficientNet(nn.Module):
  """Frozen torchvision EfficientNet up to the deepest tap.

  Input: (B, H, W, 3), no normalisation applied here.
  Output: {tap: (B, h, w, C)} in `dtype` (a dict: iterate over `taps` for their order).
  """
  config: EfficientNetConfig
  taps: tuple[str, ...]
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    if not self.taps:
      raise ConfigError("EfficientNet: no taps requested")
    last = max(cfg.tap_depth(t) for t in self.taps)
    kw = dict(dtype=self.dtype, precision=self.precision)
    stages = cfg.stages()

    x = jnp.asarray(x, self.dtype)
    x = tvl.conv(stages[0].in_channels, 3, 2, name="stem_conv", **kw)(x)
    x = nn.silu(tvl.batch_norm(cfg.bn_eps, dtype=self.dtype, name="stem_bn")(x))
    outputs = {"features.0": x}
    for s in range(1, last + 1):
      st = stages[s - 1]
      for b in range(st.blocks):
        in_channels = st.in_channels if b == 0 else st.out_channels
        x = MBConv(make_divisible(in_channels * st.expand_ratio), st.out_channels, st.kernel,
                   st.stride if b == 0 else 1, cfg.bn_eps, name=f"features_{s}_{b}", **kw)(x)
      outputs[f"features.{s}"] = x
    return {t: outputs[t] for t in self.taps}
