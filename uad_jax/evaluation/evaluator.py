"""Streaming evaluation of a cohort: one subject at a time, exact cohort metrics at the end.

The reference concatenates every map of a cohort in memory (> 100 GB for a real test set,
evaluation.md §9). Here each subject is reduced, right after it is scored, to small exact
summaries: for every threshold key the voxel counts (predicted, true positive, predicted
lesion-free brain), each lesion's maximum score, false-positive components at the `FPR-<fpr>`
keys, a subject score, and (lesion mode) its distinct score values with positive/negative
counts merged into a cohort histogram for AUPRC/AUROC and the stored PR/ROC curve points,
plus the subject's own voxel AP and AUROC. Memory: about one volume plus the histogram (bounded
by the number of distinct float32 scores); results equal the in-memory computation.

Modes (spec §3): `lesion` (Dice sweep, Dice at `FPR-<fpr>`, AUPRC, extras) and `healthy`
(pooled and per-subject FPR over brain voxels). Every metric is computed for the raw map and
for its 3-D median-filtered copy (`raw`, `mf`).
"""

import dataclasses
import math
from typing import Any

import numpy as np

from uad_jax.errors import ConfigError, EvaluationError
from uad_jax.evaluation import lesions as lesions_lib
from uad_jax.evaluation import metrics
from uad_jax.evaluation import outputs
from uad_jax.evaluation.histogram import SortedScores, ValueHistogram
from uad_jax.evaluation.postprocess import median_filter_3d
from uad_jax.evaluation.thresholds import ThresholdSet

MODES = ("lesion", "healthy")
POSTPROCS = ("raw", "mf")
# Subject-level anomaly score: the 99.9th percentile of the map over brain voxels (numpy
# quantile method 'higher', so it is a voxel value). A high percentile rather than the maximum
# (one noisy voxel) or the mean (diluted by the brain): it reacts to lesions down to ~0.1 % of
# the brain (about 1.5 cm³), the scale of MS/WMH lesions.
SUBJECT_SCORE_QUANTILE = 0.999
# `curves` of results.json: see metrics.curve_points.
CURVES_DEFINITION = (
    "exact points of the pooled-voxel precision-recall and ROC curves (predicted: score >= "
    "threshold; threshold null = +inf: nothing predicted, precision 1 by convention): +inf, "
    "the highest lesion-voxel score, the first point reaching each recall level "
    f"k/{metrics.CURVE_LEVELS} (k = 1..{metrics.CURVE_LEVELS}), the lowest score")


@dataclasses.dataclass
class _MapSummary:
  """One subject's map (raw or filtered) reduced to counts; T = number of threshold keys."""
  pred: np.ndarray         # (T,) voxels with score > threshold
  tp: np.ndarray           # (T,) lesion voxels with score > threshold
  fp: np.ndarray           # (T,) lesion-free brain voxels with score > threshold
  lesion_max: np.ndarray   # (lesions,) maximum score of each lesion
  fp_components: np.ndarray  # (T_fpr,) false-positive components at the FPR keys
  score: float             # subject score (SUBJECT_SCORE_QUANTILE over brain voxels)
  score_mean: float        # mean score over brain voxels (float64)
  ap: float                # lesion mode: voxel AP of the volume (NaN for an empty mask)
  auroc: float             # lesion mode: voxel AUROC of the volume (NaN for an empty mask)
  lo: float                # smallest and largest score of the volume
  hi: float


