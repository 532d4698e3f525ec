"""Report statistics against hand-computed values and scipy.stats."""

import math

import numpy as np
import pytest
import scipy.stats

from uad_jax.evaluation import metrics
from uad_jax.report import stats


def test_bootstrap_ci_equals_scipy_percentile_bootstrap():
  x = np.random.default_rng(5).normal(size=11)
  want = scipy.stats.bootstrap((x,), np.mean, n_resamples=500, method="percentile",
                               rng=np.random.default_rng(3)).confidence_interval
  got = stats.bootstrap_ci(x, stats.mean_statistic, n_resamples=500, seed=3)
  assert got == (want.low, want.high)


def test_bootstrap_ci_of_pooled_ratio_equals_scipy_paired():
  num = np.array([0, 3, 1, 4, 2, 0, 5, 1, 2], float)
  den = num + np.array([3, 1, 8, 2, 5, 7, 1, 4, 6], float)
  ratio = lambda a, b, axis=-1: a.sum(axis) / b.sum(axis)
  want = scipy.stats.bootstrap((num, den), ratio, paired=True, n_resamples=400,
                               method="percentile",
                               rng=np.random.default_rng(9)).confidence_interval
  got = stats.bootstrap_ci(np.stack([num, den], 1), stats.ratio_statistic, n_resamples=400,
                           seed=9)
  assert got == pytest.approx((want.low, want.high), rel=1e-15)


def test_two_sample_bootstrap_equals_scipy_unpaired():
  x = np.random.default_rng(1).normal(size=7)
  y = np.random.default_rng(2).normal(1.0, size=6)
  auc = lambda a, b: metrics.auroc(np.r_[a, b], np.r_[np.zeros(a.size, bool),
                                                      np.ones(b.size, bool)])
  vec = lambda a, b, axis=-1: np.array([auc(p, q) for p, q in zip(np.atleast_2d(a),
                                                                  np.atleast_2d(b))])
  want = scipy.stats.bootstrap((x, y), vec, n_resamples=300, method="percentile",
                               rng=np.random.default_rng(4)).confidence_interval
  assert stats.bootstrap_ci_two_sample(x, y, auc, n_resamples=300, seed=4) == (want.low,
                                                                               want.high)


def test_bootstrap_ci_hand_computed_two_subjects():
  # Resample means of [0, 1] are 0 (p 1/4), 0.5 (p 1/2), 1 (p 1/4): the 2.5 % and 97.5 %
  # quantiles of 4000 draws are 0 and 1.
  assert stats.bootstrap_ci([0.0, 1.0], stats.mean_statistic, n_resamples=4000) == (0.0, 1.0)
  assert stats.bootstrap_ci([2.5, 2.5, 2.5], stats.mean_statistic) == (2.5, 2.5)
  low, high = stats.bootstrap_ci([1.0], stats.mean_statistic)
  assert math.isnan(low) and math.isnan(high)


def test_bootstrap_is_deterministic_for_a_seed():
  x = np.arange(10.0) ** 2
  a = stats.bootstrap_ci(x, stats.mean_statistic, seed=1)
  assert a == stats.bootstrap_ci(x, stats.mean_statistic, seed=1)
  assert a != stats.bootstrap_ci(x, stats.mean_statistic, seed=2)


def test_kruskal_wallis_hand_computed_and_scipy():
  groups = {"a": np.array([1.0, 2, 3]), "b": np.array([4.0, 5, 6]), "c": np.array([7.0, 8, 9])}
  t = stats.compare_strata(groups)
  # Ranks = values; mean ranks 2, 5, 8 around 5: H = 12 / (9 * 10) * 3 * (9 + 0 + 9) = 7.2.
  assert t.test == "Kruskal–Wallis"
  assert t.statistic == pytest.approx(7.2)
  assert t.effect == pytest.approx(7.2 / 8)   # epsilon² = H / (n - 1)
  want = scipy.stats.kruskal(*groups.values())
  assert (t.statistic, t.p) == pytest.approx((want.statistic, want.pvalue))
  assert t.strata == ("a", "b", "c") and t.n == 9


def test_mann_whitney_rank_biserial_hand_computed():
  t = stats.compare_strata({"F": np.array([1.0, 2, 3]), "M": np.array([4.0, 5, 6, 7])})
  assert t.test == "Mann–Whitney U"
  assert t.statistic == 0.0          # no F value exceeds an M value
  assert t.effect == -1.0            # P(F > M) - P(F < M)
  want = scipy.stats.mannwhitneyu([1, 2, 3], [4, 5, 6, 7], alternative="two-sided")
  assert t.p == pytest.approx(want.pvalue)
  ties = stats.compare_strata({"x": np.array([1.0, 2, 2]), "y": np.array([2.0, 3, 4])})
  # U_x: pairs x > y count 1, ties 1/2: (1,2)=0 (1,3)=0 (1,4)=0 (2,2)=.5 x2 -> U = 1.
  assert ties.statistic == 1.0 and ties.effect == pytest.approx(2 * 1 / 9 - 1)


def test_small_strata_are_left_out_of_tests():
  groups = {"a": np.array([1.0, 2, 3]), "b": np.array([4.0, 5]), "c": np.array([7.0, 8, 9])}
  t = stats.compare_strata(groups, min_stratum=3)
  assert t.test == "Mann–Whitney U" and t.strata == ("a", "c") and t.n == 6
  none = stats.compare_strata({"a": np.array([1.0, 2, 3]), "b": np.array([4.0, np.nan, 5])})
  assert none.test == "" and math.isnan(none.p) and "fewer than 2 strata" in none.note


def test_spearman_trend_matches_scipy():
  x = np.array([10, 25, 33, 47, 58, 61, 80, np.nan])
  y = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.7, 0.9, 0.2])
  t = stats.spearman_trend(x, y)
  want = scipy.stats.spearmanr(x[:-1], y[:-1])
  assert t.n == 7 and (t.statistic, t.p) == pytest.approx((want.statistic, want.pvalue))


def test_holm_hand_computed():
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
  np.testing.assert_allclose(stats.holm([0.5, np.nan, 0.2]), [0.5, np.nan, 0.4])
  np.testing.assert_allclose(stats.holm([0.6, 0.9]), [1.0, 1.0])


def test_age_bins_and_size_quartiles():
  assert [stats.age_bin(a) for a in (6, 17.9, 18, 39.9, 40, 64.9, 65, 89)] == [
      "<18", "<18", "18–40", "18–40", "40–65", "40–65", "≥65", "≥65"]
  assert stats.age_bin(float("nan")) is None
  # Linear quantiles of 1..8: p25 = 2.75, p50 = 4.5, p75 = 6.25 (data.md §11 grouping).
  labels, cuts = stats.size_quartiles([8, 1, 2, 3, 4, 5, 6, 7, np.nan])
  assert cuts == (2.75, 4.5, 6.25)
  assert labels == ["Q4", "Q1", "Q1", "Q2", "Q2", "Q3", "Q3", "Q4", None]
  # A size equal to a cut point belongs to the lower group (<= p25 is Q1).
  labels, cuts = stats.size_quartiles([1, 2, 3, 4, 5])
  assert cuts == (2.0, 3.0, 4.0) and labels == ["Q1", "Q1", "Q2", "Q3", "Q4"]
