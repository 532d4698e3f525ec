"""Continuous-time log-SNR schedules of the reference (`models/ANDi/diffusion.py::my_VPSDE`).

t in [0, 1] (0 = clean, 1 = pure noise); λ(t) = log(α_t² / σ_t²), α_t² + σ_t² = 1. Everything is
float32, as in the reference (its constants are float32 tensors), because ANDi's score is a
difference of nearly equal float32 numbers (spec `methods/andi.md` §4 item 6).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.errors import ConfigError


def logsnr_cosine(t, logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> jnp.ndarray:
  """λ(t) = -2 log tan(t_min + t (t_max - t_min)), clipped so that λ(0) = max and λ(1) = min."""
  t_min = jnp.arctan(jnp.exp(jnp.float32(-0.5 * logsnr_max)))
  t_max = jnp.arctan(jnp.exp(jnp.float32(-0.5 * logsnr_min)))
  t = jnp.asarray(t, jnp.float32)
  return -2.0 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))


def logsnr_cosine_shifted(t, logsnr_min: float = -15.0, logsnr_max: float = 15.0,
                          image_d: int = 224, noise_d: int = 56) -> jnp.ndarray:
  """Cosine schedule shifted for resolution: λ(t) + 2 log(noise_d / image_d).

  image_d is the model input size (config.data.image_size); noise_d = 56 is a constructor
  default of the reference. λ(0) = 12.227411, λ(1) = -17.772577 at image_d = 224.
  """
  return logsnr_cosine(t, logsnr_min, logsnr_max) + float(2.0 * np.log(noise_d / image_d))


def logsnr_classic(t) -> jnp.ndarray:
  """The reference's unused 'classic' schedule λ(t) = -log(expm1(1e-4 + 10 t²))."""
  t = jnp.asarray(t, jnp.float32)
  return -jnp.log(jnp.expm1(1e-4 + 10.0 * t ** 2))


def logsnr_schedule(diffusion_config, image_size: int) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """λ(t) selected by config.diffusion.{schedule, shift, logsnr_min, logsnr_max, noise_d}."""
  name = diffusion_config.schedule
  if name == "classic":
    return logsnr_classic
  if name != "cosine":
    raise ConfigError(f"diffusion.schedule {name!r}: expected 'cosine' or 'classic'")
  lo, hi = diffusion_config.logsnr_min, diffusion_config.logsnr_max
  if diffusion_config.shift:
    noise_d = diffusion_config.get("noise_d", 56)
    return lambda t: logsnr_cosine_shifted(t, lo, hi, image_size, noise_d)
  return lambda t: logsnr_cosine(t, lo, hi)


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """α = sqrt(sigmoid(λ)), σ = sqrt(sigmoid(-λ))."""
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def reverse_time_grid(num_steps: int) -> np.ndarray:
  """The reference's reverse-time grid: float32 torch.linspace(1, 1/N, N) followed by 0.

  Shape (N + 1,), grid[k] ≈ (N - k) / N. torch.linspace's definition is reproduced (float32
  step; the first half counted from the start, the second half back from the end); torch's
  vectorised CPU kernel can differ from it by one ulp at some k.
  """
  n = num_steps
  start, end = np.float32(1.0), np.float32(1.0 / n)
  if n == 1:
    return np.array([start, 0.0], np.float32)
  step = (end - start) / np.float32(n - 1)
  k = np.arange(n)
  grid = np.where(k < n // 2, start + step * k.astype(np.float32),
                  end - step * (n - 1 - k).astype(np.float32))
  return np.append(grid.astype(np.float32), np.float32(0.0))