@dataclasses.dataclass
class _Subject:
  meta: dict
  voxels: int
  lesion_voxels: int       # in the cropped mask
  brain_voxels: int
  eval_voxels: int         # brain & ~lesion: the voxels of the FPR
  lesions: int
  maps: dict               # postproc -> _MapSummary


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluationResult:
  """Everything an evaluation produced (see `outputs` for the files written from it).

  Attributes:
    mode: 'lesion' | 'healthy'.
    info: the caller's free-form dict (method, modality, cohort, checkpoint step, warnings...).
    thresholds: the ThresholdSet; `thresholds.keys` orders every (T, N) array below.
    kernel_size: median filter size of the `mf` results.
    subjects: per subject (N, in the order added) its metadata plus `voxels`,
      `lesion_voxels`, `brain_voxels`, `eval_voxels`, `lesions`.
    per_subject: postproc -> metric -> array. (T, N): `pred_voxels`, `tp_voxels`,
      `fp_voxels` (predicted lesion-free brain voxels), `fpr` (fp_voxels / eval_voxels, not
      rounded; NaN without such voxels), `dice` (lesion mode; NaN for an empty mask with
      nothing predicted), `lesions_hit`; (T_fpr, N): `fp_components`; (N,): `subject_score`,
      `score_mean`, and in lesion mode `ap`, `auroc` (voxel AP and AUROC of the subject's
      volume, every voxel as in the pooled AUPRC; NaN for an empty mask).
    summary: postproc -> cohort metrics (JSON-ready; NaN as float nan), see `to_json`.
    warnings: protocol warnings (e.g. empty masks in a lesion cohort).
  """
  mode: str
  info: dict
  thresholds: ThresholdSet
  kernel_size: int
  subjects: list
  per_subject: dict
  summary: dict
  warnings: list

  def reference_rows(self, postproc: str = "raw") -> list[tuple[str, float]]:
    """The rows of the reference's CSV (`thr,value`) for raw or filtered maps, in order."""
    return list(self.summary[postproc]["reference"].items())

  def best_key(self, postproc: str = "raw") -> str | None:
    """Sweep key of the best mean Dice (lesion mode), None if no sweep value is defined."""
    best = self.summary[postproc].get("best_mean_dice")
    return best["key"] if best else None

  def to_json(self) -> dict:
    """The `results.json` document: mode, info, thresholds, counts, raw and mf summaries."""
    t = self.thresholds
    doc = {
        "schema": "uad_jax.evaluation.results/1",
        "mode": self.mode,
        "info": self.info,
        "kernel_size": self.kernel_size,
        "n_subjects": len(self.subjects),
        "counts": {k: int(sum(s[k] for s in self.subjects))
                   for k in ("voxels", "lesion_voxels", "brain_voxels", "eval_voxels",
                             "lesions")},
        "thresholds": {
            "keys": list(t.keys),
            "sweep": {"keys": list(t.sweep_keys), "values": t.sweep_values.tolist()},
            "fpr": {"keys": list(t.fpr_keys), "targets": list(t.fpr_targets),
                    "thresholds": list(t.fpr_values)},
        },
        "warnings": list(self.warnings),
    }
    doc.update({p: self.summary[p] for p in POSTPROCS})
    return _json_ready(doc)


