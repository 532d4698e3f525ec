"""Metrics of the reference protocol (evaluation.md §5, §6) and the extras of uad_jax.

Volumes are numpy arrays `(H, W, Z)` in the reference's layout (raw nibabel axis order, slice
axis last); scores are anomaly maps (higher = more anomalous), labels are bool lesion masks.
Everything is computed from exact voxel counts: results equal the reference's numpy /
scikit-learn computation on the pooled arrays (Dice and FPR exactly, AP/AUROC to rounding).
"""

import dataclasses

import numpy as np

from uad_jax.errors import EvaluationError
from uad_jax.evaluation.histogram import SortedScores, ValueHistogram, distinct_sorted
from uad_jax.evaluation.thresholds import float32_cutoffs

# Evenly spaced recall levels of the stored precision-recall / ROC curve points (every 0.5 %).
CURVE_LEVELS = 200


def check_scores(scores, name: str = "scores") -> np.ndarray:
  """A finite float32 or float64 array, C-contiguous (other dtypes become float64)."""
  scores = np.ascontiguousarray(scores)
  if scores.dtype not in (np.float32, np.float64):
    scores = scores.astype(np.float64)
  if not np.isfinite(scores).all():
    raise EvaluationError(f"{name}: {np.count_nonzero(~np.isfinite(scores))} voxels are NaN or "
                          "infinite; anomaly maps must be finite")
  return scores


def check_mask(mask, shape, name: str = "labels") -> np.ndarray:
  """A bool mask of `shape`; integer/float masks must hold only 0 and 1."""
  mask = np.asarray(mask)
  if mask.shape != tuple(shape):
    raise EvaluationError(f"{name}: shape {mask.shape} differs from the scores' shape "
                          f"{tuple(shape)}")
  if mask.dtype != bool:
    if not np.isin(mask, (0, 1)).all():
      bad = np.unique(mask[~np.isin(mask, (0, 1))])[:5]
      raise EvaluationError(f"{name}: not binary (values such as {bad.tolist()}); expected "
                            "bool or 0/1")
    mask = mask.astype(bool)
  return np.ascontiguousarray(mask)


def cutoffs_for(thresholds, dtype) -> np.ndarray:
  """Cutoffs in the scores' dtype such that `x > cutoff` is the reference's decision.

  float32 thresholds compare in float32 (the reference's `thr_fpr`); anything else (float64,
  int, Python floats) in float64 (its sweep), which for float32 scores means the largest
  float32 below the threshold.
  """
  t = np.asarray(thresholds).ravel()
  if t.dtype == np.float32 or dtype != np.float32:
    return t.astype(dtype)
  return float32_cutoffs(t)


def dice(tp, pred, lesion) -> np.ndarray:
  """Per-subject Dice `2·tp / (pred + lesion)` in float64; 0/0 (empty mask, nothing
  predicted) is NaN as in the reference [PITFALL, spec §5.2]."""
  tp, den = np.asarray(tp, np.float64), np.asarray(pred, np.float64) + lesion
  with np.errstate(invalid="ignore", divide="ignore"):
    return 2 * tp / den


def round_fpr(fp, n) -> np.ndarray:
  """`round(fp / n, 5)` as the reference gets it: the ratio is a numpy float64, so Python's
  `round` dispatches to numpy's scale-and-round-half-even [PITFALL, spec §5.5]. n = 0 -> NaN."""
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.round(np.asarray(fp, np.float64) / np.asarray(n, np.float64), 5)


def dice_per_threshold(scores, labels, thresholds) -> np.ndarray:
  """Dice of one subject's volume at each threshold (`pred = scores > t`, strict).

  Args:
    scores: (H, W, Z) anomaly map (float32), reference layout.
    labels: (H, W, Z) bool lesion mask.
    thresholds: (T,) thresholds. float64/int/Python floats compare in float64 like the
      reference's sweep; pass `np.float32` values to compare in float32 like its `thr_fpr`.
  Returns:
    (T,) float64 Dice; NaN where the mask is empty and nothing is predicted.
  """
  scores = check_scores(scores)
  labels = check_mask(labels, scores.shape)
  cutoffs = cutoffs_for(thresholds, scores.dtype)
  pos = SortedScores.from_values(scores[labels])
  neg = SortedScores.from_values(scores[~labels])
  tp = pos.count_above(cutoffs)
  return dice(tp, tp + neg.count_above(cutoffs), pos.size)


def class_histograms(scores, labels) -> tuple[ValueHistogram, ValueHistogram]:
  """Exact histograms of the negative and of the positive voxels' scores (any shape)."""
  scores = check_scores(np.ravel(scores))
  labels = check_mask(np.ravel(labels), scores.shape)
  neg, pos = ValueHistogram(scores.dtype), ValueHistogram(scores.dtype)
  neg.add(SortedScores.from_values(scores[~labels]))
  pos.add(SortedScores.from_values(scores[labels]))
  return neg, pos


