"""Exact value counts of anomaly scores: per volume (sorted once) and pooled over a cohort.

Every metric of the protocol depends on the scores only through counts of voxels above a
threshold, so exact counts per distinct score value reproduce pooled-array computations
(scikit-learn's AP/ROC with ties, FPR quantiles) without keeping the volumes. Exact zeros (the
background, most of a volume) are kept as one count instead of being stored or sorted.
"""

import numpy as np


class SortedScores:
  """The scores of one voxel class of one volume: nonzero values sorted, plus the zero count.

  Attributes:
    nonzero: (n,) sorted scores that are not exactly 0 (float32 in the evaluator).
    zeros: number of voxels of the class whose score is exactly 0 (or -0).
  """

  def __init__(self, nonzero_sorted: np.ndarray, zeros: int):
    self.nonzero = nonzero_sorted
    self.zeros = int(zeros)

  @classmethod
  def from_values(cls, values: np.ndarray) -> "SortedScores":
    values = np.asarray(values).ravel()
    nonzero = values[values != 0]
    return cls(np.sort(nonzero), values.size - nonzero.size)

  @property
  def size(self) -> int:
    return self.nonzero.size + self.zeros

  def count_above(self, cutoffs: np.ndarray) -> np.ndarray:
    """(T,) int64: number of values strictly greater than each cutoff (same dtype as scores)."""
    cutoffs = np.asarray(cutoffs, self.nonzero.dtype)
    above = self.nonzero.size - np.searchsorted(self.nonzero, cutoffs, side="right")
    return above.astype(np.int64) + self.zeros * (cutoffs < 0)

  def order_statistic(self, i: int):
    """The i-th smallest value (0-based) of the class, zeros included."""
    negatives = int(np.searchsorted(self.nonzero, 0, side="left"))
    if i < negatives:
      return self.nonzero[i]
    if i < negatives + self.zeros:
      return self.nonzero.dtype.type(0)
    return self.nonzero[i - self.zeros]

  def quantile_higher(self, q: float):
    """numpy `quantile(values, q, method='higher')`: an actual value of the class."""
    return self.order_statistic(int(np.ceil((self.size - 1) * q)))

  def distinct(self) -> tuple[np.ndarray, np.ndarray]:
    """Distinct nonzero values (ascending) and their counts (int64); zeros not included."""
    return distinct_sorted(self.nonzero)


def distinct_sorted(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct values of a sorted array (ascending) and how often each occurs (int64)."""
  if sorted_values.size == 0:
    return sorted_values, np.zeros(0, np.int64)
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  counts = np.diff(np.r_[starts, sorted_values.size]).astype(np.int64)
  return sorted_values[starts], counts


class ValueHistogram:
  """Exact counts per distinct score value and per class, merged over many volumes.

  Classes are columns (e.g. 0 = negative, 1 = positive voxel). Exact zeros are counted apart
  (`zeros`), so the distinct-value table holds only nonzero scores (the brain, not the
  background). Memory: 4 + 8·C bytes per distinct value; volumes are added as sorted runs and
  merged like a log-structured merge tree (a run is merged when it is at least half as long as
  the run before it), so adding V volumes costs O(total · log V).
  """

  def __init__(self, num_classes: int, dtype=np.float32):
    self.num_classes = num_classes
    self.dtype = np.dtype(dtype)
    self.zeros = np.zeros(num_classes, np.int64)
    self._runs: list[tuple[np.ndarray, np.ndarray]] = []

  def add(self, scores: list[SortedScores]) -> None:
    """Adds one volume: `scores[c]` holds the class-c voxels of that volume."""
    if len(scores) != self.num_classes:
      raise ValueError(f"expected {self.num_classes} classes, got {len(scores)}")
    parts = [s.distinct() for s in scores]
    values = np.concatenate([v for v, _ in parts]).astype(self.dtype, copy=False)
    counts = np.zeros((values.size, self.num_classes), np.int64)
    start = 0
    for c, (v, n) in enumerate(parts):
      counts[start:start + v.size, c] = n
      start += v.size
    for c, s in enumerate(scores):
      self.zeros[c] += s.zeros
    if values.size:
      self._runs.append(_merge_duplicates(values, counts))
    while len(self._runs) > 1 and 2 * self._runs[-1][0].size >= self._runs[-2][0].size:
      (v1, c1), (v2, c2) = self._runs[-2], self._runs.pop()
      self._runs[-1] = _merge_duplicates(np.concatenate([v1, v2]), np.concatenate([c1, c2]))

  @property
  def num_distinct(self) -> int:
    return sum(v.size for v, _ in self._runs)

  @property
  def nbytes(self) -> int:
    return sum(v.nbytes + c.nbytes for v, c in self._runs)

  def table(self) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values ascending (zero included if counted) and counts (V, C) int64."""
    runs = self._runs
    if len(runs) > 1:
      runs = [_merge_duplicates(np.concatenate([v for v, _ in runs]),
                                np.concatenate([c for _, c in runs]))]
      self._runs = runs
    values, counts = runs[0] if runs else (np.zeros(0, self.dtype),
                                            np.zeros((0, self.num_classes), np.int64))
    if self.zeros.any():
      at = int(np.searchsorted(values, 0))
      values = np.insert(values, at, self.dtype.type(0))
      counts = np.insert(counts, at, self.zeros, axis=0)
    return values, counts


def _merge_duplicates(values: np.ndarray, counts: np.ndarray):
  """Sorts (stably: timsort merges presorted runs in linear time) and sums equal values."""
  order = np.argsort(values, kind="stable")
  values, counts = values[order], counts[order]
  starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
  return values[starts], np.add.reduceat(counts, starts, axis=0)
