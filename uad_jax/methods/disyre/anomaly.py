"""The 'dag' synthetic anomaly of the training feed (spec `methods/disyre.md` §2.4), numpy/scipy.

Per sample of an augmented clean batch: a location inside the brain, a random shape (square,
sphere, or a mask of an optional shape dataset), a foreign-patch texture blended into the shape
(FPI, severity α_tex) and an intensity-bias shift restricted to some intensity classes of the
k-means codebook (severity α_bias = the realised largest change). The label of the sample comes
from max(α_tex, α_bias) (`severity.py`).

Shape sizes are the reference's for a 64-pixel anomaly patch and scale with the configured patch
(`anom_patch_size / 64`), so that the 2 mm demo grid (32-pixel patches) draws the same shapes
relative to the brain.
"""

import csv
import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
from scipy import ndimage

from uad_jax.errors import ConfigError, DataError
from uad_jax.methods.disyre.augment import centred_grid, foreground_crop, random_crop_or_pad
from uad_jax.methods.disyre.augment import rotate_coords, uniform_between

REFERENCE_ANOMALY_PATCH = 64   # the reference's data.anom_patch_size, which its shape sizes fit


@dataclasses.dataclass(frozen=True)
class AnomalyConfig:
  """patch: anomaly patch size P_a (64 in the paper); codebook: the 5 intensity centres;
  p_anomaly: probability of each of the texture and the bias step; shape_masks: binary 2-D
  masks of the shape dataset (None: squares and spheres only); no_anom_in_background: zero the
  shape where the clean slice is exactly 0."""
  patch: int
  codebook: np.ndarray
  p_anomaly: float = 1.0
  shape_masks: Optional[tuple] = None
  no_anom_in_background: bool = True

  def scaled(self, value: int) -> int:
    """A reference size for 64-pixel patches at this patch size (at least 1)."""
    return max(1, int(round(value * self.patch / REFERENCE_ANOMALY_PATCH)))


# -- shapes -------------------------------------------------------------------------------------

def warp_mask(mask: np.ndarray, size: int, rotation_p: float, scale: float,
              rng: np.random.Generator) -> np.ndarray:
  """A mask resampled onto a size×size grid around its centre (`augment_spatial_2` without
  elastic deformation and crop): w.p. rotation_p a rotation U(±15°), the scale always applied,
  cubic spline with 'nearest' borders, then binarised > 0.5. float64."""
  coords = centred_grid(size)
  if rng.random() < rotation_p:
    coords = rotate_coords(coords, rng.uniform(-np.pi / 12, np.pi / 12))
  coords *= scale
  coords -= coords.mean(axis=(1, 2), keepdims=True)
  for d in range(2):
    coords[d] += mask.shape[d] / 2.0 - 0.5
  warped = ndimage.map_coordinates(mask.astype(np.float64), coords, order=3, mode="nearest")
  return (warped > 0.5).astype(np.float64)


