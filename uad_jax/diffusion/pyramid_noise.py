"""Pyramid (multi-resolution) noise of ANDi training (`utils/helpers.py::pyramid_noise_like`).

Reference algorithm (spec `methods/andi.md` §2.4), for a (B, S, S, C) tensor:

    noise = N(0, 1);  w = S
    for i in 0..9:
      r = U[2, 4)                          # one draw per level, shared by the whole batch
      w = max(1, int(w / r**i))            # cumulative; level 0 is a 2nd full-size white noise
      noise += bilinear_up(N(0, 1) of size w×w, to S×S) * discount**i
      if w == 1: break
    noise /= std(noise)                     # ONE unbiased std over the whole batch tensor

The level sizes are random, so a jit-friendly version cannot draw w×w arrays. Since r >= 2,
w_i <= S // 2**(i(i+1)/2) for every draw: level i's noise is drawn at that static maximum size
and upsampled with an (S × max) bilinear matrix built from the traced w, whose columns >= w are
zero (the first w×w entries of an i.i.d. draw are an i.i.d. w×w draw). Levels after the one that
reached w = 1 are masked out. The parity path (`pyramid_noise_from_draws`) feeds the reference's
recorded draws through the same combination code.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

MAX_LEVELS = 10  # the reference's loop bound


def level_max_sizes(size: int) -> list[int]:
  """Static upper bound of w for levels 1, 2, ... (level 0 is always full size).

  Ends with the first level whose bound is 1: that level surely reaches w = 1 and stops the loop.
  """
  sizes, w = [], size
  for i in range(1, MAX_LEVELS):
    w = max(1, w // 2 ** i)
    sizes.append(w)
    if w == 1:
      break
  return sizes


def level_widths(size: int, r: jnp.ndarray) -> jnp.ndarray:
  """Widths w_1.. of levels 1..len(r) for scale draws r (level i uses r[i - 1] ** i).

  Float32 version of the reference's float64 `max(1, int(w / r**i))`; int32 array.
  """
  widths, w = [], jnp.asarray(size, jnp.float32)
  for i in range(1, r.shape[0] + 1):
    w = jnp.maximum(1.0, jnp.floor(w / r[i - 1] ** i))
    widths.append(w)
  return jnp.stack(widths).astype(jnp.int32)


def bilinear_upsample_matrix(width: jnp.ndarray, size: int, max_width: int) -> jnp.ndarray:
  """(size, max_width) matrix M with M @ v = bilinear resize of v[:width] to `size` samples.

  Half-pixel centres (align_corners=False), source coordinate clamped at the edges: for
  upsampling this equals torchvision's Resize(antialias=True) and jax.image.resize('bilinear').
  width = size gives the identity, width = 1 a constant. Columns >= width are zero.
  """
  width_f = jnp.asarray(width, jnp.float32)
  src = (jnp.arange(size, dtype=jnp.float32) + 0.5) * (width_f / size) - 0.5
  src = jnp.clip(src, 0.0, width_f - 1.0)
  lo = jnp.floor(src).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.asarray(width, jnp.int32) - 1)
  frac = (src - lo)[:, None]
  cols = jnp.arange(max_width)[None, :]
  return (1.0 - frac) * (cols == lo[:, None]) + frac * (cols == hi[:, None])


def combine_levels(full_size: Sequence[jnp.ndarray], low_res: Sequence[jnp.ndarray],
                   widths: jnp.ndarray, discount: float) -> jnp.ndarray:
  """Sums the pyramid and normalises it by one unbiased std over the whole tensor.

  full_size: the two (B, S, S, C) draws (the initial noise and level 0).
  low_res: level i = 1.. draws (B, m_i, m_i, C) with m_i >= widths[i - 1]; only the top-left
  widths[i - 1]² block is used. Level i is skipped when an earlier level reached width 1.
  """
  base, level0 = full_size
  size = base.shape[1]
  noise = base + level0
  active = jnp.asarray(size > 1)
  for i, low in enumerate(low_res, start=1):
    m = bilinear_upsample_matrix(widths[i - 1], size, low.shape[1])
    up = jnp.einsum("yh,bhwc,xw->byxc", m, low, m, precision=jax.lax.Precision.HIGHEST)
    noise = noise + jnp.where(active, discount ** i, 0.0) * up
    active = active & (widths[i - 1] > 1)
  return noise / jnp.std(noise, ddof=1)


def pyramid_noise(key: jax.Array, shape: tuple[int, int, int, int],
                  discount: float = 0.9) -> jnp.ndarray:
  """Random pyramid noise of shape (B, S, S, C), float32; `key` gives all draws."""
  b, size, size_w, c = shape
  if size != size_w:
    raise ValueError(f"pyramid noise needs square images, got shape {shape}")
  max_sizes = level_max_sizes(size)
  keys = jax.random.split(key, len(max_sizes) + 3)
  r = jax.random.uniform(keys[0], (len(max_sizes),), jnp.float32, 2.0, 4.0)
  full_size = [jax.random.normal(k, shape, jnp.float32) for k in keys[1:3]]
  low_res = [jax.random.normal(k, (b, m, m, c), jnp.float32)
             for k, m in zip(keys[3:], max_sizes)]
  return combine_levels(full_size, low_res, level_widths(size, r), discount)


def pyramid_noise_from_draws(r_uniform: np.ndarray, draws: Sequence[np.ndarray],
                             discount: float = 0.9) -> jnp.ndarray:
  """Pyramid noise from the reference's recorded draws (parity tests).

  r_uniform: the Python `random.random()` values, one per level (r = 2 u + 2), level 0 first.
  draws: NHWC normal draws in the reference's order: initial full-size noise, then one per
  level at its actual size w_i × w_i (level 0 full size).
  """
  r = 2.0 * jnp.asarray(r_uniform, jnp.float32) + 2.0
  size = draws[0].shape[1]
  draws = [jnp.asarray(d, jnp.float32) for d in draws]
  return combine_levels(draws[:2], draws[2:], level_widths(size, r[1:]), discount)