def _json_ready(x):
  """numpy scalars/arrays to Python, NaN and infinities to None (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _json_ready(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_json_ready(v) for v in x]
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


class Evaluator:
  """Streaming accumulator of one cohort's evaluation (add subjects one at a time).

  Example:
    ev = Evaluator("lesion", ThresholdSet.build((0.01, 0.3, 0.01), [(0.01, 0.183)]),
                   info={"method": "RD"})
    for scores, labels, brain, meta in subjects:
      ev.add(scores, labels, brain, meta)
    ev.write(out_dir, prefix="RD_T2w_brats")   # or ev.result()

  `add` is not thread-safe: call it from one thread (e.g. a background evaluation thread).
  """

  def __init__(self, mode: str, thresholds: ThresholdSet, *, kernel_size: int = 4,
               info: dict | None = None):
    if mode not in MODES:
      raise ConfigError(f"evaluation mode must be one of {MODES}, got {mode!r}")
    if not len(thresholds):
      raise ConfigError("no threshold: give a sweep (thr_start, thr_end, thr_step) and/or "
                        "(fpr, thr) pairs")
    self.mode = mode
    self.thresholds = thresholds
    self.kernel_size = kernel_size
    self.info = dict(info or {})
    self._cutoffs = thresholds.cutoffs
    self._fpr_cutoffs = self._cutoffs[len(thresholds.sweep_keys):]
    # Lesion mode: per postproc the exact histograms of negative and positive voxel scores.
    self._histograms = ({p: (ValueHistogram(), ValueHistogram()) for p in POSTPROCS}
                        if mode == "lesion" else None)
    self._subjects: list[_Subject] = []
    self._paths: set[str] = set()

  def __len__(self) -> int:
    return len(self._subjects)

  @property
  def histogram_nbytes(self) -> int:
    """Memory held by the cohort histograms (lesion mode; grows with distinct scores)."""
    if self._histograms is None:
      return 0
    return sum(h.nbytes for pair in self._histograms.values() for h in pair)

  def add(self, scores, labels=None, brain=None, meta: dict | None = None) -> dict:
    """Evaluates one subject.

    Args:
      scores: (H, W, Z) float32 anomaly map, reference layout (slice axis last), background
        already 0. Other float dtypes are converted to float32 (the reference's maps are).
      labels: (H, W, Z) bool lesion mask; None = no lesion.
      brain: (H, W, Z) bool, normalised input intensity != 0; None = every voxel. Healthy mode
        evaluates `brain & ~labels` (the reference's label-OR-background rule, spec §3), so
        passing the reference's healthy-mode label as `labels` with brain=None also works.
      meta: dict with `path` (the join key of every per-subject output; default
        `subject-<i>`) and where known `subject`, `dataset`, `lesion_type`, `scanner`, `age`,
        `sex`, `lesion_voxels_uncropped`.
    Returns:
      The subject's metadata and counts (as in `EvaluationResult.subjects`).
    """
    meta = dict(meta or {})
    meta.setdefault("path", f"subject-{len(self._subjects)}")
    path = str(meta["path"])
    if path in self._paths:
      raise EvaluationError(f"{path}: subject added twice (paths are the join key)")
    scores = np.asarray(scores)
    if scores.ndim != 3:
      raise EvaluationError(f"{path}: expected an (H, W, Z) anomaly map, got shape "
                            f"{scores.shape}")
    if not np.issubdtype(scores.dtype, np.floating):
      raise EvaluationError(f"{path}: anomaly map of dtype {scores.dtype}; expected float32")
    scores = np.ascontiguousarray(scores, np.float32)
    labels = (np.zeros(scores.shape, bool) if labels is None
              else metrics.check_mask(labels, scores.shape, f"{path}: labels"))
    brain = (np.ones(scores.shape, bool) if brain is None
             else metrics.check_mask(brain, scores.shape, f"{path}: brain"))
    evaluated = brain & ~labels
    lesion = lesions_lib.LesionComponents(labels)
    subject = _Subject(meta, scores.size, int(np.count_nonzero(labels)),
                       int(np.count_nonzero(brain)), int(np.count_nonzero(evaluated)),
                       lesion.count, {})
    histogram_parts = {}
    for postproc in POSTPROCS:
      m = scores if postproc == "raw" else median_filter_3d(scores, self.kernel_size)
      subject.maps[postproc], histogram_parts[postproc] = self._summarise(
          m, labels, brain, subject, lesion)
    if self._histograms is not None:
      for postproc, parts in histogram_parts.items():
        for histogram, part in zip(self._histograms[postproc], parts):
          histogram.add(part)
    self._subjects.append(subject)
    self._paths.add(path)
    return self._subject_row(subject)

  def _summarise(self, m, labels, brain, subject: _Subject, lesion):
    flat = m.ravel()
    nonzero = np.flatnonzero(flat)
    v = flat[nonzero]
    if not np.isfinite(v).all():
      raise EvaluationError(f"{subject.meta['path']}: {np.count_nonzero(~np.isfinite(v))} "
                            "voxels of the anomaly map are NaN or infinite")
    in_lesion = labels.ravel()[nonzero]
    in_brain = brain.ravel()[nonzero]
    v_lesion, v_other = v[in_lesion], v[~in_lesion]
    pos = SortedScores(np.sort(v_lesion), subject.lesion_voxels - v_lesion.size)
    neg = SortedScores(np.sort(v_other), subject.voxels - subject.lesion_voxels - v_other.size)
    brain_other = in_brain[~in_lesion]
    if brain_other.all():   # the usual case: the map is zero outside the brain
      evaluated = SortedScores(neg.nonzero, subject.eval_voxels - v_other.size)
    else:
      v_eval = v_other[brain_other]
      evaluated = SortedScores(np.sort(v_eval), subject.eval_voxels - v_eval.size)
    v_brain = v if in_brain.all() else v[in_brain]
    in_brain_scores = SortedScores(np.sort(v_brain), subject.brain_voxels - v_brain.size)

    cutoffs = self._cutoffs
    tp = pos.count_above(cutoffs)
    has_zero = nonzero.size < flat.size
    ap = auroc = math.nan
    if self.mode == "lesion" and pos.size:
      ranked = metrics.ranked_counts(neg, pos)   # binary searches in the sorted volume
      ap = metrics.average_precision_from_counts(ranked)
      auroc = metrics.roc_auc_from_counts(ranked)
    summary = _MapSummary(
        pred=tp + neg.count_above(cutoffs), tp=tp, fp=evaluated.count_above(cutoffs),
        lesion_max=lesion.max_scores(m),
        fp_components=np.array([lesions_lib.false_positive_components(m, labels, c, nonzero)
                                for c in self._fpr_cutoffs], np.int64),
        score=(float(in_brain_scores.quantile_higher(SUBJECT_SCORE_QUANTILE))
               if in_brain_scores.size else math.nan),
        score_mean=(float(v_brain.sum(dtype=np.float64) / subject.brain_voxels)
                    if subject.brain_voxels else math.nan),
        ap=ap, auroc=auroc,
        lo=float(min(v.min(initial=np.inf), 0.0 if has_zero else np.inf)),
        hi=float(max(v.max(initial=-np.inf), 0.0 if has_zero else -np.inf)))
    return summary, [neg, pos]

  def _subject_row(self, s: _Subject) -> dict:
    return dict(s.meta, voxels=s.voxels, lesion_voxels=s.lesion_voxels,
                brain_voxels=s.brain_voxels, eval_voxels=s.eval_voxels, lesions=s.lesions)

  def result(self) -> EvaluationResult:
    """Cohort metrics from everything added so far (can be called repeatedly)."""
    if not self._subjects:
      raise EvaluationError("empty cohort: no subject was added to the evaluator")
    subjects = self._subjects
    lesion_voxels = np.array([s.lesion_voxels for s in subjects])
    eval_voxels = np.array([s.eval_voxels for s in subjects])
    if self.mode == "healthy" and not eval_voxels.any():
      raise EvaluationError("healthy mode: no subject has a brain voxel outside the lesion "
                            "masks; the FPR is undefined")
    warnings = []
    empty = int(np.count_nonzero(lesion_voxels == 0))
    if self.mode == "lesion" and empty:
      warnings.append(f"{empty} of {len(subjects)} subjects have an empty lesion mask: their "
                      "Dice is NaN where nothing is predicted, which makes the reference mean "
                      "NaN (see dice_nanmean)")
    per_subject, summary = {}, {}
    for p in POSTPROCS:
      per_subject[p] = self._per_subject(p, lesion_voxels, eval_voxels)
      summary[p] = self._summary(p, per_subject[p], eval_voxels)
    return EvaluationResult(self.mode, dict(self.info), self.thresholds, self.kernel_size,
                            [self._subject_row(s) for s in subjects], per_subject, summary,
                            warnings)

  def _per_subject(self, p, lesion_voxels, eval_voxels) -> dict:
    maps = [s.maps[p] for s in self._subjects]
    stack = lambda name: np.stack([getattr(m, name) for m in maps], axis=1)
    out = {"pred_voxels": stack("pred"), "tp_voxels": stack("tp"), "fp_voxels": stack("fp")}
    with np.errstate(invalid="ignore", divide="ignore"):
      out["fpr"] = out["fp_voxels"] / eval_voxels.astype(np.float64)
    if self.mode == "lesion":
      out["dice"] = metrics.dice(out["tp_voxels"], out["pred_voxels"], lesion_voxels)
      out["ap"] = np.array([m.ap for m in maps])
      out["auroc"] = np.array([m.auroc for m in maps])
    out["lesions_hit"] = np.stack([lesions_lib.hits(m.lesion_max, self._cutoffs) for m in maps],
                                  axis=1)
    out["fp_components"] = stack("fp_components").reshape(len(self._fpr_cutoffs), len(maps))
    out["subject_score"] = np.array([m.score for m in maps])
    out["score_mean"] = np.array([m.score_mean for m in maps])
    return out

  def _summary(self, p, per: dict, eval_voxels) -> dict[str, Any]:
    keys = self.thresholds.keys
    fpr_keys = self.thresholds.fpr_keys
    fp_pooled = per["fp_voxels"].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
      fpr_exact = fp_pooled / float(eval_voxels.sum())
    fpr_rounded = metrics.round_fpr(fp_pooled, eval_voxels.sum())
    lesions = int(sum(s.lesions for s in self._subjects))
    hit = per["lesions_hit"].sum(axis=1)
    fp_components = per["fp_components"].sum(axis=1)
    out: dict[str, Any] = {}
    if self.mode == "lesion":
      dice = per["dice"]
      # Row by row with numpy.mean, as the reference averages each threshold's list.
      mean = np.array([np.mean(row) for row in dice])
      nan_count = np.isnan(dice).sum(axis=1)
      with np.errstate(invalid="ignore"):
        nanmean = np.array([np.nan if n == dice.shape[1] else np.nanmean(row)
                            for row, n in zip(dice, nan_count)])
      auprc, auroc, best_pooled, curves = self._pooled_ranking(p)
      out["reference"] = dict(zip(keys, mean.tolist()))
      out["reference"]["AUPRC"] = auprc
      out.update(dice_mean=dict(zip(keys, mean.tolist())),
                 dice_nanmean=dict(zip(keys, nanmean.tolist())),
                 dice_nan_subjects=dict(zip(keys, nan_count.tolist())),
                 auprc=auprc, auroc=auroc,
                 best_mean_dice=self._best_mean_dice(mean), best_pooled_dice=best_pooled,
                 curves=curves)
    else:
      out["reference"] = {k: fpr_rounded[keys.index(k)].item() for k in fpr_keys}
    out.update(
        fpr=dict(zip(keys, fpr_rounded.tolist())),
        fpr_exact=dict(zip(keys, fpr_exact.tolist())),
        subjects_without_brain=int(np.count_nonzero(eval_voxels == 0)),
        lesion_detection={
            "lesions": lesions,
            "hit": dict(zip(keys, hit.tolist())),
            "hit_rate": dict(zip(keys, (hit / lesions if lesions else hit * np.nan).tolist())),
            "fp_components": dict(zip(fpr_keys, fp_components.tolist())),
            "fp_components_per_volume": dict(zip(
                fpr_keys, (fp_components / len(self._subjects)).tolist())),
        },
        subject_score={"definition": f"quantile {SUBJECT_SCORE_QUANTILE} (method 'higher') "
                                     "of the map over brain voxels",
                       "median": float(np.nanmedian(per["subject_score"]))
                       if not np.isnan(per["subject_score"]).all() else math.nan})
    return out

  def _best_mean_dice(self, mean) -> dict | None:
    """The sweep key with the best reference mean Dice (the oracle 'Optimal', spec §6)."""
    n = len(self.thresholds.sweep_keys)
    sweep = mean[:n]
    if not n or np.isnan(sweep).all():
      return None
    j = int(np.nanargmax(sweep))
    key = self.thresholds.sweep_keys[j]
    return {"key": key, "threshold": self.thresholds.threshold_of(key), "value": float(sweep[j])}

  def _pooled_ranking(self, p):
    """AUPRC, AUROC, best pooled Dice and the PR/ROC curve points from the cohort histogram
    of raw or filtered maps."""
    lo = min(s.maps[p].lo for s in self._subjects)
    hi = max(s.maps[p].hi for s in self._subjects)
    if lo == hi:
      raise EvaluationError(
          f"AUPRC undefined: every voxel of every {p} map has the value {lo} (constant maps); "
          "the reference's min-max normalisation divides by zero and scikit-learn raises "
          "'Input contains NaN'. Check the method's scoring.")
    ranked = metrics.ranked_counts(*self._histograms[p])
    dice, lowest = metrics.best_pooled_dice_from_counts(ranked)
    points = metrics.curve_points(ranked, lo)
    curves = None if points is None else {
        "definition": CURVES_DEFINITION, **{k: v.tolist() for k, v in points.items()}}
    return (metrics.average_precision_from_counts(ranked), metrics.roc_auc_from_counts(ranked),
            {"value": dice, "min_score": lowest}, curves)

  def write(self, out_dir, prefix: str) -> dict:
    """Writes every output file (see `outputs.write_outputs`); returns {name: path}."""
    return outputs.write_outputs(self.result(), out_dir, prefix)


def subject_auroc(healthy: EvaluationResult, lesion: EvaluationResult,
                  postproc: str = "raw") -> float:
  """AUROC of the subject score for lesion subjects (positive) against healthy subjects.

  Both results must hold subject scores (every subject has brain voxels); the score is
  `SUBJECT_SCORE_QUANTILE` of the map over brain voxels, recorded in both modes.
  """
  h = healthy.per_subject[postproc]["subject_score"]
  l = lesion.per_subject[postproc]["subject_score"]
  scores = np.concatenate([h, l])
  if np.isnan(scores).any():
    raise EvaluationError("subject AUROC: some subjects have no brain voxel (no subject score)")
  labels = np.r_[np.zeros(h.size, bool), np.ones(l.size, bool)]
  return metrics.auroc(scores, labels)
