"""torch.nn.ConvTranspose2d as a Flax module on NHWC inputs.

torch's definition, for input x (I channels) and weight W of shape (I, O, kh, kw):

  out[n, y, x, o] = bias[o] + Σ_{i, iy, ix, ky, kx} x[n, iy, ix, i] · W[i, o, ky, kx]
                    over y = iy·s − p + ky, x = ix·s − p + kx,

so H_out = (H − 1)·s − 2p + kh + output_padding (likewise W). Computed as a stride-1 correlation
of the s-dilated input with the spatially flipped kernel and padding (k − 1 − p,
k − 1 − p + output_padding) per axis (negative padding crops). Used by RD's decoder (2×2,
stride 2, no padding) and FAE's decoder (6×6 and 7×7, stride 2, padding 2).

Converter layout: params `kernel` (kh, kw, I, O) = torch `weight.transpose(2, 3, 0, 1)` (no
flip; the flip happens here), `bias` (O,) = torch `bias`.
Initialisation is torch's default: kernel and bias ~ U(±1/√(O·kh·kw)) (torch takes the fan-in
from dim 1 of its (I, O, kh, kw) weight).

Kernel gradient: XLA:CPU's own gradient of the dilated correlation runs 15-400x slower than
the forward (FAE's 6x6/2 decoder at 28² -> 56², 100 -> 256 channels: 12 s per batch of 4,
measured); `conv_transpose` computes it instead from its definition,
dK[ky, kx, i, o] = Σ_{b, iy, ix} x[b, iy, ix, i] · g[b, iy·s − p + ky, ix·s − p + kx, o],
as kh·kw matrix products of x with strided slices of the (padded) output gradient. Forward and
input gradient are XLA's.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def _torch_uniform(fan_in: int):
  bound = 1.0 / fan_in ** 0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _dilated_correlation(x, kernel, strides, padding, output_padding, precision):
  pads = [(ki - 1 - pi, ki - 1 - pi + oi)
          for ki, pi, oi in zip(kernel.shape[:2], padding, output_padding)]
  return jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], (1, 1), pads, lhs_dilation=strides,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_transpose(x, kernel, strides, padding, output_padding, precision=None):
  """torch's conv_transpose2d without bias: x (B, H, W, I), kernel (kh, kw, I, O) -> NHWC.

  strides, padding, output_padding: (h, w) pairs of torch's arguments.
  """
  return _dilated_correlation(x, kernel, strides, padding, output_padding, precision)


def _conv_transpose_fwd(x, kernel, strides, padding, output_padding, precision):
  return conv_transpose(x, kernel, strides, padding, output_padding, precision), (x, kernel)


def _conv_transpose_bwd(strides, padding, output_padding, precision, residuals, g):
  x, kernel = residuals
  grad_x = jax.vjp(lambda x: _dilated_correlation(x, kernel, strides, padding, output_padding,
                                                  precision), x)[1](g)[0]
  (kh, kw), (sh, sw), (ph, pw) = kernel.shape[:2], strides, padding
  _, h, w, _ = x.shape
  # gp[b, y + p] = g[b, y]: output rows -p .. (H - 1)·s - p + kh - 1 all exist (zeros outside).
  gp = jnp.pad(g, ((0, 0), (ph, max(0, (h - 1) * sh + kh - ph - g.shape[1])),
                   (pw, max(0, (w - 1) * sw + kw - pw - g.shape[2])), (0, 0)))
  rows = [[jnp.einsum("bhwi,bhwo->io", x,
                      gp[:, ky:ky + (h - 1) * sh + 1:sh, kx:kx + (w - 1) * sw + 1:sw],
                      precision=precision, preferred_element_type=jnp.float32)
           for kx in range(kw)] for ky in range(kh)]
  grad_kernel = jnp.stack([jnp.stack(r) for r in rows]).astype(kernel.dtype)
  return grad_x, grad_kernel


conv_transpose.defvjp(_conv_transpose_fwd, _conv_transpose_bwd)


class ConvTranspose(nn.Module):
  """Transposed 2-D convolution with torch's semantics (groups 1, dilation 1).

  Attributes:
    features: output channels O.
    kernel_size: (kh, kw) or k.
    strides: (sh, sw) or s.
    padding: torch's `padding`, (ph, pw) or p.
    output_padding: torch's `output_padding`, (oh, ow) or o (each < its stride).
    use_bias: add a learned bias.
  """
  features: int
  kernel_size: int | tuple[int, int]
  strides: int | tuple[int, int] = 1
  padding: int | tuple[int, int] = 0
  output_padding: int | tuple[int, int] = 0
  use_bias: bool = True
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, I) -> (B, H_out, W_out, O) in `dtype`."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    k, s, p, op = (pair(v) for v in (self.kernel_size, self.strides, self.padding,
                                     self.output_padding))
    if any(o >= st for o, st in zip(op, s)):
      raise ValueError(f"output_padding {op} must be smaller than the stride {s} (torch's rule)")
    fan_in = self.features * k[0] * k[1]
    kernel = self.param("kernel", _torch_uniform(fan_in), (*k, x.shape[-1], self.features),
                        jnp.float32)
    y = conv_transpose(jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype), s, p, op,
                       self.precision)
    if self.use_bias:
      y = y + jnp.asarray(self.param("bias", _torch_uniform(fan_in), (self.features,),
                                     jnp.float32), self.dtype)
    return y
