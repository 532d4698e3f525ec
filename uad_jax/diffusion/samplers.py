"""Reverse-time samplers of the v-prediction diffusion (reference `models/ANDi/diffusion.py`).

Used for monitoring previews (spec `methods/andi.md` §2.9). Time runs on the grid
`reverse_time_grid(K)` = linspace(1, 1/K, K) ++ [0]; every step (t -> s) evaluates the network
once. The steps run in one `lax.scan`; the noise of step i comes from fold_in(key, i).
"""

from typing import Callable

import jax
import jax.numpy as jnp

from uad_jax.diffusion.schedule import alpha_sigma, reverse_time_grid

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (z, t (B,)) -> v̂
NoiseFn = Callable[[jax.Array, tuple], jnp.ndarray]  # (key, shape) -> noise
LogsnrFn = Callable[[jnp.ndarray], jnp.ndarray]


def posterior_coefficients(logsnr_t, logsnr_s):
  """Coefficients of the Gaussian posterior q(z_s | z_t, x) for s < t.

  mean = a·z_t + b·x with a = r·α_s/α_t, b = (1 - r)·α_s, r = exp(λ_t - λ_s);
  `var` = (1 - r)·σ_t², the forward transition variance σ²_{t|s} that the reference uses as the
  step's noise variance. α_s/α_t is sqrt((1 + e^-λ_t) / (1 + e^-λ_s)) and 1 - r = -expm1(λ_t - λ_s),
  evaluated as in the reference (float32). Returns (a, b, var, alpha_t, sigma_t).
  """
  alpha_t, sigma_t = alpha_sigma(logsnr_t)
  alpha_s, _ = alpha_sigma(logsnr_s)
  ratio = jnp.sqrt((1.0 + jnp.exp(-logsnr_t)) / (1.0 + jnp.exp(-logsnr_s)))
  r = jnp.exp(logsnr_t - logsnr_s)
  one_minus_r = -jnp.expm1(logsnr_t - logsnr_s)
  return r * ratio, one_minus_r * alpha_s, one_minus_r * sigma_t ** 2, alpha_t, sigma_t


def predict_x0(z, v_pred, alpha_t, sigma_t):
  """x̂ = clip(α_t z - σ_t v̂, -1, 1): the clean image implied by a v-prediction."""
  return jnp.clip(alpha_t * z - sigma_t * v_pred, -1.0, 1.0)


def _time_pairs(num_steps: int):
  grid = jnp.asarray(reverse_time_grid(num_steps))
  return grid[:-1], grid[1:], jnp.arange(num_steps)


def ancestral_sample(model_fn: ModelFn, logsnr_fn: LogsnrFn, noise_fn: NoiseFn, key: jax.Array,
                     shape: tuple, num_steps: int) -> jnp.ndarray:
  """Ancestral sampling: z_s = mean(z_t, x̂) + sqrt((1 - r) σ_t²)·noise; returns the last mean.

  noise_fn draws the prior and the per-step noise (pyramid noise for a model trained with it).
  Returns (B, H, W, C) float32 in about [-1, 1].
  """
  prior_key, step_key = jax.random.split(key)

  def step(carry, pair):
    z, _ = carry
    t, s, i = pair
    a, b, var, alpha_t, sigma_t = posterior_coefficients(logsnr_fn(t), logsnr_fn(s))
    x0 = predict_x0(z, model_fn(z, jnp.full((shape[0],), t)), alpha_t, sigma_t)
    mean = a * z + b * x0
    z = mean + jnp.sqrt(var) * noise_fn(jax.random.fold_in(step_key, i), shape)
    return (z, mean), None

  z = noise_fn(prior_key, shape)
  (_, mean), _ = jax.lax.scan(step, (z, z), _time_pairs(num_steps))
  return mean


def ddim_sample(model_fn: ModelFn, logsnr_fn: LogsnrFn, noise_fn: NoiseFn, key: jax.Array,
                shape: tuple, num_steps: int) -> jnp.ndarray:
  """Deterministic DDIM: z_s = α_s x̂ + σ_s ε̂, ε̂ = σ_t z + α_t v̂ (noise only in the prior)."""

  def step(z, pair):
    t, s, _ = pair
    alpha_t, sigma_t = alpha_sigma(logsnr_fn(t))
    alpha_s, sigma_s = alpha_sigma(logsnr_fn(s))
    v_pred = model_fn(z, jnp.full((shape[0],), t))
    x0 = predict_x0(z, v_pred, alpha_t, sigma_t)
    eps = sigma_t * z + alpha_t * v_pred
    return alpha_s * x0 + sigma_s * eps, None

  z, _ = jax.lax.scan(step, noise_fn(key, shape), _time_pairs(num_steps))
  return z


SAMPLERS = {"ancestral": ancestral_sample, "ddim": ddim_sample}
