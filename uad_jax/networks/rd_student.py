"""Reverse Distillation's student: one-class bottleneck (OCBE) and de-ResNet decoder, NHWC.

Spec `methods/reverse_distillation.md` §2.3-2.5 (reference `models/ReverseDist/layers.py`
`BN_layer`/`AttnBottleneck`/`Bottleneck`, `RD_model.py` `ResNet`). Given the three teacher taps
(strides s, 2s, 4s with channels C1, C2, C3), the OCBE fuses them into one code at stride 8s and
the decoder rebuilds the three maps from deep to shallow.

Every channel count follows from the teacher's (C1, C2, C3) and width_per_group W (the
reference's tables, written without its hard-coded wide_resnet50_2 numbers):
* OCBE: conv1 3x3/2 C1 -> C2, conv2 3x3/2 C2 -> C3 (after conv1), conv3 3x3/2 C2 -> C3; the
  concatenation [a, b, c] (3·C3 channels) goes through `ocbe_blocks` bottlenecks of width
  int(512·W/64) and output 2·C3, the first with stride 2 and a 1x1/2 conv + BN shortcut.
* decoder stages (in, width, out) = (2·C3, int(256·W/64), C3), (C3, int(128·W/64), C2),
  (C2, int(64·W/64), C1), with `decoder_blocks` (3, 4, 6) bottlenecks; block 0 of each stage
  upsamples by 2 with a 2x2/2 ConvTranspose (`ops/conv_transpose.py`) in its main path and a
  2x2/2 ConvTranspose + BN shortcut.
wide_resnet50_2 (C = 256, 512, 1024; W = 128) gives the reference's 2048x7x7 code at 224².
The reference also builds OCBE `conv4`/`bn4` but never calls them (§6.2): they are omitted.

Initialisation as the reference (§2.5): convs Kaiming-normal fan_out (torchvision's), BN γ = 1,
β = 0, and ConvTranspose keeps torch's default uniform(±1/sqrt(out·kh·kw)) because the
reference's init loop only catches nn.Conv2d.

Every BatchNorm is trainable with torch's semantics (`uad_jax/ops/batchnorm.py`): batch
statistics and running-stat updates when `train`, running statistics otherwise.
Flax names copy the torch paths (`ocbe/bn_layer_0/downsample_conv`,
`decoder/layer1_0/upsample_deconv`; see `uad_jax/convert/reverse_distillation.py`).
"""

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uad_jax.errors import ConfigError
from uad_jax.networks import torchvision_layers as tvl
from uad_jax.ops.batchnorm import BatchNorm
from uad_jax.ops.conv_transpose import ConvTranspose

# Reference planes of the OCBE bottlenecks and of the decoder stages; width = int(planes·W/64).
OCBE_PLANES = 512
DECODER_PLANES = (256, 128, 64)


def _width(planes: int, width_per_group: int) -> int:
  return int(planes * (width_per_group / 64.0))


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  """The student's channel tables, derived from the teacher's tap channels.

  teacher_channels: (C1, C2, C3) of the teacher taps, shallow to deep (wide_resnet50_2:
    (256, 512, 1024)).
  width_per_group: W of the reference (128).
  ocbe_blocks, decoder_blocks: bottlenecks of the OCBE and of each decoder stage.
  """
  teacher_channels: tuple[int, int, int]
  width_per_group: int = 128
  ocbe_blocks: int = 3
  decoder_blocks: tuple[int, int, int] = (3, 4, 6)

  def __post_init__(self):
    object.__setattr__(self, "teacher_channels", tuple(int(c) for c in self.teacher_channels))
    object.__setattr__(self, "decoder_blocks", tuple(int(n) for n in self.decoder_blocks))
    if len(self.teacher_channels) != 3 or len(self.decoder_blocks) != 3:
      raise ConfigError(f"StudentConfig: 3 teacher taps and 3 decoder stages needed, got "
                        f"{self.teacher_channels}, {self.decoder_blocks}")
    if min(self.ocbe_width, *(w for _, w, _ in self.decoder_stages)) < 1:
      raise ConfigError(f"StudentConfig: width_per_group {self.width_per_group} gives an empty "
                        "bottleneck")

  @property
  def ocbe_width(self) -> int:
    return _width(OCBE_PLANES, self.width_per_group)

  @property
  def ocbe_out(self) -> int:
    return 2 * self.teacher_channels[2]

  @property
  def decoder_stages(self) -> tuple[tuple[int, int, int], ...]:
    """(in, width, out) of decoder layer1, layer2, layer3."""
    c1, c2, c3 = self.teacher_channels
    ins, outs = (self.ocbe_out, c3, c2), (c3, c2, c1)
    return tuple((i, _width(p, self.width_per_group), o)
                 for i, p, o in zip(ins, DECODER_PLANES, outs))