@dataclasses.dataclass(frozen=True, eq=False)
class RankedCounts:
  """Voxel counts at every distinct positive score, highest first: the thresholds at which
  recall changes, the only points that AP, AUROC and the best Dice depend on.

  Attributes:
    values: (J,) distinct scores of the positives, descending (the scores' dtype).
    tp: (J,) positives with score >= value (cumulative, int64; tp[-1] = every positive).
    tp_equal: (J,) positives with score == value.
    fp: (J,) negatives with score >= value.
    fp_equal: (J,) negatives with score == value.
    negatives: number of negatives.
  """
  values: np.ndarray
  tp: np.ndarray
  tp_equal: np.ndarray
  fp: np.ndarray
  fp_equal: np.ndarray
  negatives: int

  @property
  def positives(self) -> int:
    return int(self.tp[-1]) if self.tp.size else 0


def ranked_counts(neg, pos) -> RankedCounts:
  """`RankedCounts` of the negative and positive scores, each a `ValueHistogram` (a cohort)
  or a `SortedScores` (one volume's class): anything with `table()` and `count_from()`.

  Only the positives' distinct scores are visited, with the negatives at or above each one
  counted from the negatives' table (the few positive scores query the many negatives).
  """
  values, counts = pos.table()
  at_least, equal = neg.count_from(values)
  negatives = int(neg.count_from(np.array([-np.inf]))[0][0])
  return RankedCounts(values[::-1], np.cumsum(counts[::-1]), counts[::-1], at_least[::-1],
                      equal[::-1], negatives)


def average_precision_from_counts(r: RankedCounts) -> float:
  """scikit-learn's `average_precision_score` from ranked counts (ties included).

  AP = Σ_j (R_j − R_{j−1}) · P_j over distinct thresholds; recall only changes at positive
  scores, so only those count. No positive -> 0.0, as scikit-learn (which warns) returns.
  """
  if r.tp.size == 0:
    return 0.0
  recall = np.r_[0.0, r.tp / r.tp[-1]]
  return float(max(0.0, np.sum(np.diff(recall) * (r.tp / (r.tp + r.fp)))))


def average_precision(scores, labels) -> float:
  """Pooled AP of all voxels (`sklearn.metrics.average_precision_score`, ties included).

  scores: anomaly maps of any shape (e.g. (H, W, Z) or (N, H, W, Z)); labels: bool, same shape.
  The reference min-max normalises the pooled maps first; AP is rank-based, so raw scores give
  the same number (spec §5.4). Constant scores are an error (the reference raises there).
  """
  scores = check_scores(scores)
  if scores.size and scores.min() == scores.max():
    raise EvaluationError("AUPRC: every score has the same value; the reference's min-max "
                          "normalisation divides by zero and scikit-learn rejects the NaN")
  return average_precision_from_counts(ranked_counts(*class_histograms(scores, labels)))


def roc_auc_from_counts(r: RankedCounts) -> float:
  """Area under the ROC curve (ties count half, = `sklearn.metrics.roc_auc_score`), computed
  as the Mann-Whitney statistic. NaN without positives or negatives."""
  if not r.positives or not r.negatives:
    return float("nan")
  wins = np.sum(r.tp_equal.astype(np.float64) * ((r.negatives - r.fp) + 0.5 * r.fp_equal))
  return float(wins / (float(r.positives) * float(r.negatives)))


def auroc(scores, labels) -> float:
  """ROC AUC of scores (any shape) against bool labels; NaN if one class is absent."""
  return roc_auc_from_counts(ranked_counts(*class_histograms(scores, labels)))


def best_pooled_dice_from_counts(r: RankedCounts) -> tuple[float, float]:
  """Dataset-level best Dice over every possible threshold (pooled voxels).

  The best binarisation is always `score >= s` for a positive score s (any other threshold
  adds negatives or drops positives), so only those are visited. Returns (dice, s): the
  predicted voxels are those with score >= s. This is the '⌈Dice⌉' of Baur et al. (2021); the
  reference only sweeps a grid (best_mean_dice). (nan, nan) without positives.
  """
  if r.tp.size == 0:
    return float("nan"), float("nan")
  dice_j = 2 * r.tp / (r.tp + r.fp + r.tp[-1]).astype(np.float64)
  j = int(np.argmax(dice_j))
  return float(dice_j[j]), float(r.values[j])


