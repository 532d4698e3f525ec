"""Scanner recipes of the demo cohort: from normalised images to int16 "scanner units".

Each scanner is a fixed recipe (demo_cohort.md "Scanners"): contrast gamma, a smooth
multiplicative bias field (a fixed coil pattern plus a per-subject part), a resolution difference
(Gaussian blur, in voxels, stronger along the slice axis on one scanner), an intensity scale and
Rician noise. Sites recruit different age ranges on purpose, so scanner and age are confounded as
in real multi-site cohorts.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from uad_jax.data.demo import anatomy as synth_anatomy

CONTRASTS = ("T1w", "T2w")
_BIAS_DEGREE = 2  # Legendre polynomials up to this degree per axis
_BIAS_SPAN_MM = 100.0  # coordinate normalisation of the bias polynomials
_SUBJECT_BIAS_WEIGHT = 0.35  # share of the per-subject part of the bias field
_INT16_MAX = np.iinfo(np.int16).max


@dataclasses.dataclass(frozen=True)
class ScannerRecipe:
  """One site's acquisition.

  age_range: recruitment range (years). wm_units: white-matter intensity in scanner units per
  contrast. gamma: contrast exponent per contrast (applied to WM-normalised images).
  bias_amplitude: peak relative bias (exp(+-amplitude)). bias_seed: fixes the coil pattern.
  noise_fraction: Rician sigma relative to the WM intensity. blur_vox: Gaussian sigma per axis.
  """
  name: str
  description: str
  age_range: tuple[float, float]
  wm_units: dict
  gamma: dict
  bias_amplitude: float
  bias_seed: int
  noise_fraction: float
  blur_vox: tuple[float, float, float]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


SCANNERS = (
    ScannerRecipe("S1", "1.5 T, paediatric and young-adult site, thick slices", (6.0, 35.0),
                  {"T1w": 420.0, "T2w": 310.0}, {"T1w": 0.85, "T2w": 1.1}, 0.12, 101, 0.035,
                  (0.45, 0.45, 0.7)),
    ScannerRecipe("S2", "3 T, adult site, sharp", (20.0, 65.0),
                  {"T1w": 1800.0, "T2w": 1150.0}, {"T1w": 1.0, "T2w": 0.9}, 0.2, 202, 0.015,
                  (0.0, 0.0, 0.0)),
    ScannerRecipe("S3", "3 T, ageing-study site, strong bias field", (50.0, 89.0),
                  {"T1w": 2900.0, "T2w": 700.0}, {"T1w": 1.15, "T2w": 1.0}, 0.25, 303, 0.025,
                  (0.3, 0.3, 0.3)),
)
SCANNERS_BY_NAME = {s.name: s for s in SCANNERS}


def _legendre(u: np.ndarray) -> np.ndarray:
  """(n,) -> (n, _BIAS_DEGREE + 1) Legendre polynomials of degree 0..2."""
  return np.stack([np.ones_like(u), u, 0.5 * (3.0 * u ** 2 - 1.0)], axis=1)


def bias_field(recipe: ScannerRecipe, axes_mm, rng: np.random.Generator,
               brain: np.ndarray) -> np.ndarray:
  """Smooth multiplicative field on the block, exp(+-bias_amplitude) at its peak in the brain."""
  n = _BIAS_DEGREE + 1
  coil = np.random.default_rng(recipe.bias_seed).standard_normal((n, n, n))
  coefficients = coil + _SUBJECT_BIAS_WEIGHT * rng.standard_normal((n, n, n))
  coefficients[0, 0, 0] = 0.0  # the global gain is separate
  bases = [_legendre((np.asarray(a, np.float64) - c) / _BIAS_SPAN_MM)
           for a, c in zip(axes_mm, synth_anatomy.CENTRE_MM)]
  log_field = np.einsum("ijk,xi,yj,zk->xyz", coefficients, *bases, optimize=True)
  log_field *= recipe.bias_amplitude / np.abs(log_field[brain]).max()
  return np.exp(log_field).astype(np.float32)


def acquire(image: np.ndarray, brain: np.ndarray, axes_mm, recipe: ScannerRecipe,
            contrast: str, rng: np.random.Generator) -> np.ndarray:
  """Normalised image (WM = 1, 0 outside `brain`) -> int16 scanner units on the block.

  Background is exactly 0 and every brain voxel is >= 1, so the volume minimum is 0 and
  "brain" downstream (voxels above the minimum) is exactly `brain` (data.md §5.2).
  """
  signal = np.power(image, np.float32(recipe.gamma[contrast]))
  if any(recipe.blur_vox):
    signal = ndimage.gaussian_filter(signal, recipe.blur_vox)
  gain = recipe.wm_units[contrast] * float(rng.uniform(0.95, 1.05))
  signal = signal * bias_field(recipe, axes_mm, rng, brain) * np.float32(gain)
  # Rician magnitude noise: |s + n1 + i n2| is non-negative by construction.
  sigma = np.float32(recipe.noise_fraction * recipe.wm_units[contrast])
  inside = signal[brain]
  real = inside + sigma * rng.standard_normal(inside.shape, dtype=np.float32)
  imaginary = sigma * rng.standard_normal(inside.shape, dtype=np.float32)
  magnitude = np.sqrt(real ** 2 + imaginary ** 2)
  out = np.zeros(image.shape, np.int16)
  out[brain] = np.clip(np.rint(magnitude), 1, _INT16_MAX).astype(np.int16)
  return out