class StudentBottleneck(nn.Module):
  """ReLU(main(x) + shortcut(x)), main = BN∘conv1x1 ∘ ReLU∘BN∘mid ∘ ReLU∘BN∘conv1x1.

  mid is a 3x3 conv with `stride` (OCBE, decoder blocks 1..n-1) or, with `upsample`, a 2x2/2
  ConvTranspose. The shortcut is the identity when shapes allow, else a 1x1/stride conv + BN
  (`downsample_*`) or a 2x2/2 ConvTranspose + BN (`upsample_*`).
  """
  width: int
  out: int
  stride: int = 1
  upsample: bool = False
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv_kw = dict(dtype=self.dtype, precision=self.precision)
    bn = lambda name: BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)
    h = nn.relu(bn("bn1")(tvl.conv(self.width, 1, name="conv1", **conv_kw)(x)))
    if self.upsample:
      mid = ConvTranspose(self.width, 2, 2, use_bias=False, name="conv2", **conv_kw)
    else:
      mid = tvl.conv(self.width, 3, self.stride, name="conv2", **conv_kw)
    h = nn.relu(bn("bn2")(mid(h)))
    h = bn("bn3")(tvl.conv(self.out, 1, name="conv3", **conv_kw)(h))
    if self.upsample:
      deconv = ConvTranspose(self.out, 2, 2, use_bias=False, name="upsample_deconv", **conv_kw)
      shortcut = bn("upsample_bn")(deconv(x))
    elif self.stride != 1 or x.shape[-1] != self.out:
      shortcut = bn("downsample_bn")(
          tvl.conv(self.out, 1, self.stride, name="downsample_conv", **conv_kw)(x))
    else:
      shortcut = x
    return nn.relu(h + shortcut)


class OCBE(nn.Module):
  """One-class bottleneck embedding (`BN_layer`): taps [(B,h,w,C1), (B,h/2,w/2,C2),
  (B,h/4,w/4,C3)] -> (B, h/8, w/8, 2·C3)."""
  config: StudentConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, taps: Sequence[jax.Array], train: bool) -> jax.Array:
    cfg = self.config
    _, c2, c3 = cfg.teacher_channels
    conv_kw = dict(dtype=self.dtype, precision=self.precision)
    bn = lambda name: BatchNorm(use_running_average=not train, dtype=self.dtype, name=name)
    a = nn.relu(bn("bn1")(tvl.conv(c2, 3, 2, name="conv1", **conv_kw)(taps[0])))
    a = nn.relu(bn("bn2")(tvl.conv(c3, 3, 2, name="conv2", **conv_kw)(a)))
    b = nn.relu(bn("bn3")(tvl.conv(c3, 3, 2, name="conv3", **conv_kw)(taps[1])))
    h = jnp.concatenate([a, b, jnp.asarray(taps[2], self.dtype)], axis=-1)
    for i in range(cfg.ocbe_blocks):
      h = StudentBottleneck(cfg.ocbe_width, cfg.ocbe_out, stride=2 if i == 0 else 1,
                            name=f"bn_layer_{i}", **conv_kw)(h, train)
    return h


class Decoder(nn.Module):
  """de-ResNet decoder: code (B, h, w, 2·C3) -> [(B,8h,8w,C1), (B,4h,4w,C2), (B,2h,2w,C3)]
  (the reference's [layer3, layer2, layer1] outputs: entry k is compared with teacher tap k)."""
  config: StudentConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, code: jax.Array, train: bool) -> list[jax.Array]:
    cfg = self.config
    h, outputs = code, []
    for s, ((_, width, out), blocks) in enumerate(zip(cfg.decoder_stages, cfg.decoder_blocks)):
      for b in range(blocks):
        h = StudentBottleneck(width, out, upsample=b == 0, dtype=self.dtype,
                              precision=self.precision, name=f"layer{s + 1}_{b}")(h, train)
      outputs.append(h)
    return outputs[::-1]


class Student(nn.Module):
  """OCBE + decoder. Input: the teacher taps, shallow to deep. Output: (code, [student maps in
  the taps' order]), in `dtype`; with `train`, updates the 'batch_stats' collection."""
  config: StudentConfig
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, taps: Sequence[jax.Array], train: bool = False):
    kw = dict(dtype=self.dtype, precision=self.precision)
    code = OCBE(self.config, name="ocbe", **kw)(taps, train)
    return code, Decoder(self.config, name="decoder", **kw)(code, train)


def abstract_variables(student: Student) -> dict:
  """{'params', 'batch_stats'} of `student` as ShapeDtypeStructs (the shapes do not depend on
  the input size; traced on taps of 8², 4², 2²)."""
  taps = [jax.ShapeDtypeStruct((1, 8 >> k, 8 >> k, c), jnp.float32)
          for k, c in enumerate(student.config.teacher_channels)]
  return dict(jax.eval_shape(functools.partial(student.init, train=False), jax.random.key(0),
                             taps))
