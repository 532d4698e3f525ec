"""SSIM with a Gaussian window (σ = 1.5), as the reference's `pytorch_ssim` computes it.

Per channel (depthwise), with ⋆ the windowed mean (correlation with the normalised 2-D window
outer(g, g), g[i] ∝ exp(−(i − ⌊w/2⌋)² / (2·1.5²))):

  μx = x⋆G,  σxx = (x·x)⋆G − μx²,  σyy = (y·y)⋆G − μy²,  σxy = (x·y)⋆G − μx·μy
  ssim = (2 μx μy + C1)(2 σxy + C2) / ((μx² + μy² + C1)(σxx + σyy + C2)),  C1 = 0.01², C2 = 0.03²

(data range 1, even for unbounded features). The window is applied as two 1-D passes; the
reference's single 2-D convolution gives the same numbers to float32 rounding (fixtures: ≤ 4e-6,
where σ = E[x²] − μ² cancels).
Reference variants (riad.md §2.4, fae.md §6):
* RIAD training loss: `ssim_loss(u, v, window=11)` ('valid', map shrinks by 10);
* FAE training loss: `ssim_loss(F, R, window=5)` ('valid');
* FAE scoring map: `ssim_map(R, F, window=11, padding="same")` (zero padding 5, so borders see
  zeros; the reference keeps that).
"""

import jax
import jax.numpy as jnp
import numpy as np

C1 = 0.01 ** 2
C2 = 0.03 ** 2
SIGMA = 1.5
PADDINGS = ("valid", "same")


def gaussian_window(size: int, sigma: float = SIGMA) -> np.ndarray:
  """(size,) float32 1-D Gaussian window centred at size // 2, normalised to sum 1."""
  i = np.arange(size, dtype=np.float64)
  g = np.exp(-(i - size // 2) ** 2 / (2.0 * sigma ** 2))
  return (g / g.sum()).astype(np.float32)


def _windowed_mean(x: jax.Array, window: int, padding: str) -> jax.Array:
  """Depthwise correlation of (B, H, W, C) with outer(g, g), as two 1-D passes."""
  channels = x.shape[-1]
  g = jnp.asarray(gaussian_window(window))
  pad = window // 2 if padding == "same" else 0
  for kernel_shape, pads in (((window, 1), ((pad, pad), (0, 0))),
                             ((1, window), ((0, 0), (pad, pad)))):
    kernel = jnp.broadcast_to(g.reshape(*kernel_shape, 1, 1), (*kernel_shape, 1, channels))
    x = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
  return x


def ssim_map(x: jax.Array, y: jax.Array, *, window: int, padding: str) -> jax.Array:
  """Per-pixel, per-channel SSIM of two float32 (B, H, W, C) arrays.

  padding: 'valid' -> (B, H − w + 1, W − w + 1, C); 'same' (zero padding w // 2, odd w) ->
    (B, H, W, C).
  """
  if padding not in PADDINGS:
    raise ValueError(f"padding={padding!r}: expected one of {PADDINGS}")
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"ssim_map needs two (B, H, W, C) arrays of one shape, got {x.shape}, "
                     f"{y.shape}")
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  c = x.shape[-1]
  # One depthwise pass over the five quantities stacked along channels.
  m = _windowed_mean(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), window, padding)
  mx, my, exx, eyy, exy = (m[..., k * c:(k + 1) * c] for k in range(5))
  mx2, my2, mxy = mx * mx, my * my, mx * my
  sxx, syy, sxy = exx - mx2, eyy - my2, exy - mxy
  return ((2 * mxy + C1) * (2 * sxy + C2)) / ((mx2 + my2 + C1) * (sxx + syy + C2))


def ssim_loss(x: jax.Array, y: jax.Array, *, window: int, padding: str = "valid") -> jax.Array:
  """Scalar 1 − mean SSIM over (B, H', W', C) (the reference's `my_SSIMLoss`: 'valid')."""
  return 1.0 - jnp.mean(ssim_map(x, y, window=window, padding=padding))
