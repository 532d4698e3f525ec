"""Building blocks of the reference DDPM++ U-Net (`models/ANDi/{layers,layerspp}.py`), NHWC.

The blocks reproduce the reference exactly, quirks included (spec `methods/andi.md` §2.6, §4):
no activation after the time-modulated GroupNorm, convolution before nearest upsampling, a 1×1
skip convolution on every up/down block, causal attention over the raster order of the pixels.
Parameters are float32; `dtype` is the computation dtype (e.g. bfloat16).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# `default_init` of the reference: variance scaling 1, fan_avg, uniform (= Glorot-uniform). The
# fans of a Flax (kh, kw, I, O) kernel equal those of the torch (O, I, kh, kw) weight.
default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
zeros_init = nn.initializers.zeros
# PyTorch's nn.Linear default: U(±1/sqrt(fan_in)) for the weight (and the bias, below).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int):
  """U(±1/sqrt(fan_in)) bias of PyTorch's nn.Linear (fan_in = input features)."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def num_groups(channels: int) -> int:
  """GroupNorm groups of the reference: min(C // 4, 32) over contiguous channel blocks."""
  return min(channels // 4, 32)


def group_norm(channels: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups(channels), epsilon=1e-6, use_fast_variance=False,
                      dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, zero: bool = False) -> nn.Conv:
  """Stride-1 'same' convolution with bias (zero padding k // 2), as in the reference."""
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                 kernel_init=zeros_init if zero else default_init, bias_init=zeros_init,
                 name=name)


def timestep_embedding(t: jnp.ndarray, dim: int, max_positions: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding [sin(t f_k) | cos(t f_k)], f_k = exp(-k ln(max_positions) / (dim/2 - 1)).

  t: (B,) float, used unscaled (the reference feeds t in [0, 1] to a 10000-based embedding,
  so most features are nearly constant; kept on purpose, spec §4 item 3). Returns (B, dim) f32.
  """
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(np.log(max_positions) / (half - 1)))
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)


def avg_pool_2x2(x: jnp.ndarray) -> jnp.ndarray:
  """Mean over non-overlapping 2×2 blocks (the reference's 'naive downsample'). (B,H,W,C)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def nearest_up_2x(x: jnp.ndarray) -> jnp.ndarray:
  """Repeat every pixel 2×2 (the reference's 'naive upsample'). (B,H,W,C) -> (B,2H,2W,C)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class ResBlock(nn.Module):
  """BigGAN-style residual block with adaptive GroupNorm (`ResnetBlockBigGANpp`).

  mode: 'plain' | 'down' (2×2 average pool before Conv_0) | 'up' (nearest ×2 after Conv_0).
  With a time embedding, GN_1's output is modulated as GN_1(h)·(1 + scale) + shift, where
  [scale | shift] = Dense_emb(SiLU(temb)); there is no activation after it (reference quirk).
  Without one (RIAD) GN_1 is plain. The 1×1 Conv_2 is applied on the skip whenever the channel
  count changes or the block resamples. rescale divides the residual sum by sqrt(2).
  """
  c_out: int
  mode: str = "plain"
  dropout: float = 0.0
  rescale: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb: Optional[jnp.ndarray], train: bool):
    c_in = x.shape[-1]
    h = nn.silu(group_norm(c_in, self.dtype, "GN_0")(x))
    if self.mode == "down":
      h, x = avg_pool_2x2(h), avg_pool_2x2(x)
    h = conv(self.c_out, 3, self.dtype, "Conv_0")(h)
    if self.mode == "up":
      h, x = nearest_up_2x(h), nearest_up_2x(x)
    h = group_norm(self.c_out, self.dtype, "GN_1")(h)
    if temb is not None:
      emb = nn.Dense(2 * self.c_out, dtype=self.dtype, kernel_init=default_init,
                     bias_init=zeros_init, name="Dense_emb")(nn.silu(temb))
      scale, shift = jnp.split(emb[:, None, None, :], 2, axis=-1)
      h = h * (1 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv(self.c_out, 3, self.dtype, "Conv_1", zero=True)(h)
    if c_in != self.c_out or self.mode != "plain":
      x = conv(self.c_out, 1, self.dtype, "Conv_2")(x)
    out = x + h
    return out / np.sqrt(2.0) if self.rescale else out


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention over the H·W pixels with a causal mask (`CausalSelfAttention`).

  Tokens are the row-major (y, x) raster of the map (a plain NHWC reshape); token i attends to
  tokens j <= i only. The reference builds every attention block causal and trained checkpoints
  depend on it (spec §4 item 1). head_dim = attn_emb_dim, heads = C / head_dim; q, k, v are the
  consecutive C-column blocks of Dense_qkv (no bias) and head j owns channels [j·d, (j+1)·d).
  No dropout on the attention probabilities; dropout after Dense_out (zero-initialised).
  """
  head_dim: int
  dropout: float = 0.0
  rescale: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b, hgt, wid, c = x.shape
    heads = c // self.head_dim
    h = group_norm(c, self.dtype, "GN")(x).reshape(b, hgt * wid, c)
    h = nn.Dense(c, dtype=self.dtype, kernel_init=torch_linear_kernel_init,
                 bias_init=torch_linear_bias_init(c), name="Dense_in")(h)
    qkv = nn.Dense(3 * c, use_bias=False, dtype=self.dtype, kernel_init=torch_linear_kernel_init,
                   name="Dense_qkv")(h)
    q, k, v = (a.reshape(b, hgt * wid, heads, self.head_dim) for a in jnp.split(qkv, 3, axis=-1))
    a = jax.nn.dot_product_attention(q, k, v, scale=1.0 / np.sqrt(self.head_dim), is_causal=True)
    a = nn.Dense(c, dtype=self.dtype, kernel_init=zeros_init, bias_init=zeros_init,
                 name="Dense_out")(a.reshape(b, hgt * wid, c))
    a = nn.Dropout(self.dropout, deterministic=not train)(a).reshape(b, hgt, wid, c)
    out = x + a
    return out / np.sqrt(2.0) if self.rescale else out
