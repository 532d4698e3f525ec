"""Statistics of the report: bootstrap confidence intervals, strata, tests, effect sizes.

Our choices (evaluation.md §10.2 leaves them open), stated in the report:
- 95 % percentile bootstrap over subjects, 2,000 resamples, a fixed seed; the draws and
  quantiles are those of `scipy.stats.bootstrap(method='percentile')` with the same seed.
- Strata differ? Kruskal–Wallis for three or more strata, two-sided Mann–Whitney U for two;
  effect sizes epsilon² = H / (n − 1) (Kruskal–Wallis) and the rank-biserial correlation
  r = 2·U₁/(n₁·n₂) − 1 = P(first > second) − P(first < second) (Mann–Whitney). Continuous
  factors (age, lesion size) also get Spearman's ρ. Only strata with at least
  `MIN_STRATUM` subjects enter a test; p-values are Holm-corrected within a family of tests.
- Age bins <18, 18–40, 40–65, ≥65 years; lesion-size quartiles as the reference's
  `check-data_create-perc.py` (data.md §11): linear quantiles, groups ≤p25, (p25, p50],
  (p50, p75], >p75.
"""

import dataclasses
import math
from typing import Callable

import numpy as np
import scipy.stats

N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0
MIN_STRATUM = 3   # fewer subjects: the stratum is reported as "n < 3", not as a number
AGE_BINS = ((-math.inf, 18.0, "<18"), (18.0, 40.0, "18–40"), (40.0, 65.0, "40–65"),
            (65.0, math.inf, "≥65"))
QUARTILE_LABELS = ("Q1", "Q2", "Q3", "Q4")   # ≤p25, (p25, p50], (p50, p75], >p75


def bootstrap_ci(data, statistic: Callable[[np.ndarray], np.ndarray], *,
                 n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = SEED) -> tuple[float, float]:
  """Percentile bootstrap confidence interval over the rows of `data` (subjects).

  Args:
    data: (N,) values or (N, K) per-subject rows (e.g. [numerator, denominator]).
    statistic: maps resamples (B, N[, K]) to (B,) statistics (vectorised).
    n_resamples, confidence, seed: B, the interval's coverage, the numpy Generator seed.
  Returns:
    (low, high); (nan, nan) for fewer than two subjects.
  """
  data = np.asarray(data, np.float64)
  n = data.shape[0]
  if n < 2:
    return math.nan, math.nan
  rng = np.random.default_rng(seed)
  index = rng.integers(0, n, (n_resamples, n))
  theta = np.asarray(statistic(data[index]), np.float64)
  alpha = (1.0 - confidence) / 2.0
  low, high = np.quantile(theta, [alpha, 1.0 - alpha])
  return float(low), float(high)


