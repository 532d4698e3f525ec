"""FAE's feature autoencoder ('vanilla', Meissen et al. 2022), NHWC.

Spec `methods/fae.md` §5 (reference `models/FAE/fae_models.py`, `vanilla_feature_encoder` /
`vanilla_feature_decoder`). With hidden widths (c0, c1, c2, c3) and C input channels (the
concatenated backbone taps, 256 for resnet18 maxpool|layer1|layer2):

* encoder: 4 x [conv 6x6/2 pad 2 -> BN -> LeakyReLU(0.01) -> Dropout2d] (C -> c0 -> .. -> c3),
  then conv 5x5/1 pad 2 (c3 -> c3): the latent;
* decoder: ConvTranspose 7x7/2 pad 2 (c3 -> c2; the 7 makes 3 -> 7 at featmap 56), then
  ConvTranspose 6x6/2 pad 2 (c2 -> c1 -> c0 -> C), each -> BN -> LeakyReLU -> Dropout2d (also
  after the last one, a reference detail), then conv 1x1 (C -> C).

All convs are bias-free. The round trip returns the input size only for a square feature map of
side 8n, n odd >= 3 (latent ((n - 1) / 2)²): 56 -> 3x3, 24 -> 1x1.

Initialisation is PyTorch's default, which the reference keeps: conv weights U(±1/sqrt(fan_in)),
fan_in = C_in·k², and transposed convs U(±1/sqrt(C_out·k²)) (`uad_jax/ops/conv_transpose.py`);
BN scale 1, bias 0, running mean 0, var 1.
BatchNorm has torch's train-mode semantics (`uad_jax/ops/batchnorm.py`); Dropout2d zeroes
whole channels per sample (`broadcast_dims` over H, W) with the Flax rng stream 'dropout'.

Flax names copy the torch paths: `enc/encoder_layer_{i}/encoder_conv_{i}`,
`.../encoder_norm_{i}`, `enc/encoder_conv_final`, `dec/decoder_layer_{i}/decoder_tconv_{i}`
(i = 4..1), `.../decoder_norm_{i}`, `dec/decoder_conv_final` (see `uad_jax/convert/fae.py`).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from uad_jax.errors import ConfigError
# torch's Conv2d default init, kaiming_uniform(a=√5), is U(±1/√fan_in) like nn.Linear's, with
# fan_in = C_in·k² (also the fan-in Flax computes for a (k, k, C_in, C_out) kernel).
from uad_jax.networks.ddpmpp_layers import torch_linear_kernel_init as torch_conv_init
from uad_jax.ops.batchnorm import BatchNorm
from uad_jax.ops.conv_transpose import ConvTranspose

LEAKY_SLOPE = 0.01
ENCODER_KERNEL, ENCODER_PAD = 6, 2
LATENT_KERNEL = 5
# The deepest decoder level uses a 7x7 kernel: (3 - 1)·2 - 2·2 + 7 = 7 at featmap 56.
DECODER_KERNELS = (7, 6, 6, 6)
DECODER_PAD = 2


def check_featmap_size(size: int) -> None:
  """The encoder/decoder round trip is exact only for size = 8n with n odd >= 3."""
  if size % 8 or (size // 8) % 2 == 0 or size < 24:
    raise ConfigError(f"model.featmap_size={size}: the feature autoencoder returns its input "
                      "size only for 8·n with n odd >= 3 (24, 40, 56, 72, ...)")


class _Level(nn.Module):
  """conv (or transposed conv) -> BN -> LeakyReLU(0.01) -> Dropout2d, one autoencoder level.

  index: the reference's level number (encoder 0..3, decoder 4..1), which names the layers.
  """
  index: int
  features: int
  kernel: int
  transpose: bool
  dropout: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    i, k = self.index, self.kernel
    if self.transpose:
      x = ConvTranspose(self.features, kernel_size=k, strides=2, padding=DECODER_PAD,
                        use_bias=False, dtype=self.dtype, precision=self.precision,
                        name=f"decoder_tconv_{i}")(x)
      norm = f"decoder_norm_{i}"
    else:
      x = nn.Conv(self.features, (k, k), strides=(2, 2), padding=((ENCODER_PAD,) * 2,) * 2,
                  use_bias=False, dtype=self.dtype, precision=self.precision,
                  kernel_init=torch_conv_init, name=f"encoder_conv_{i}")(x)
      norm = f"encoder_norm_{i}"
    x = BatchNorm(use_running_average=not train, dtype=self.dtype, name=norm)(x)
    x = nn.leaky_relu(x, LEAKY_SLOPE)
    # Dropout2d: one Bernoulli draw per (sample, channel), survivors scaled by 1 / (1 - p).
    return nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(x)


class Encoder(nn.Module):
  """(B, h, w, C) -> latent (B, h', w', c3), h' = (h / 8 - 1) / 2 for h = 8n (n odd)."""
  channels: Sequence[int]
  dropout: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for i, c in enumerate(self.channels):
      x = _Level(i, c, ENCODER_KERNEL, False, self.dropout, self.dtype, self.precision,
                 name=f"encoder_layer_{i}")(x, train)
    pad = LATENT_KERNEL // 2
    return nn.Conv(self.channels[-1], (LATENT_KERNEL, LATENT_KERNEL),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype,
                   precision=self.precision, kernel_init=torch_conv_init,
                   name="encoder_conv_final")(x)


class Decoder(nn.Module):
  """latent (B, h', w', c3) -> (B, h, w, out_channels)."""
  channels: Sequence[int]
  out_channels: int
  dropout: float
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    # Levels 4..1: widths c2, c1, c0, out_channels.
    widths = tuple(self.channels[-2::-1]) + (self.out_channels,)
    n = len(self.channels)
    for j, (c, k) in enumerate(zip(widths, DECODER_KERNELS)):
      z = _Level(n - j, c, k, True, self.dropout, self.dtype, self.precision,
                 name=f"decoder_layer_{n - j}")(z, train)
    return nn.Conv(self.out_channels, (1, 1), use_bias=False, dtype=self.dtype,
                   precision=self.precision, kernel_init=torch_conv_init,
                   name="decoder_conv_final")(z)


class FeatureAutoencoder(nn.Module):
  """The vanilla feature autoencoder: (B, h, w, C) float32 features -> reconstruction, same shape.

  channels: hidden widths (c0, c1, c2, c3) (`model.channels`, paper (100, 150, 200, 300)).
  dropout: Dropout2d rate (active only when `train`; needs the 'dropout' rng).
  The latent is `Encoder(...)` applied with the `enc` subtree of the variables.
  train: BN batch statistics (and `batch_stats` updates, pass mutable=['batch_stats']) and
    dropout; otherwise running statistics, no dropout.
  """
  channels: Sequence[int]
  dropout: float = 0.1
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if len(self.channels) != len(DECODER_KERNELS):
      raise ConfigError(f"model.channels={tuple(self.channels)}: the vanilla feature "
                        f"autoencoder has {len(DECODER_KERNELS)} levels")
    if x.shape[1] != x.shape[2]:
      raise ConfigError(f"feature autoencoder input {x.shape}: needs a square feature map")
    check_featmap_size(x.shape[1])
    z = Encoder(tuple(self.channels), self.dropout, self.dtype, self.precision, name="enc")(
        x, train)
    return Decoder(tuple(self.channels), x.shape[-1], self.dropout, self.dtype, self.precision,
                   name="dec")(z, train)
