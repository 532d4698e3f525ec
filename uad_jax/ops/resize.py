"""Bilinear resize with torch's `F.interpolate(mode='bilinear')` semantics, float32, NHWC.

Per axis n -> m, torch computes in float32 (fae.md §8, reverse_distillation.md §5):
* align_corners=True:  src = i·s, s = (n − 1)/(m − 1) (0 when m = 1);
* align_corners=False: src = max(s·(i + 0.5) − 0.5, 0), s = n/m (half-pixel centres);
then i0 = floor(src), i1 = min(i0 + 1, n − 1), w = src − i0, out = (1 − w)·x[i0] + w·x[i1].
No antialiasing when shrinking (torch samples sparsely too). Building the (m, n) interpolation
matrices with the same float32 arithmetic matches torch to < 5e-7; float64 source positions
would differ by up to ~1e-5. `jax.image.resize` has no align_corners=True, hence the matrices.
"""

import jax
import jax.numpy as jnp
import numpy as np


def interpolation_matrix(n: int, m: int, *, align_corners: bool) -> np.ndarray:
  """(m, n) float32 matrix A with A @ v = torch's bilinear resize of a length-n vector v."""
  dst = np.arange(m, dtype=np.float32)
  if align_corners:
    scale = np.float32(n - 1) / np.float32(m - 1) if m > 1 else np.float32(0)
    src = dst * scale
  else:
    scale = np.float32(n) / np.float32(m)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
  i1 = np.minimum(i0 + 1, n - 1)
  w1 = src - i0.astype(np.float32)
  a = np.zeros((m, n), np.float32)
  rows = np.arange(m)
  np.add.at(a, (rows, i0), np.float32(1) - w1)
  np.add.at(a, (rows, i1), w1)
  return a


def resize_bilinear(x: jax.Array, height: int, width: int, *, align_corners: bool) -> jax.Array:
  """(B, h, w, C) float32 -> (B, height, width, C), torch's bilinear; identity sizes pass through.
  """
  if x.shape[1:3] == (height, width):
    return x
  rows = jnp.asarray(interpolation_matrix(x.shape[1], height, align_corners=align_corners))
  cols = jnp.asarray(interpolation_matrix(x.shape[2], width, align_corners=align_corners))
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,bhwc->bowc", rows, x, precision=highest)
  return jnp.einsum("pw,bowc->bopc", cols, x, precision=highest)
