"""IterMask's random training masks (`models/IterMask/masking.py::gen_mask`), on the host.

Per slice, clusters of 4/8/16-pixel squares are hidden around a random brain pixel (spec
`methods/itermask.md` §2.4): a Gaussian with a random covariance, in one of two spreads (wide
with probability 2/3, narrow 1/3), weights the brain pixels; square corners take their row from
one weighted draw of brain pixels and their column from an independent second draw (so corners
need not lie in the brain); squares are anchored at their top-left corner and clipped at the
border. The reference's RNG streams (Python `random` and NumPy's global state) cannot be
matched, so one `numpy.random.Generator` draws the same distribution in the same order.

`scale` (pixels per reference pixel; the reference's geometry is 1 mm, 240×240) resizes the
squares and the Gaussian's spread in pixels, so a 2 mm grid (scale 0.5) hides the same anatomy
as the reference; scale 1 is the reference exactly. The number of squares does not change.
"""

import numpy as np

# Reference constants: grid spacing per reference pixel of the wide (mgrid[-12:12:0.1]) and
# narrow (mgrid[-48:48:0.4]) mode, square sides in reference pixels (a 4th size, 32, is coded
# but never used), covariance diagonal range, square-count ranges.
WIDE_SPACING, NARROW_SPACING = 0.1, 0.4
SQUARE_SIDES = (4, 8, 16)
COVARIANCE_RANGE = (0.3, 10.0)


def square_sides(scale: float) -> tuple[int, int, int]:
  """Square sides in pixels at `scale`: the reference's 4, 8, 16 (scale 1), rounded, >= 1."""
  return tuple(max(1, int(round(side * scale))) for side in SQUARE_SIDES)


def keep_map(shape: tuple[int, int], rows: np.ndarray, cols: np.ndarray,
             counts: tuple[int, int, int], sides: tuple[int, int, int]) -> np.ndarray:
  """The keep map (1 = keep, 0 = hidden), (H, W) float32, of squares with top-left corners
  (rows[i], cols[i]): the first counts[0] of side sides[0], the next counts[1] of sides[1], the
  rest sides[2]; clipped at the border. Painted with a 2-D difference array (vectorised)."""
  h, w = shape
  n = sum(counts)
  if rows.shape != (n,) or cols.shape != (n,):
    raise ValueError(f"{n} squares need {n} rows and columns, got {rows.shape}, {cols.shape}")
  side = np.repeat(np.asarray(sides, np.int64), counts)
  pad = max(sides)
  diff = np.zeros((h + pad + 1, w + pad + 1), np.int32)
  r, c = rows.astype(np.int64), cols.astype(np.int64)
  np.add.at(diff, (r, c), 1)
  np.add.at(diff, (r + side, c), -1)
  np.add.at(diff, (r, c + side), -1)
  np.add.at(diff, (r + side, c + side), 1)
  covered = diff.cumsum(0).cumsum(1)[:h, :w] > 0
  return (~covered).astype(np.float32)


def sampling_weights(brain_rows: np.ndarray, brain_cols: np.ndarray, seed: int,
                     covariance: np.ndarray, spacing: float) -> np.ndarray:
  """Probabilities (N,) float64 over the brain pixels: N(spacing·(p − p_seed); 0, Σ), normalised
  (the reference's scipy pdf divided by its sum; the pdf's constant cancels)."""
  d = spacing * np.stack([brain_rows - brain_rows[seed], brain_cols - brain_cols[seed]], -1)
  mahalanobis = np.einsum("ni,ij,nj->n", d, np.linalg.inv(covariance), d)
  w = np.exp(-0.5 * (mahalanobis - mahalanobis.min()))
  return w / w.sum()


def gen_mask(brain: np.ndarray, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
  """A random keep map (1 = keep, 0 = hidden), (H, W) float32, for one slice's brain mask.

  brain: (H, W) bool (at the stored, uncropped size: the reference generates at 240×240 and
  crops afterwards). Draws, in the reference's order: mode ∈ {0, 1, 2} (2 = narrow); s11, s22 ~
  U(0.3, 10); s12 = ±U(0, √(s11 s22)); the seed pixel; n4 (wide: [⌊100q⌋, ⌊200q⌋), narrow:
  [⌊5q⌋, ⌊20q⌋), q = √(s11 s22)), n8 ∈ [5, 10), n16 ∈ [3, 10); the row draw and the column draw
  of n4 + n8 + n16 brain pixels. A slice without brain is kept whole.
  """
  brain_rows, brain_cols = np.nonzero(brain)   # row-major, as the reference enumerates them
  if brain_rows.size == 0:
    return np.ones(brain.shape, np.float32)
  narrow = rng.integers(0, 3) == 2
  s11, s22 = rng.uniform(*COVARIANCE_RANGE, size=2)
  q = np.sqrt(s11 * s22)
  s12 = rng.uniform(0.0, q) * (1.0 if rng.integers(0, 2) else -1.0)
  covariance = np.array([[s11, s12], [s12, s22]])
  seed = rng.integers(brain_rows.size)
  low, high = (int(5 * q), int(20 * q)) if narrow else (int(100 * q), int(200 * q))
  counts = (int(rng.integers(low, high)), int(rng.integers(5, 10)), int(rng.integers(3, 10)))
  spacing = (NARROW_SPACING if narrow else WIDE_SPACING) / scale
  p = sampling_weights(brain_rows, brain_cols, seed, covariance, spacing)
  n = sum(counts)
  rows = brain_rows[rng.choice(brain_rows.size, n, p=p)]
  cols = brain_cols[rng.choice(brain_rows.size, n, p=p)]
  return keep_map(brain.shape, rows, cols, counts, square_sides(scale))