def bootstrap_ci_two_sample(x, y, statistic: Callable[[np.ndarray, np.ndarray], float], *,
                            n_resamples: int = N_RESAMPLES, confidence: float = CONFIDENCE,
                            seed: int = SEED) -> tuple[float, float]:
  """Percentile bootstrap CI of `statistic(x, y)` resampling x and y independently.

  x: (N,), y: (M,); statistic: one resample pair -> float (called B times). Draws as
  `scipy.stats.bootstrap((x, y), ..., paired=False)`: all of x's indices, then all of y's.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 2 or y.size < 2:
    return math.nan, math.nan
  rng = np.random.default_rng(seed)
  ix = rng.integers(0, x.size, (n_resamples, x.size))
  iy = rng.integers(0, y.size, (n_resamples, y.size))
  theta = np.array([statistic(x[a], y[b]) for a, b in zip(ix, iy)], np.float64)
  alpha = (1.0 - confidence) / 2.0
  low, high = np.nanquantile(theta, [alpha, 1.0 - alpha])
  return float(low), float(high)


def mean_statistic(resamples: np.ndarray) -> np.ndarray:
  """(B, N) -> (B,) means."""
  return resamples.mean(axis=1)


def ratio_statistic(resamples: np.ndarray) -> np.ndarray:
  """(B, N, 2) rows [numerator, denominator] -> (B,) ratio of sums (pooled rate)."""
  sums = resamples.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return sums[:, 0] / sums[:, 1]


def age_bin(age) -> str | None:
  """The age-bin label of an age in years (None for unknown)."""
  if age is None or not np.isfinite(age):
    return None
  for lo, hi, label in AGE_BINS:
    if lo <= age < hi:
      return label
  raise AssertionError(f"age {age} outside every bin")


def size_quartiles(sizes) -> tuple[list[str | None], tuple[float, float, float]]:
  """Lesion-size quartile label of each subject and the cut points (p25, p50, p75).

  sizes: (N,) lesion sizes (voxels); NaN = unknown (label None, ignored for the cut points).
  """
  sizes = np.asarray(sizes, np.float64)
  known = sizes[np.isfinite(sizes)]
  if known.size == 0:
    return [None] * sizes.size, (math.nan, math.nan, math.nan)
  cuts = tuple(float(q) for q in np.quantile(known, [0.25, 0.5, 0.75]))
  labels = []
  for s in sizes:
    labels.append(None if not np.isfinite(s) else
                  QUARTILE_LABELS[int(np.searchsorted(cuts, s, side="left"))])
  return labels, cuts


@dataclasses.dataclass(frozen=True)
class StrataTest:
  """Result of a test across strata (NaN statistic/p when not tested; `note` says why).

  Attributes:
    test: 'Kruskal–Wallis', 'Mann–Whitney U', 'Spearman' or '' (not tested).
    statistic: H, U (of the first tested stratum) or ρ.
    p: two-sided p-value (uncorrected).
    effect: epsilon², rank-biserial r or ρ; effect_name names it.
    strata: the strata that entered the test; n: their subjects.
  """
  test: str
  statistic: float
  p: float
  effect: float
  effect_name: str
  strata: tuple[str, ...]
  n: int
  note: str = ""


def compare_strata(groups: dict[str, np.ndarray], min_stratum: int = MIN_STRATUM) -> StrataTest:
  """Do the per-subject values differ between strata? (see the module docstring).

  groups: stratum -> (n_i,) per-subject values (NaN dropped). Strata with fewer than
  `min_stratum` values are left out; fewer than two remaining strata -> not tested.
  """
  kept = {k: np.asarray(v, np.float64)[np.isfinite(v)] for k, v in groups.items()}
  kept = {k: v for k, v in kept.items() if v.size >= min_stratum}
  n = int(sum(v.size for v in kept.values()))
  if len(kept) < 2:
    return StrataTest("", math.nan, math.nan, math.nan, "", tuple(kept), n,
                      f"not tested: fewer than 2 strata with n ≥ {min_stratum}")
  values = list(kept.values())
  if all(np.all(v == values[0][0]) for v in values):
    return StrataTest("", math.nan, math.nan, math.nan, "", tuple(kept), n,
                      "not tested: every value is identical")
  if len(kept) == 2:
    a, b = values
    res = scipy.stats.mannwhitneyu(a, b, alternative="two-sided")
    effect = 2.0 * res.statistic / (a.size * b.size) - 1.0
    return StrataTest("Mann–Whitney U", float(res.statistic), float(res.pvalue), float(effect),
                      "rank-biserial r", tuple(kept), n)
  res = scipy.stats.kruskal(*values)
  return StrataTest("Kruskal–Wallis", float(res.statistic), float(res.pvalue),
                    float(res.statistic) / (n - 1), "epsilon²", tuple(kept), n)


def spearman_trend(x, y, min_n: int = MIN_STRATUM) -> StrataTest:
  """Spearman's ρ of y against a continuous factor x (pairs with a NaN dropped)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if x.size < max(min_n, 3):
    return StrataTest("", math.nan, math.nan, math.nan, "", (), int(x.size),
                      f"not tested: fewer than {max(min_n, 3)} subjects")
  if np.all(x == x[0]) or np.all(y == y[0]):
    return StrataTest("", math.nan, math.nan, math.nan, "", (), int(x.size),
                      "not tested: constant values")
  res = scipy.stats.spearmanr(x, y)
  return StrataTest("Spearman", float(res.statistic), float(res.pvalue), float(res.statistic),
                    "Spearman ρ", (), int(x.size))


def holm(pvalues) -> np.ndarray:
  """Holm–Bonferroni adjusted p-values (family-wise error); NaN entries stay NaN and do not
  count towards the family size."""
  p = np.asarray(pvalues, np.float64)
  out = np.full(p.shape, np.nan)
  ok = np.flatnonzero(np.isfinite(p))
  m = ok.size
  if m == 0:
    return out
  order = ok[np.argsort(p[ok], kind="stable")]
  adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
  out[order] = np.minimum(adjusted, 1.0)
  return out
