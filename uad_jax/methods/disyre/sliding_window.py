"""Sliding-window inference of the reference (`models/Disyre/sliding_window_inference.py`).

A slice larger than the network's P×P input is cut into overlapping windows (step int(f·P),
f = 0.25 in the paper, i.e. 75 % overlap), each window is predicted, weighted by a Gaussian
importance map and folded back; the weighted sum is divided by the summed weights. Slices are
first zero-padded (symmetric, in the network's [-1, 1] space, i.e. intensity 0.5: a reference
quirk, spec §4.15) so that the windows tile them exactly. Everything about the window layout is
static Python (shapes are known at trace time); the arrays are NHWC.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from uad_jax.errors import ConfigError


def importance_map(patch: int) -> np.ndarray:
  """(P, P) float32: max(g_i g_j, 1e-3), g_i = exp(-(i - (P-1)/2)² / (2 (P/8)²)), as MONAI's
  compute_importance_map('gaussian', sigma_scale=0.125) computes it in float32."""
  x = np.arange(-(patch - 1) / 2.0, (patch - 1) / 2.0 + 1, dtype=np.float32)
  sigma = np.float32(0.125 * patch)
  g = np.exp(x ** 2 / (np.float32(-2.0) * sigma ** 2)).astype(np.float32)
  return np.maximum(g[:, None] * g[None, :], np.float32(1e-3))


def window_step(patch: int, step_fraction: float) -> int:
  """Window step in pixels: int(step_fraction · P) (the reference's `overlap` argument)."""
  step = int(step_fraction * patch)
  if step < 1:
    raise ConfigError(f"window step fraction {step_fraction} of a {patch}-pixel window is < 1 px")
  return step


def padded_size(size: int, patch: int, step: int) -> int:
  """max(P, d), grown to P + k·step so that the windows tile it."""
  padded = max(patch, size)
  if padded != patch and (padded - patch) % step:
    padded += step - (padded - patch) % step
  return padded


@dataclasses.dataclass(frozen=True)
class WindowLayout:
  """Where the windows of an (H, W) slice lie.

  pad: ((before, after) rows, (before, after) cols) of the zero padding; origins: (row, col) of
  every window in the padded slice, row-major; patch: P; weights: (P, P) importance map;
  normaliser: (H', W') float32 sum of the placed weights (never 0: weights ≥ 1e-3).
  """
  size: tuple[int, int]
  patch: int
  pad: tuple[tuple[int, int], tuple[int, int]]
  origins: tuple[tuple[int, int], ...]
  weights: np.ndarray
  normaliser: np.ndarray

  @property
  def num_windows(self) -> int:
    return len(self.origins)


def window_layout(height: int, width: int, patch: int, step: int) -> WindowLayout:
  """The windows of an (height, width) slice for a P-pixel network with the given step."""
  padded = [padded_size(d, patch, step) for d in (height, width)]
  pad = tuple(((p - d) // 2, p - d - (p - d) // 2) for p, d in zip(padded, (height, width)))
  origins = tuple((r, c) for r in range(0, padded[0] - patch + 1, step)
                  for c in range(0, padded[1] - patch + 1, step))
  weights = importance_map(patch)
  normaliser = np.zeros(padded, np.float32)
  for r, c in origins:   # in window order, float32, as the reference accumulates its count map
    normaliser[r:r + patch, c:c + patch] += weights
  return WindowLayout((height, width), patch, pad, origins, weights, normaliser)


def extract_windows(x: jnp.ndarray, layout: WindowLayout) -> jnp.ndarray:
  """(B, H, W, C) -> (B, num_windows, P, P, C): the windows of the zero-padded slices."""
  x = jnp.pad(x, ((0, 0),) + layout.pad + ((0, 0),))
  p = layout.patch
  return jnp.stack([x[:, r:r + p, c:c + p] for r, c in layout.origins], axis=1)


def fold_windows(predictions: jnp.ndarray, layout: WindowLayout) -> jnp.ndarray:
  """(..., num_windows, P, P, C) window predictions -> (..., H, W, C) blended slices.

  Σ_w place(f(w)·G) / Σ_w place(G), cropped to the unpadded size.
  """
  lead, (p, c) = predictions.shape[:-4], (layout.patch, predictions.shape[-1])
  weighted = predictions * jnp.asarray(layout.weights)[:, :, None]
  out = jnp.zeros(lead + layout.normaliser.shape + (c,), predictions.dtype)
  for k, (r, col) in enumerate(layout.origins):
    out = out.at[..., r:r + p, col:col + p, :].add(weighted[..., k, :, :, :])
  out = out / jnp.asarray(layout.normaliser)[:, :, None]
  (top, _), (left, _) = layout.pad
  h, w = layout.size
  return out[..., top:top + h, left:left + w, :]
