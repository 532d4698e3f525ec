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

  def table(self) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values ascending (0 included if counted) and their counts (int64), as
    `ValueHistogram.table`."""
    return _insert_zeros(*self.distinct(), self.zeros)

  def count_from(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#values >= q, #values == q) for queries q, zeros included (int64), as
    `ValueHistogram.count_from` (one volume's class: binary searches in the sorted values)."""
    queries = np.asarray(queries, self.nonzero.dtype)
    below = (np.searchsorted(self.nonzero, queries, side="left").astype(np.int64)
             + self.zeros * (queries > 0))
    at_most = (np.searchsorted(self.nonzero, queries, side="right").astype(np.int64)
               + self.zeros * (queries >= 0))
    return self.size - below, at_most - below


def distinct_sorted(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Distinct values of a sorted array (ascending) and how often each occurs (int64)."""
  if sorted_values.size == 0:
    return sorted_values, np.zeros(0, np.int64)
  starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
  counts = np.diff(np.r_[starts, sorted_values.size]).astype(np.int64)
  return sorted_values[starts], counts


def _insert_zeros(values: np.ndarray, counts: np.ndarray, zeros: int):
  """Distinct nonzero values with int64 counts -> the same with the zero count in its place."""
  if not zeros:
    return values, counts
  at = int(np.searchsorted(values, 0))
  return np.insert(values, at, values.dtype.type(0)), np.insert(counts, at, zeros)


class ValueHistogram:
  """Exact count of every distinct nonzero score, merged over many volumes, plus the zeros.

  Exact zeros (the background, most of a volume) are one count (`zeros`), so the table holds
  only brain scores. Memory: 8 bytes per distinct value (float32 value, uint32 count; counts
  switch to int64 if one would overflow). Volumes are added as sorted runs and merged like a
  log-structured merge tree (a run is merged into the one before it once it is at least half as
  long), each merge linear in the runs' length, so adding V volumes costs O(total · log V) and
  at most about twice the final table is held.
  """

  def __init__(self, dtype=np.float32):
    self.dtype = np.dtype(dtype)
    self.zeros = 0
    self._runs: list[tuple[np.ndarray, np.ndarray]] = []

  def add(self, scores: SortedScores) -> None:
    """Adds the scores of one volume (or of one voxel class of it)."""
    values, counts = scores.distinct()
    self.zeros += scores.zeros
    if values.size:
      self._runs.append((values.astype(self.dtype, copy=False), counts.astype(np.uint32)))
    while len(self._runs) > 1 and 2 * self._runs[-1][0].size >= self._runs[-2][0].size:
      later = self._runs.pop()
      self._runs[-1] = _merge_runs(*self._runs[-1], *later)

  @property
  def num_distinct(self) -> int:
    return sum(v.size for v, _ in self._runs)

  @property
  def nbytes(self) -> int:
    return sum(v.nbytes + c.nbytes for v, c in self._runs)

  def count_from(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(#values >= q, #values == q) for ascending queries q, zeros included (int64).

    Queries every run, with chunked prefix sums: no temporary as large as the table (used
    for the negatives of a whole test set, with the few positive scores as queries).
    """
    queries = np.asarray(queries, self.dtype)
    at_least = np.zeros(queries.size, np.int64)
    equal = np.zeros(queries.size, np.int64)
    for values, counts in self._runs:
      lo = _counts_before(counts, np.searchsorted(values, queries, side="left"))
      hi = _counts_before(counts, np.searchsorted(values, queries, side="right"))
      at_least += int(counts.sum(dtype=np.int64)) - lo
      equal += hi - lo
    at_least += self.zeros * (queries <= 0)
    equal += self.zeros * (queries == 0)
    return at_least, equal

  def table(self) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values ascending (0 included if counted) and their counts (int64)."""
    while len(self._runs) > 1:
      later = self._runs.pop()
      self._runs[-1] = _merge_runs(*self._runs[-1], *later)
    values, counts = self._runs[0] if self._runs else (np.zeros(0, self.dtype),
                                                        np.zeros(0, np.int64))
    return _insert_zeros(values, counts.astype(np.int64), self.zeros)


_CHUNK = 1 << 20


def _counts_before(counts: np.ndarray, index: np.ndarray) -> np.ndarray:
  """`counts[:i].sum()` for every i of an ascending index array, one chunk at a time."""
  out = np.zeros(index.size, np.int64)
  total = 0
  for start in range(0, counts.size, _CHUNK):
    partial = np.cumsum(counts[start:start + _CHUNK], dtype=np.int64)
    a, b = np.searchsorted(index, [start + 1, start + partial.size + 1])
    out[a:b] = total + partial[index[a:b] - start - 1]
    total += int(partial[-1])
  return out


def _merge_runs(v1, c1, v2, c2):
  """Merges two runs of distinct ascending values with counts, without sorting."""
  at = np.searchsorted(v1, v2)
  present = at < v1.size
  present[present] = v1[at[present]] == v2[present]
  summed = c1[at[present]].astype(np.int64) + c2[present]
  dtype = np.promote_types(c1.dtype, c2.dtype)
  if summed.size and summed.max() > np.iinfo(dtype).max:
    dtype = np.dtype(np.int64)
  c1 = c1.astype(dtype)                              # a copy: runs are never changed in place
  c1[at[present]] = summed
  new = ~present
  v2, c2 = v2[new], c2[new]
  slots = at[new] + np.arange(v2.size)               # insertion points in the merged run
  from_v2 = np.zeros(v1.size + v2.size, bool)
  from_v2[slots] = True
  values = np.empty(from_v2.size, v1.dtype)
  counts = np.empty(from_v2.size, c1.dtype)
  values[slots], counts[slots] = v2, c2
  values[~from_v2], counts[~from_v2] = v1, c1
  return values, counts