def square_shape(cfg: AnomalyConfig, rng: np.random.Generator) -> np.ndarray:
  """A rectangle of side 2·(a_d // 2), a_d ∈ [10, 44] per axis (inclusive), at a random centre,
  then warped (rotation w.p. 0.5, scale 1)."""
  p = cfg.patch
  mask = np.zeros((p, p))
  bounds = []
  for _ in range(2):
    a = int(rng.integers(cfg.scaled(10), cfg.scaled(44) + 1))
    c = int(rng.integers(a // 2, p - a // 2 + 1))
    bounds.append(slice(c - a // 2, c + a // 2))
  mask[tuple(bounds)] = 1.0
  return warp_mask(mask, p, 0.5, 1.0, rng)


def sphere_shape(cfg: AnomalyConfig, rng: np.random.Generator) -> np.ndarray:
  """A disc of radius a // 2, a ∈ [10, 44], centre per axis in [a//2 + 10, P - a//2 - 10] on the
  reference's grid linspace(0, P, P) (spacing P/(P-1), spec §4.12). Not warped."""
  p, margin = cfg.patch, cfg.scaled(10)
  a = int(rng.integers(cfg.scaled(10), cfg.scaled(44) + 1))
  centre = [int(rng.integers(a // 2 + margin, p - a // 2 - margin + 1)) for _ in range(2)]
  grid = np.linspace(0, p, p)
  dist = (grid[:, None] - centre[0]) ** 2 + (grid[None, :] - centre[1]) ** 2
  return (dist <= (a // 2) ** 2).astype(np.float64)


def dataset_shape(cfg: AnomalyConfig, rng: np.random.Generator) -> np.ndarray:
  """A random mask of the shape dataset, warped with a rotation (always) and a scale drawn from
  U(0.5, 1) or U(1, 0.75) w.p. 0.5 each (the reference's ranges; s < 1 enlarges the shape)."""
  mask = cfg.shape_masks[int(rng.integers(len(cfg.shape_masks)))]
  scale = rng.uniform(0.5, 1.0) if rng.random() < 0.5 else uniform_between(rng, 1.0, 0.75)
  return warp_mask(mask, cfg.patch, 1.0, scale, rng)


def random_shape(cfg: AnomalyConfig, rng: np.random.Generator) -> np.ndarray:
  """A P_a×P_a shape in [0, 1] from a generator chosen uniformly, then w.p. 0.7 blurred with an
  integer σ uniform on {0, ..., 4} (σ = 0: unchanged; spec §4.21), σ range scaled with P_a."""
  generators = [square_shape, sphere_shape]
  if cfg.shape_masks:
    generators.append(dataset_shape)
  shape = generators[int(rng.integers(len(generators)))](cfg, rng)
  if rng.random() < 0.7:
    sigma = int(rng.uniform(0, cfg.scaled(5)))
    if sigma > 0:
      shape = ndimage.gaussian_filter(shape, sigma, mode="reflect", truncate=4.0)
  return shape


def load_shape_masks(csv_path: str) -> tuple:
  """Binary 2-D masks of a shape dataset: CSV with column `Path` of 3-D NIfTI masks; each is
  binarised (> 0) and cut at the middle index of its SECOND axis ((X, Y, Z) -> (X, Z)), as the
  reference does (spec §4.11)."""
  import nibabel as nib
  path = Path(csv_path)
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise DataError(f"data.shape_dataset {csv_path}: cannot read ({e})") from e
  if not rows or "Path" not in rows[0]:
    raise DataError(f"data.shape_dataset {csv_path}: needs a column 'Path' and at least one row")
  masks = []
  for row in rows:
    file = Path(row["Path"])
    file = file if file.is_absolute() else path.parent / file
    try:
      volume = np.asarray(nib.load(str(file)).dataobj)
    except Exception as e:  # nibabel raises several types for unreadable files
      raise DataError(f"{file} (data.shape_dataset {csv_path}): cannot read NIfTI ({e})") from e
    if volume.ndim != 3:
      raise DataError(f"{file}: shape mask must be 3-D, got shape {volume.shape}")
    masks.append((volume[:, volume.shape[1] // 2, :] > 0).astype(np.float64))
  return tuple(masks)


# -- location -----------------------------------------------------------------------------------

def anomaly_centre(data: np.ndarray, half: int, rng: np.random.Generator) -> tuple[int, int]:
  """A uniformly chosen foreground pixel (data > 0) with half ≤ row, col < S - half, or, when
  there is none, randint(half, S - half) per axis (inclusive)."""
  s = data.shape[0]
  inner = data[half:s - half, half:s - half] > 0
  rows, cols = np.nonzero(inner)
  if rows.size:
    k = int(rng.integers(rows.size))
    return int(rows[k]) + half, int(cols[k]) + half
  return int(rng.integers(half, s - half + 1)), int(rng.integers(half, s - half + 1))


def place_shape(shape: np.ndarray, data: np.ndarray, centre, no_anom_in_background: bool):
  """The P_a×P_a shape in a zero slice at rows/cols [c - P_a/2, c + P_a/2), zeroed where the
  clean slice is exactly 0 (when no_anom_in_background). float64 (S, S)."""
  half = shape.shape[0] // 2
  full = np.zeros(data.shape, np.float64)
  r, c = centre
  full[r - half:r + half, c - half:c + half] = shape
  if no_anom_in_background:
    full[data == 0] = 0.0
  return full


# -- texture (foreign-patch interpolation) ------------------------------------------------------

def fpi_blend(data: np.ndarray, shape: np.ndarray, centre, foreign_patch: np.ndarray,
              alpha: float):
  """Blend a foreign patch into the shape (`FPI.__call__`, one sample, draws injected).

  data: (S, S) float32 clean slice; shape: (S, S) float64; foreign_patch: (P_a, P_a) float32
  placed at [c - P_a/2, c + P_a/2) in a zero float32 slice F. Inside m = shape > 0 (if not
  empty) F is mean-matched to the clean slice and clipped: the reference requests 'minmax' but
  its constructor maps every truthy value to 'mean' (spec §4.6). Returns
  (data_c = data·(1 - α·shape) + F·α·shape float64, F float32, α or 0 if nothing changed).
  """
  half = foreign_patch.shape[0] // 2
  big = np.zeros(data.shape, np.float32)
  r, c = centre
  big[r - half:r + half, c - half:c + half] = foreign_patch
  m = shape > 0
  if m.any():
    big = np.clip(big - big[m].mean() + data[m].mean(), 0, 1)
  corrupted = data * (1 - alpha * shape) + big * alpha * shape
  return corrupted, big, (0.0 if np.array_equal(corrupted, data) else alpha)


def foreign_patch(batch: np.ndarray, index: int, size: int, rng: np.random.Generator):
  """A random P_a×P_a crop (crop/pad rule of the spatial augmentation) of the foreground box of
  another slice of the same batch, chosen uniformly (itself when the batch has one slice).

  Replaces the reference's per-worker FIFO cache of 512 patches from earlier batches, whose
  contents depend on worker scheduling: drawing from the current batch keeps the feed a pure
  function of (batch, Generator), so resumed and re-sharded runs see the same anomalies.
  """
  others = [j for j in range(len(batch)) if j != index] or [index]
  source = batch[others[int(rng.integers(len(others)))]]
  return random_crop_or_pad(foreground_crop(source), size, rng).astype(np.float32)


# -- intensity bias -----------------------------------------------------------------------------

def quantise(x: np.ndarray, codebook: np.ndarray) -> np.ndarray:
  """Index of the nearest codebook value of every pixel (scipy.cluster.vq.vq; first on ties)."""
  return np.argmin(np.abs(x[..., None] - np.asarray(codebook, np.float64)), axis=-1)


def bias_corruption(corrupted: np.ndarray, shape: np.ndarray, codebook: np.ndarray,
                    alpha: float, sign: float, u: np.ndarray):
  """Intensity-bias shift (`BiasCorruption.__call__`, one sample, draws injected).

  Class k of the codebook is selected iff u_k < n_k / (Σn + 1000), n_k = pixels of class k
  inside shape > 0 (the reference's +1000, spec §4.7); none selected -> all. The indicator of
  the selected classes, blurred with σ = 1, times the shape is the bias map B;
  x_b = clip(x + sign·α·B, 0, 1). Returns (x_b, B, realised α_bias = max |x - x_b|), float64.
  """
  classes = quantise(corrupted, codebook)
  inside = shape > 0
  counts = np.array([np.sum(inside & (classes == k)) for k in range(len(codebook))])
  selected = u < counts / (counts.sum() + 1000)
  if not selected.any():
    selected[:] = True
  indicator = selected[classes].astype(np.float64)
  bias_map = shape * ndimage.gaussian_filter(indicator, 1.0, mode="reflect", truncate=4.0)
  out = np.clip(corrupted + sign * alpha * bias_map, 0, 1)
  return out, bias_map, float(np.max(np.abs(corrupted - out)))


# -- the whole corruption -----------------------------------------------------------------------

def dag_anomalies(batch: np.ndarray, cfg: AnomalyConfig, rng: np.random.Generator):
  """Clean patches (B, S, S) float32 -> (corrupted (B, S, S) float32, α_tex (B,), α_bias (B,)).

  Per sample: centre, shape, FPI texture (w.p. p_anomaly), intensity bias (w.p. p_anomaly).
  """
  if batch.shape[1] < cfg.patch:
    raise ConfigError(f"anomaly patch {cfg.patch} is larger than the training patch "
                      f"{batch.shape[1]}")
  corrupted = np.empty_like(batch)
  alpha_tex = np.zeros(len(batch))
  alpha_bias = np.zeros(len(batch))
  for b, data in enumerate(batch):
    centre = anomaly_centre(data, cfg.patch // 2, rng)
    shape = place_shape(random_shape(cfg, rng), data, centre, cfg.no_anom_in_background)
    x = data.astype(np.float64)
    if rng.random() < cfg.p_anomaly:
      fp = foreign_patch(batch, b, cfg.patch, rng)
      x, _, alpha_tex[b] = fpi_blend(data, shape, centre, fp, rng.random())
    if rng.random() < cfg.p_anomaly:
      sign = 1.0 if rng.random() < 0.5 else -1.0
      x, _, alpha_bias[b] = bias_corruption(x, shape, cfg.codebook, rng.random(), sign,
                                            rng.random(len(cfg.codebook)))
    corrupted[b] = x
  return corrupted, alpha_tex, alpha_bias
