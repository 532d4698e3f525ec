"""Gradient magnitude similarity (GMS) and its multi-scale forms, as RIAD's reference computes them.

GMS(u, v) (riad.md §2.4): channel mean of each image, Prewitt gradients by *valid* 3×3
cross-correlation (Gx = ⅓[[−1, 0, 1]] in every row, Gy = ⅓ rows [1, 1, 1], [0, 0, 0],
[−1, −1, −1]), g = √(gx² + gy² + 1e-12), GMS = (2·g_u·g_v + c) / (g_u² + g_v² + c), c = 0.0026:
an (H − 2, W − 2) map in (0, 1]. The scales s = 0..3 apply s times a 2×2 average pooling of
stride 2 (224 → 112 → 56 → 28; maps 222, 110, 54, 26).
"""

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.ops.resize import resize_bilinear

C = 0.0026
SCALES = 4
# (3, 3, 1, 2) HWIO: Prewitt Gx and Gy as cross-correlation kernels.
_PREWITT = np.stack([np.array([[-1, 0, 1]] * 3), np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]])],
                    axis=-1)[:, :, None, :].astype(np.float32) / 3.0


def _gradient_magnitude(x: jax.Array) -> jax.Array:
  """(B, H, W, 1) -> (B, H − 2, W − 2, 1) Prewitt magnitude."""
  g = jax.lax.conv_general_dilated(x, jnp.asarray(_PREWITT), (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(jnp.sum(jnp.square(g), axis=-1, keepdims=True) + 1e-12)


def gms_map(u: jax.Array, v: jax.Array) -> jax.Array:
  """GMS of two float32 (B, H, W, C) images (channel-averaged) -> (B, H − 2, W − 2, 1)."""
  gu = _gradient_magnitude(jnp.mean(jnp.asarray(u, jnp.float32), axis=-1, keepdims=True))
  gv = _gradient_magnitude(jnp.mean(jnp.asarray(v, jnp.float32), axis=-1, keepdims=True))
  return (2 * gu * gv + C) / (gu * gu + gv * gv + C)


def _avg_pool2(x: jax.Array) -> jax.Array:
  """torch's avg_pool2d(2): 2×2 mean, stride 2, odd trailing rows/columns dropped."""
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0


def _multiscale_gms(u: jax.Array, v: jax.Array, scales: int) -> list[jax.Array]:
  maps = []
  for s in range(scales):
    if s > 0:
      u, v = _avg_pool2(u), _avg_pool2(v)
    maps.append(gms_map(u, v))
  return maps


def msgms_loss(u: jax.Array, v: jax.Array, scales: int = SCALES) -> jax.Array:
  """RIAD's MSGMS training loss: mean over scales of mean(1 − GMS). Scalar float32."""
  return jnp.mean(jnp.stack([jnp.mean(1.0 - m) for m in _multiscale_gms(u, v, scales)]))


def msgms_score(u: jax.Array, v: jax.Array, scales: int = SCALES) -> jax.Array:
  """RIAD's anomaly score (1 − Σ_s up(GMS_s)) / scales, (B, H, W, C) -> (B, H, W, 1).

  up = bilinear resize to (H, W) with align_corners=False (the reference resizes to W × W and
  only ever sees square slices). The bracket is the reference's: it equals the mean of
  (1 − GMS_s) minus the constant (scales − 1)/scales.
  """
  h, w = u.shape[1:3]
  total = sum(resize_bilinear(m, h, w, align_corners=False)
              for m in _multiscale_gms(u, v, scales))
  return (1.0 - total) / scales
