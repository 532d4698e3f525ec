"""Lesion-wise detection (not in the reference): lesions hit and false-positive components.

Components are 26-connected (3×3×3 structuring element) in the `(H, W, Z)` volume.
- A lesion (component of the mask) is *hit* at threshold t when at least one of its voxels is
  predicted (`score > t`), i.e. when its maximum score exceeds t; keeping each lesion's maximum
  gives the hits at every threshold without keeping the volume.
- A *false-positive component* is a component of the prediction `score > t` that touches no
  lesion voxel; it needs the prediction, so it is counted only at thresholds known before the
  volumes stream by (the calibrated `FPR-<fpr>` thresholds).
"""

import numpy as np
import scipy.ndimage

_STRUCTURE = np.ones((3, 3, 3), bool)


def _bounding_box(flat_indices, shape) -> tuple[slice, ...] | None:
  """Bounding box (slices) of voxels given by flat indices into `shape`; None if empty."""
  if flat_indices.size == 0:
    return None
  coords = np.unravel_index(flat_indices, shape)
  return tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)


class LesionComponents:
  """The 26-connected lesions of one mask, labelled once and reused for raw and filtered maps.

  Attributes:
    count: number of lesions.
    box: slices of the lesions' bounding box (None without lesion).
    ids: (box shape) int32 component ids, 0 outside lesions.
  """

  def __init__(self, labels: np.ndarray):
    self.box = _bounding_box(np.flatnonzero(labels), labels.shape)
    if self.box is None:
      self.ids, self.count = np.zeros((0, 0, 0), np.int32), 0
    else:
      self.ids, self.count = scipy.ndimage.label(labels[self.box], structure=_STRUCTURE)

  def max_scores(self, scores: np.ndarray) -> np.ndarray:
    """(count,) maximum score of each lesion (same dtype as scores)."""
    out = np.full(self.count, -np.inf, scores.dtype)
    if self.count:
      inside = self.ids > 0
      np.maximum.at(out, self.ids[inside] - 1, scores[self.box][inside])
    return out


def hits(max_scores: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
  """(T,) number of lesions whose maximum score is above each cutoff."""
  return (max_scores[None, :] > cutoffs[:, None]).sum(axis=1)


def false_positive_components(scores: np.ndarray, labels: np.ndarray, cutoff,
                              above_zero: np.ndarray | None = None) -> int:
  """Components of `scores > cutoff` (26-connected) that contain no lesion voxel.

  Args:
    scores: (H, W, Z) map; labels: (H, W, Z) bool lesion mask; cutoff: scalar of the scores'
      dtype. above_zero: optional flat indices of the nonzero voxels, to find the predicted
      voxels without scanning the volume when cutoff >= 0.
  """
  flat = scores.ravel()
  if above_zero is not None and cutoff >= 0:
    predicted = above_zero[flat[above_zero] > cutoff]
  else:
    predicted = np.flatnonzero(flat > cutoff)
  box = _bounding_box(predicted, scores.shape)
  if box is None:
    return 0
  pred = scores[box] > cutoff
  ids, n = scipy.ndimage.label(pred, structure=_STRUCTURE)
  touching = np.unique(ids[labels[box] & pred])
  return int(n - touching.size)
