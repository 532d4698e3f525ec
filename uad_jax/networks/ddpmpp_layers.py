"""Building blocks of the reference DDPM++ U-Net (`models/ANDi/{layers,layerspp}.py`), NHWC.

The blocks reproduce the reference exactly, quirks included (spec `methods/andi.md` §2.6, §4):
no activation after the time-modulated GroupNorm, convolution before nearest upsampling, a 1×1
skip convolution on every up/down block, causal attention over the raster order of the pixels.
Parameters are float32; `dtype` is the computation dtype (e.g. bfloat16).

Normalisation `norm`: 'group' (ANDi, DISYRE, RIAD) or 'batch', IterMask's variant
(`models/IterMask/layerspp.py`, spec `methods/itermask.md` §2.2): torch-semantics BatchNorm
(batch statistics in train mode, running statistics in eval mode) and, in the residual blocks,
a SiLU after the second norm.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.ops.batchnorm import BatchNorm

Dtype = Any
SQRT2 = float(np.sqrt(2.0))  # a Python float stays weakly typed: no promotion under x64

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


class GroupNorm(nn.Module):
  """GroupNorm over contiguous channel groups (torch and Flax semantics), affine, (B, H, W, C).

  Same parameters (scale, bias) and result as `nn.GroupNorm(num_groups(C), epsilon,
  use_fast_variance=False)`, computed differently for speed: the statistics are reduced per
  channel over H, W first (a reduction along a non-minor axis that XLA:CPU vectorises over the
  contiguous channels) and only then per group; mean, then centred variance, in float32. On
  XLA:CPU at 224² this is 2-3x faster than flax's GroupNorm and closer to float64
  (benchmarks/ddpmpp_layers.py).
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    groups = num_groups(c)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    count = h * w * (c // groups)

    def group_mean(channel_sums):  # (B, C) -> (B, 1, 1, C), each channel its group's mean
      g = channel_sums.reshape(b, groups, c // groups).sum(-1, keepdims=True) / count
      return jnp.broadcast_to(g, (b, groups, c // groups)).reshape(b, 1, 1, c)

    x = x.astype(jnp.float32)
    centred = x - group_mean(x.sum(axis=(1, 2)))
    var = group_mean(jnp.square(centred).sum(axis=(1, 2)))
    y = centred * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


NORMS = ("group", "batch")


def normalize(kind: str, x, train: bool, dtype: Dtype, name: str):
  """The block's norm layer `name` applied to x (B, H, W, C): 'group' (`GroupNorm`) or 'batch'
  (`BatchNorm`, batch statistics when `train`, updating collection 'batch_stats'). Call it inside
  a compact module: the layer becomes that module's submodule."""
  if kind == "group":
    return GroupNorm(dtype=dtype, name=name)(x)
  if kind == "batch":
    return BatchNorm(dtype=dtype, name=name)(x, use_running_average=not train)
  raise ValueError(f"norm {kind!r}: expected one of {NORMS}")


def norm_prefix(kind: str) -> str:
  """Flax name prefix of a block's norm layers: 'GN' (group) or 'BN' (batch)."""
  return {"group": "GN", "batch": "BN"}[kind]


class Conv1x1(nn.Module):
  """1×1 convolution with bias as a matrix product; kernel stored (1, 1, I, O) like nn.Conv.

  XLA:CPU runs 1×1 convolutions as generic convolutions, about 10x slower than the equivalent
  dot at 224² (benchmarks/ddpmpp_layers.py).
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", default_init, (1, 1, x.shape[-1], self.features))
    bias = self.param("bias", zeros_init, (self.features,))
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype)) + bias.astype(self.dtype)


def conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """3×3 convolution, stride 1, zero padding 1, NHWC × HWIO (no bias)."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Row blocks of the weight gradient are sized so that their patches (B × rows × W × 9·C_in)
# stay in the CPU caches. On smaller maps, and for the 1-channel input and output convolutions,
# XLA's own weight gradient was as fast or faster (benchmarks/ddpmpp_layers.py).
_ROW_CHUNK_BYTES = 4 << 20
_ROW_CHUNK_MIN_SIZE = 160
_ROW_CHUNK_MIN_CHANNELS = 16


def _weight_grad_row_chunks(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
  """dW[kh,kw,i,o] = Σ_{b,y,x} x_pad[b, y+kh, x+kw, i] · g[b, y, x, o], by blocks of rows.

  Each block's 3×3 patches (B, rows, W, 9·C_in) are built in cache and contracted with the
  block's output gradient in one matrix product; a scan accumulates the blocks in float32.
  """
  b, h, w, c_in = x.shape
  row_bytes = b * w * 9 * c_in * x.dtype.itemsize
  rows = max(r for r in range(1, h + 1) if h % r == 0 and r * row_bytes <= max(
      _ROW_CHUNK_BYTES, row_bytes))
  x_pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

  def block(acc, top):
    xs = jax.lax.dynamic_slice_in_dim(x_pad, top, rows + 2, axis=1)
    gs = jax.lax.dynamic_slice_in_dim(g, top, rows, axis=1)
    patches = jnp.concatenate([xs[:, dy:dy + rows, dx:dx + w] for dy in range(3)
                               for dx in range(3)], axis=-1)
    return acc + jnp.einsum("bhwk,bhwo->ko", patches, gs,
                            preferred_element_type=jnp.float32), None

  acc, _ = jax.lax.scan(block, jnp.zeros((9 * c_in, g.shape[-1]), jnp.float32),
                        jnp.arange(0, h, rows))
  return acc.reshape(3, 3, c_in, g.shape[-1])


@jax.custom_vjp
def conv3x3_row_chunked_wgrad(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """`conv3x3` whose weight gradient is computed by `_weight_grad_row_chunks` on large maps.

  XLA:CPU's own weight gradient of a 3×3 convolution at 224² runs at a third of the forward's
  speed; the row-blocked im2col product halves its time (benchmarks/ddpmpp_layers.py). Forward
  and input gradient are XLA's.
  """
  return conv3x3(x, kernel)


def _conv3x3_fwd(x, kernel):
  return conv3x3(x, kernel), (x, kernel)


def _conv3x3_bwd(residuals, g):
  x, kernel = residuals
  if (min(x.shape[1:3]) < _ROW_CHUNK_MIN_SIZE
      or min(kernel.shape[2:]) < _ROW_CHUNK_MIN_CHANNELS):
    return jax.vjp(conv3x3, x, kernel)[1](g)
  grad_x = jax.vjp(lambda x: conv3x3(x, kernel), x)[1](g)[0]
  return grad_x, _weight_grad_row_chunks(x, g).astype(kernel.dtype)


conv3x3_row_chunked_wgrad.defvjp(_conv3x3_fwd, _conv3x3_bwd)

CONV3X3_WEIGHT_GRADS = {"xla": conv3x3, "row_chunks": conv3x3_row_chunked_wgrad}


class Conv3x3(nn.Module):
  """3×3 'same' convolution with bias (zero padding 1), kernel (3, 3, I, O) like nn.Conv.

  weight_grad: 'xla' (XLA's gradient) or 'row_chunks' (`conv3x3_row_chunked_wgrad`, faster on
  XLA:CPU); the forward pass and the result are the same.
  """
  features: int
  zero_init: bool = False
  weight_grad: str = "xla"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", zeros_init if self.zero_init else default_init,
                        (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", zeros_init, (self.features,))
    y = CONV3X3_WEIGHT_GRADS[self.weight_grad](x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


def timestep_embedding(t: jnp.ndarray, dim: int, max_positions: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding [sin(t f_k) | cos(t f_k)], f_k = exp(-k ln(max_positions) / (dim/2 - 1)).

  t: (B,) float, used unscaled (the reference feeds t in [0, 1] to a 10000-based embedding,
  so most features are nearly constant; kept on purpose, spec §4 item 3). Returns (B, dim) f32.
  """
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -float(np.log(max_positions) / (half - 1)))
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
  norm 'batch' (IterMask): BN_0, BN_1 instead of GN_0, GN_1, and SiLU after BN_1.
  """
  c_out: int
  mode: str = "plain"
  dropout: float = 0.0
  rescale: bool = True
  conv_weight_grad: str = "xla"
  norm: str = "group"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb: Optional[jnp.ndarray], train: bool):
    c_in = x.shape[-1]
    prefix = norm_prefix(self.norm)
    h = nn.silu(normalize(self.norm, x, train, self.dtype, f"{prefix}_0"))
    if self.mode == "down":
      h, x = avg_pool_2x2(h), avg_pool_2x2(x)
    h = Conv3x3(self.c_out, weight_grad=self.conv_weight_grad, dtype=self.dtype, name="Conv_0")(h)
    if self.mode == "up":
      h = nearest_up_2x(h)
    h = normalize(self.norm, h, train, self.dtype, f"{prefix}_1")
    if temb is not None:
      emb = nn.Dense(2 * self.c_out, dtype=self.dtype, kernel_init=default_init,
                     bias_init=zeros_init, name="Dense_emb")(nn.silu(temb))
      scale, shift = jnp.split(emb[:, None, None, :], 2, axis=-1)
      h = h * (1 + scale) + shift
    if self.norm == "batch":
      h = nn.silu(h)   # IterMask's out_layers: BN, SiLU, Dropout, conv
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = Conv3x3(self.c_out, zero_init=True, weight_grad=self.conv_weight_grad, dtype=self.dtype,
                name="Conv_1")(h)
    if c_in != self.c_out or self.mode != "plain":
      x = Conv1x1(self.c_out, self.dtype, name="Conv_2")(x)
    if self.mode == "up":
      # The reference upsamples x before Conv_2; a pointwise convolution commutes exactly with
      # nearest upsampling, so it runs at the low resolution (same values, 4x fewer FLOPs).
      x = nearest_up_2x(x)
    out = x + h
    return out / SQRT2 if self.rescale else out


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention over the H·W pixels with a causal mask (`CausalSelfAttention`).

  Tokens are the row-major (y, x) raster of the map (a plain NHWC reshape); token i attends to
  tokens j <= i only. The reference builds every attention block causal and trained checkpoints
  depend on it (spec §4 item 1). head_dim = attn_emb_dim, heads = C / head_dim; q, k, v are the
  consecutive C-column blocks of Dense_qkv (no bias) and head j owns channels [j·d, (j+1)·d).
  No dropout on the attention probabilities; dropout after Dense_out (zero-initialised).
  The input norm (no activation) is GN or, with norm 'batch', BN.
  """
  head_dim: int
  dropout: float = 0.0
  rescale: bool = True
  norm: str = "group"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    b, hgt, wid, c = x.shape
    heads = c // self.head_dim
    h = normalize(self.norm, x, train, self.dtype, norm_prefix(self.norm))
    h = h.reshape(b, hgt * wid, c)
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
    return out / SQRT2 if self.rescale else out
