"""Metric building blocks against scikit-learn, scipy, numpy and the spec's tables."""

import numpy as np
import pytest
import scipy.ndimage
from sklearn.metrics import (average_precision_score, precision_recall_curve,
                             roc_auc_score, roc_curve)

from uad_jax.evaluation import histogram, lesions, metrics
from uad_jax.evaluation.histogram import SortedScores, ValueHistogram
from uad_jax.evaluation.postprocess import median_filter_3d
from uad_jax.evaluation.thresholds import ThresholdSet, float32_cutoffs, sweep_grid


def _tied_scores(rng, n, levels=50):
  """float32 scores with many exact ties, zeros and a few negatives."""
  s = np.round(rng.normal(0.3, 0.2, n) * levels) / levels
  s[rng.random(n) < 0.3] = 0
  return s.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_and_auroc_equal_sklearn(seed):
  rng = np.random.default_rng(seed)
  scores = _tied_scores(rng, 5000)
  labels = rng.random(5000) < 0.1 + 0.5 * (scores > 0.4)
  assert metrics.average_precision(scores, labels) == pytest.approx(
      average_precision_score(labels, scores), abs=1e-12)
  assert metrics.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_ranked_counts_of_one_volume_equal_the_histograms():
  # SortedScores (one subject, binary searches) and ValueHistogram (cohort) give the same counts.
  rng = np.random.default_rng(9)
  scores = _tied_scores(rng, 3000)
  labels = rng.random(3000) < 0.2 + 0.5 * (scores > 0.4)
  a = metrics.ranked_counts(*metrics.class_histograms(scores, labels))
  b = metrics.ranked_counts(SortedScores.from_values(scores[~labels]),
                            SortedScores.from_values(scores[labels]))
  for field in ("values", "tp", "tp_equal", "fp", "fp_equal"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
  assert a.negatives == b.negatives == (~labels).sum() and a.positives == labels.sum()
  assert metrics.average_precision_from_counts(b) == pytest.approx(
      average_precision_score(labels, scores), abs=1e-12)
  assert metrics.roc_auc_from_counts(b) == pytest.approx(roc_auc_score(labels, scores),
                                                         abs=1e-12)


def _sklearn_points(labels, scores):
  """{float32 threshold: (precision, recall, fpr)} of every point of scikit-learn's curves."""
  precision, recall, thr = precision_recall_curve(labels, scores)
  fpr, tpr, roc_thr = roc_curve(labels, scores, drop_intermediate=False)
  roc = dict(zip(np.float32(roc_thr[1:]), zip(fpr[1:], tpr[1:])))
  assert (fpr[0], tpr[0], roc_thr[0]) == (0.0, 0.0, np.inf)
  assert (precision[-1], recall[-1]) == (1.0, 0.0)   # the PR curve's end point, no threshold
  out = {}
  for p, r, t in zip(precision[:-1], recall[:-1], np.float32(thr)):
    assert roc[t][1] == r
    out[t] = (p, r, roc[t][0])
  return out


@pytest.mark.parametrize("levels", [200, 7])
def test_curve_points_lie_on_sklearn_curves(levels):
  rng = np.random.default_rng(10)
  scores = rng.gamma(2.0, 0.1, 20_000).astype(np.float32)     # ~all distinct: thinning at work
  scores[rng.random(scores.size) < 0.3] = 0                    # a large tie (the background)
  scores[:50] = np.float32(0.25)                               # a tie of both classes
  labels = rng.random(scores.size) < 0.05 + 0.5 * (scores > 0.3)
  ranked = metrics.ranked_counts(*metrics.class_histograms(scores, labels))
  assert ranked.values.size > 4 * levels
  c = metrics.curve_points(ranked, float(scores.min()), levels)
  sk = _sklearn_points(labels, scores)
  n = c["threshold"].size
  assert n <= levels + 3 and set(c) == {"threshold", "tp", "fp", "precision", "recall", "fpr"}
  # Start: +inf, nothing predicted; PR (recall 0, precision 1), ROC (0, 0).
  assert (c["threshold"][0], c["tp"][0], c["fp"][0]) == (np.inf, 0, 0)
  assert (c["precision"][0], c["recall"][0], c["fpr"][0]) == (1.0, 0.0, 0.0)
  # Every other point is exactly a point of scikit-learn's curves, thresholds descending.
  assert (np.diff(c["threshold"]) < 0).all()
  for t, p, r, f, tp, fp in zip(*(c[k][1:] for k in ("threshold", "precision", "recall", "fpr",
                                                      "tp", "fp"))):
    assert np.float32(t) == t and sk[np.float32(t)] == (p, r, f)
    assert (tp, fp) == (((scores >= t) & labels).sum(), ((scores >= t) & ~labels).sum())
  # End: the lowest score, everything predicted.
  assert (c["threshold"][-1], c["recall"][-1], c["fpr"][-1]) == (0.0, 1.0, 1.0)
  # The sampling: the highest positive score, and per recall level k / levels the first
  # point of the curve (highest threshold) with recall >= k / levels.
  positives = np.sort(np.unique(scores[labels]))[::-1]
  tps = np.array([((scores >= t) & labels).sum() for t in positives])
  first = [positives[np.argmax(tps * levels >= k * labels.sum())] for k in range(1, levels + 1)]
  want = sorted({positives[0], *first, np.float32(0.0)}, reverse=True)
  np.testing.assert_array_equal(np.float32(c["threshold"][1:]), want)


def test_curve_points_end_at_the_lowest_positive_and_without_positives():
  scores = np.float32([0.9, 0.5, 0.5, 0.2, 0.1])
  labels = np.array([True, False, True, False, True])
  ranked = metrics.ranked_counts(*metrics.class_histograms(scores, labels))
  c = metrics.curve_points(ranked, float(scores.min()), levels=3)   # a positive is lowest
  np.testing.assert_array_equal(c["threshold"], np.float32([np.inf, 0.9, 0.5, 0.1]))
  np.testing.assert_array_equal(c["tp"], [0, 1, 2, 3])
  np.testing.assert_array_equal(c["fp"], [0, 0, 1, 2])
  np.testing.assert_allclose(c["precision"], [1, 1, 2 / 3, 3 / 5])
  np.testing.assert_allclose(c["fpr"], [0, 0, 0.5, 1])
  none = metrics.ranked_counts(*metrics.class_histograms(scores, np.zeros(5, bool)))
  assert metrics.curve_points(none, 0.1) is None


def test_average_precision_of_constant_scores_is_an_error():
  with pytest.raises(ValueError, match="same value"):
    metrics.average_precision(np.full(10, 0.5, np.float32), np.arange(10) < 3)


@pytest.mark.parametrize("tied", [False, True])
def test_threshold_at_fpr_equals_sklearn_roc_curve(tied):
  # Spec §12.2: 1e5 random scores, targets 0.01 and 0.001, drop_intermediate both ways.
  rng = np.random.default_rng(3)
  scores = rng.gamma(2.0, 1.0, 100_000).astype(np.float32)
  if tied:
    scores = (np.round(scores * 200) / 200).astype(np.float32)
  labels = np.zeros(scores.size, bool)   # all brain voxels (label False)
  for drop in (True, False):
    with pytest.warns(Warning):
      fpr, _, thr = roc_curve(np.zeros(scores.size, int), scores, drop_intermediate=drop)
    for target in (0.01, 0.001):
      expected = np.float32(thr[fpr < target][-1])
      got = metrics.threshold_at_fpr(scores, labels, [target], drop_intermediate=drop)
      assert got.dtype == np.float32 and got[0] == expected


def test_threshold_at_fpr_ignores_background_and_checks_targets():
  scores = np.array([5.0, 1.0, 2.0, 3.0], np.float32)
  labels = np.array([True, False, False, False])   # the 5.0 voxel is background
  assert metrics.threshold_at_fpr(scores, labels, [0.5])[0] == 3.0
  for bad in ([0.0], [1.0], [-0.1], [1.5], []):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
      metrics.threshold_at_fpr(scores, labels, bad)
  with pytest.raises(ValueError, match="no brain voxel"):
    metrics.threshold_at_fpr(scores, np.ones(4, bool), [0.1])


def test_dice_per_threshold_float64_and_float32_compare():
  t = 0.17
  x = np.float32(t)                      # float32(0.17) > 0.17 as a double
  assert float(x) > t
  scores = np.zeros((4, 4, 2), np.float32)
  scores[0, 0, 0] = x
  labels = np.zeros_like(scores, bool)
  labels[0, 0, 0] = True
  # Sweep thresholds (float64) predict the voxel; thr_fpr (float32) does not.
  np.testing.assert_array_equal(metrics.dice_per_threshold(scores, labels, [t]), [1.0])
  np.testing.assert_array_equal(metrics.dice_per_threshold(scores, labels, np.float32([t])),
                                [0.0])
  # Empty mask: 0 where something is predicted, NaN where nothing is.
  d = metrics.dice_per_threshold(scores, np.zeros_like(labels), [0.1, 0.5])
  assert d[0] == 0 and np.isnan(d[1])


def test_dice_per_threshold_equals_numpy_formula():
  rng = np.random.default_rng(4)
  scores = _tied_scores(rng, 2000).reshape(10, 20, 10)
  labels = rng.random(scores.shape) < 0.2
  keys, values = sweep_grid(0.0, 0.6, 0.05)
  got = metrics.dice_per_threshold(scores, labels, values)
  for t, d in zip(values, got):
    p = scores > t                       # numpy float64 scalar: the reference's compare
    assert d == 2 * (p & labels).sum() / (p.sum() + labels.sum())


def test_float32_cutoffs_reproduce_float64_compare():
  rng = np.random.default_rng(5)
  t = np.r_[rng.uniform(-1, 1, 200), [0.0, 0.17, 1e-05, 100, 0.29, 1e39]]
  c = float32_cutoffs(t)
  near = np.float32(t[:-1])                # 1e39 overflows float32: only its cutoff is checked
  x = np.concatenate([near] + [np.nextafter(near, np.float32(d)) for d in (-np.inf, np.inf)])
  for ti, ci in zip(t, c):
    np.testing.assert_array_equal(x > ti, x > ci)


# Spec §7.1: (start, end, step) -> number of keys, first key, last key.
SWEEPS = {
    "ANDi": ((0.00001, 0.00005, 0.000001), 41, "1e-05", "5e-05"),
    "Disyre": ((0.001, 0.1, 0.001), 99, "0.001", "0.099"),
    "FAE": ((0.35, 0.7, 0.01), 35, "0.35", "0.69"),
    "IterMask": ((0.001, 0.1, 0.001), 99, "0.001", "0.099"),
    "PatchCore": ((0.6, 0.9, 0.01), 31, "0.6", "0.9"),
    "RD": ((0.01, 0.3, 0.01), 29, "0.01", "0.29"),
    "RIAD": ((0, 0.03, 0.001), 30, "0.0", "0.029"),
    "UniAD": ((100, 150, 5), 10, "100", "145"),
}


@pytest.mark.parametrize("method", sorted(SWEEPS))
def test_sweep_grid_matches_spec_table(method):
  args, count, first, last = SWEEPS[method]
  keys, values = sweep_grid(*args)
  assert (len(keys), keys[0], keys[-1]) == (count, first, last)
  assert values.dtype == (np.int64 if method == "UniAD" else np.float64)


def test_threshold_set_duplicate_fpr_keeps_first_position_last_value():
  ts = ThresholdSet.build((0.0, 0.02, 0.01), [(0.004, 0.05), (0.01, 0.03), (0.01, 0.02)])
  assert ts.keys == ("0.0", "0.01", "FPR-0.004", "FPR-0.01")
  assert ts.fpr_values == (0.05, 0.02)
  assert ts.cutoffs.dtype == np.float32 and ts.cutoffs[-1] == np.float32(0.02)


def test_round_fpr_uses_numpy_rounding():
  # Spec §5.5: numpy's scale-and-round differs from Python's decimal rounding here.
  assert metrics.round_fpr(1, 8000) == 0.00012
  assert metrics.round_fpr(4, 1280) == 0.00312
  assert np.isnan(metrics.round_fpr(0, 0))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(16, 12, 1), (10, 9, 3), (2, 5, 2), (70, 40, 35)])
