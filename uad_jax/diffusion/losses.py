"""Training loss of the v-prediction diffusion models (`models/ANDi/diffusion.py::vpred_loss`)."""

from typing import Callable

import jax.numpy as jnp

from uad_jax.diffusion.schedule import alpha_sigma


def vpred_losses(model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray], x: jnp.ndarray,
                 t: jnp.ndarray, noise: jnp.ndarray,
                 logsnr_fn: Callable[[jnp.ndarray], jnp.ndarray]) -> jnp.ndarray:
  """Per-sample ε-space MSE of a v-prediction network (spec `methods/andi.md` §2.5).

  x: clean images (B, H, W, C) in [-1, 1]; t: (B,) in [0, 1); noise: ε, same shape as x;
  model_fn(z, t) -> v̂. z = α_t x + σ_t ε, ε̂ = σ_t z + α_t v̂, loss_b = mean_pixels((ε̂ - ε)²),
  i.e. α_t²·|v̂ - v|² with v = α_t ε - σ_t x (no other weighting). Returns (B,) float32.
  """
  alpha, sigma = alpha_sigma(logsnr_fn(t))
  alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
  z = alpha * x + sigma * noise
  v_pred = model_fn(z, t)
  eps_pred = sigma * z + alpha * v_pred
  return jnp.mean((eps_pred - noise) ** 2, axis=(1, 2, 3))