def curve_points(r: RankedCounts, lowest: float,
                 levels: int = CURVE_LEVELS) -> dict[str, np.ndarray] | None:
  """Exact points of the precision-recall and ROC curves, thinned to at most levels + 3.

  The curves are scikit-learn's `precision_recall_curve` and `roc_curve(...,
  drop_intermediate=False)` of the pooled scores: one point per distinct score s, predicting
  `score >= s`. Kept, by decreasing threshold:
  - +inf (nothing predicted): recall 0, FPR 0, precision 1 (scikit-learn's convention for the
    PR curve's end point; its ROC curve starts there too);
  - the highest positive score;
  - for each evenly spaced recall level k / levels (k = 1..levels) the first point (highest
    threshold) whose recall reaches it: fewer points where one positive score spans several
    levels;
  - `lowest`, the lowest score of all voxels (everything predicted: recall 1, FPR 1), unless
    it is the lowest positive score (then already kept).
  Every value is the curve's own (no interpolation). Apart from the two ends the thresholds are
  positive scores, the points where recall rises (those AP sums over).

  Args:
    r: the ranked counts of the pooled scores.
    lowest: the lowest score of every voxel (positives and negatives).
    levels: number of evenly spaced recall levels.
  Returns:
    None without positives, else (P,) arrays: `threshold` (float64, descending, +inf first),
    `tp`, `fp` (int64 voxel counts), `precision`, `recall` (= TPR), `fpr` (float64; NaN
    without negatives).
  """
  if r.tp.size == 0:
    return None
  levels_k = np.arange(1, levels + 1, dtype=np.int64)
  needed = -(-levels_k * r.positives // levels)     # ceil(k · positives / levels), exactly
  index = np.unique(np.r_[0, np.searchsorted(r.tp, needed, side="left")])
  threshold = np.r_[np.inf, r.values[index].astype(np.float64)]
  tp = np.r_[0, r.tp[index]].astype(np.int64)
  fp = np.r_[0, r.fp[index]].astype(np.int64)
  if r.values[-1] > lowest:
    threshold = np.r_[threshold, float(lowest)]
    tp, fp = np.r_[tp, r.positives], np.r_[fp, r.negatives]
  with np.errstate(invalid="ignore", divide="ignore"):
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
    fpr = fp / np.float64(r.negatives)
  return {"threshold": threshold, "tp": tp, "fp": fp, "precision": precision,
          "recall": tp / np.float64(r.positives), "fpr": fpr}


def roc_curve_all_negative(values, counts, drop_intermediate: bool = True):
  """`sklearn.metrics.roc_curve(all-False labels, scores)` from counts per distinct score.

  values: (V,) distinct scores ascending; counts: (V,) voxels per value. Returns (fpr,
  thresholds), thresholds decreasing with `thresholds[0] = +inf`; `fpr[j]` = share of voxels with
  score >= thresholds[j]. `drop_intermediate` keeps the first and last point and every point
  where the second difference of the cumulative counts is non-zero, like scikit-learn
  [PITFALL, spec §6].
  """
  thresholds = np.asarray(values)[::-1].astype(np.float64)
  fps = np.cumsum(np.asarray(counts)[::-1]).astype(np.float64)
  if drop_intermediate and fps.shape[0] > 2:
    keep = np.flatnonzero(np.r_[True, np.diff(fps, 2) != 0, True])
    fps, thresholds = fps[keep], thresholds[keep]
  fps = np.r_[0.0, fps]
  return fps / fps[-1], np.r_[np.inf, thresholds]


def check_fprs(fprs) -> np.ndarray:
  fprs = np.atleast_1d(np.asarray(fprs, np.float64))
  bad = fprs[~((fprs > 0) & (fprs < 1))]
  if bad.size or fprs.size == 0:
    raise EvaluationError(f"FPR targets must lie in (0, 1); got {fprs.tolist()}")
  return fprs


def threshold_at_fpr_from_counts(values, counts, fprs,
                                 drop_intermediate: bool = True) -> np.ndarray:
  """For each target f: `thresholds[fpr < f][-1]` of the all-negative ROC curve (spec §6).

  The lowest retained ROC threshold whose FPR (score >= thr) is strictly below f. Returns
  (F,) float32 values of the map (`inf` if even the highest score exceeds the target).
  """
  fprs = check_fprs(fprs)
  fpr, thr = roc_curve_all_negative(values, counts, drop_intermediate)
  return np.array([thr[fpr < f][-1] for f in fprs], np.float32)


def threshold_at_fpr(scores, labels, fprs, drop_intermediate: bool = True) -> np.ndarray:
  """Threshold estimation of the reference's `calc_thr` mode (evaluation.md §6).

  Args:
    scores: anomaly maps of healthy validation subjects, any shape (e.g. (N, H, W, Z)).
    labels: bool, same shape, the reference's healthy-mode labels: True = background (zero
      intensity) or lesion; the label==False voxels (the brain) are pooled.
    fprs: (F,) target FPRs in (0, 1).
  Returns:
    (F,) float32 thresholds (values of the map) as the reference prints them.
  """
  scores = check_scores(np.ravel(scores))
  labels = check_mask(np.ravel(labels), scores.shape)
  brain = scores[~labels]
  if brain.size == 0:
    raise EvaluationError("threshold estimation: no brain voxel (every label is True)")
  values, counts = distinct_sorted(np.sort(brain))
  return threshold_at_fpr_from_counts(values, counts, fprs, drop_intermediate)