def test_median_filter_equals_scipy(k, shape):
  rng = np.random.default_rng(k)
  v = _tied_scores(rng, int(np.prod(shape)), levels=8).reshape(shape)
  v[: shape[0] // 2] = 0                 # constant tiles take the shortcut
  np.testing.assert_array_equal(median_filter_3d(v, k), scipy.ndimage.median_filter(v, size=k))
  w = rng.normal(size=shape)             # float64, all distinct
  np.testing.assert_array_equal(median_filter_3d(w, k), scipy.ndimage.median_filter(w, size=k))


def test_median_filter_rejects_nan_and_bad_shapes():
  v = np.zeros((4, 4, 4), np.float32)
  v[1, 1, 1] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    median_filter_3d(v, 4)
  with pytest.raises(ValueError, match="3-D"):
    median_filter_3d(np.zeros((4, 4)), 4)


def test_value_histogram_merges_and_counts_exactly(monkeypatch):
  monkeypatch.setattr(histogram, "_CHUNK", 7)   # many chunks in the prefix sums
  rng = np.random.default_rng(6)
  hist = ValueHistogram()
  parts = []
  for _ in range(13):
    v = _tied_scores(rng, int(rng.integers(1, 400)), levels=20)
    hist.add(SortedScores.from_values(v))
    parts.append(v)
  v = np.concatenate(parts)
  queries = np.sort(np.r_[_tied_scores(rng, 50, levels=20), -np.inf, 0, 9]).astype(np.float32)
  at_least, equal = hist.count_from(queries)         # over the unmerged runs
  np.testing.assert_array_equal(at_least, [(v >= q).sum() for q in queries])
  np.testing.assert_array_equal(equal, [(v == q).sum() for q in queries])
  values, counts = hist.table()
  u, n = np.unique(v, return_counts=True)
  np.testing.assert_array_equal(values, u)
  np.testing.assert_array_equal(counts, n)


def test_value_histogram_counts_switch_to_int64_before_overflowing():
  values, counts = histogram._merge_runs(np.float32([0.5, 2]), np.uint32([2**32 - 10, 1]),
                                         np.float32([0.5, 1]), np.uint32([2**32 - 10, 3]))
  np.testing.assert_array_equal(values, [0.5, 1, 2])
  np.testing.assert_array_equal(counts, [2**33 - 20, 3, 1])
  assert counts.dtype == np.int64


@pytest.mark.parametrize("n", [1, 2, 999, 1000, 1001, 5000])
def test_quantile_and_counts_of_sorted_scores(n):
  rng = np.random.default_rng(n)
  v = _tied_scores(rng, n)
  s = SortedScores.from_values(v)
  assert s.quantile_higher(0.999) == np.quantile(v, 0.999, method="higher")
  cut = np.float32([-1, -0.1, 0, 0.3, 2])
  np.testing.assert_array_equal(s.count_above(cut), [(v > c).sum() for c in cut])


def test_best_pooled_dice_is_the_best_over_all_thresholds():
  rng = np.random.default_rng(7)
  v = _tied_scores(rng, 3000, levels=30)
  lab = rng.random(3000) < 0.05 + 0.4 * (v > 0.45)
  ranked = metrics.ranked_counts(*metrics.class_histograms(v, lab))
  dice, lowest = metrics.best_pooled_dice_from_counts(ranked)
  brute = [2 * ((v > t) & lab).sum() / ((v > t).sum() + lab.sum())
           for t in np.r_[-np.inf, np.unique(v)]]
  assert dice == pytest.approx(max(brute), abs=1e-15)
  assert 2 * ((v >= lowest) & lab).sum() / ((v >= lowest).sum() + lab.sum()) == dice


def test_lesion_hits_and_false_positive_components():
  rng = np.random.default_rng(8)
  labels = np.zeros((20, 18, 10), bool)
  labels[2:5, 2:5, 2:4] = True             # lesion 1
  labels[10:12, 10:13, 5:8] = True         # lesion 2
  labels[15, 15, 9] = True                 # lesion 3 (one voxel)
  scores = (rng.random(labels.shape) * 0.5 * (rng.random(labels.shape) < 0.1)).astype(np.float32)
  scores[3, 3, 3] = 0.9                    # lesion 1 hit at high thresholds
  comps = lesions.LesionComponents(labels)
  assert comps.count == 3
  cut = np.float32([0.0, 0.3, 0.8, 0.95])
  ids, n = scipy.ndimage.label(labels, structure=np.ones((3, 3, 3)))
  expected = [sum((scores[ids == i] > c).any() for i in range(1, n + 1)) for c in cut]
  np.testing.assert_array_equal(lesions.hits(comps.max_scores(scores), cut), expected)
  nonzero = np.flatnonzero(scores)
  for c in cut:
    pred_ids, m = scipy.ndimage.label(scores > c, structure=np.ones((3, 3, 3)))
    fp = sum(not labels[pred_ids == i].any() for i in range(1, m + 1))
    assert lesions.false_positive_components(scores, labels, c, nonzero) == fp
    assert lesions.false_positive_components(scores, labels, c) == fp
