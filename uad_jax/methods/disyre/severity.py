"""Severity schedule of DISYRE: corruption severity α ∈ [0, 1] -> integer timestep label.

The reference reuses a VP-SDE's discrete schedule only as a lookup table (spec
`methods/disyre.md` §2.5): β = linspace(β_min/N, β_max/N, N), s_i = sqrt(Π_{j≤i}(1 - β_j)),
and the label of a sample is argmin_i |s_i - α| (first index on ties): strong corruption ->
small label, α = 0 -> N - 1. Host-side numpy (labels are part of the training feed).
"""

import numpy as np

from uad_jax.errors import ConfigError


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace in float32 as its CPU kernel computes it: start + i·step for the first
  half, end - (steps - 1 - i)·step for the second (exact end points, symmetric rounding)."""
  if steps == 1:
    return np.array([start], np.float32)
  start32, end32 = np.float32(start), np.float32(end)
  step = (end32 - start32) / np.float32(steps - 1)
  i = np.arange(steps)
  half = steps // 2
  out = np.where(i < half, start32 + step * i.astype(np.float32),
                 end32 - step * (steps - 1 - i).astype(np.float32))
  return out.astype(np.float32)


def sqrt_alphas_cumprod(num_latents: int, beta_min: float, beta_max: float) -> np.ndarray:
  """s_i, i = 0..N-1, float32, monotone decreasing (s_0 ≈ 0.9995, s_99 ≈ 0.0045 at N = 100)."""
  betas = torch_linspace_float32(beta_min / num_latents, beta_max / num_latents, num_latents)
  return np.sqrt(np.cumprod(np.float32(1.0) - betas, dtype=np.float32)).astype(np.float32)


def schedule_of(config) -> np.ndarray:
  """`sqrt_alphas_cumprod` of config.diffusion.{num_latents, beta_min, beta_max}."""
  d = config.diffusion
  return sqrt_alphas_cumprod(d.num_latents, d.beta_min, d.beta_max)


def severity_labels(alpha_texture: np.ndarray, alpha_bias: np.ndarray,
                    schedule: np.ndarray) -> np.ndarray:
  """Labels (B,) int32 of per-sample severities α = max(α_tex, α_bias) taken in float32.

  The reference stacks both severities as float32 tensors, takes their max and the argmin of
  |s_i - α| in float32; argmin returns the first index on ties, like torch.
  """
  alpha = np.maximum(np.asarray(alpha_texture, np.float32), np.asarray(alpha_bias, np.float32))
  return np.argmin(np.abs(schedule[None, :] - alpha[:, None]), axis=1).astype(np.int32)


def scoring_timesteps(num_latents: int, n_steps: int) -> np.ndarray:
  """Conditionings of the scoring ensemble: arange(N, 0, -N // n_steps) - 1 (N = 100, 4 steps:
  99, 74, 49, 24 — from nearly clean to moderately corrupted; as in the reference a step that
  does not divide N gives one more entry, e.g. 3 -> 99, 66, 33, 0). int32."""
  if not 1 <= n_steps <= num_latents:
    raise ConfigError(f"sampling.n_steps {n_steps}: must be in [1, {num_latents}]")
  return (np.arange(num_latents, 0, -(num_latents // n_steps)) - 1).astype(np.int32)
