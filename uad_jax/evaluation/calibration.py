"""Threshold calibration on healthy validation data (`calc_thr`, evaluation.md §6) as an artifact.

The reference prints the thresholds and the user copies them into the eval config. Here
`Calibrator` pools the brain voxels of the healthy validation maps (raw, no median filter) in
an exact histogram, computes the threshold of every target FPR with the reference's
`roc_curve(drop_intermediate=True)` rule (plus the exact full-curve quantile, for information)
and writes `calibration.json` next to the checkpoint. Evaluation reads the `(fpr, thr)` pairs
back with `load_thresholds` / `threshold_pairs`; no threshold is hand-copied. The engine also
copies the pairs and their provenance into each results.json (`info["calibration"]`,
`results_info`), so the threshold roles travel with the results.

`calibration.json` fields: `schema`, `pairs` (list of {`key`, `fpr`, `thr`, `source`:
'target' | 'opt_thr', `thr_full_curve` (targets), `achieved_fpr`}), `fpr_targets`, `opt_thr`,
`opt_thr_key`, `opt_thr_fpr` (null without a lesion-validation result), `n_voxels`,
`n_subjects`, `validation_csv`, `validation_csv_sha256`, `checkpoint_step`, `method`,
`modality`, `sweep` (the derived `[start, end, step]` threshold sweep, or null when the
config sets one), `created` (UTC ISO 8601). Thresholds are float32 values of the maps written as
the float64 repr (exact when read back and compared in float32, as the reference does).
"""

import datetime
import json
import logging
from pathlib import Path

import numpy as np

from uad_jax.errors import ConfigError, EvaluationError
from uad_jax.evaluation import metrics
from uad_jax.evaluation.histogram import SortedScores, ValueHistogram
from uad_jax.evaluation.thresholds import fpr_key
from uad_jax.utils.atomic import atomic_write_text
from uad_jax.utils.checksum import file_sha256

log = logging.getLogger(__name__)

ARTIFACT_NAME = "calibration.json"
SCHEMA = "uad_jax.evaluation.calibration/1"
# The artifact's fields that travel with every evaluation (results.json `info.calibration`).
RESULTS_INFO_FIELDS = ("pairs", "fpr_targets", "opt_thr", "opt_thr_key", "opt_thr_fpr",
                       "validation_csv", "validation_csv_sha256", "checkpoint_step", "sweep",
                       "created")
# A derived sweep spans the healthy-validation thresholds from FPR 0.5 to 2x the one at 1e-4.
DERIVED_SWEEP_FPRS = (0.5, 1e-4)
DERIVED_SWEEP_STEPS = 50


class Calibrator:
  """Streaming `calc_thr`: pooled scores of healthy validation brain voxels (brain & ~lesion)."""

  def __init__(self):
    self._histogram = ValueHistogram()
    self.n_subjects = 0

  def add(self, scores, labels=None, brain=None, meta: dict | None = None) -> None:
    """Adds one healthy validation subject (same arguments as `Evaluator.add`).

    scores: (H, W, Z) float32 raw anomaly map (reference layout); labels: (H, W, Z) bool lesion
    mask or None; brain: (H, W, Z) bool (intensity != 0) or None = every voxel. The pooled
    voxels are `brain & ~labels`, the reference's label==False voxels.
    """
    name = str((meta or {}).get("path", f"subject-{self.n_subjects}"))
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 3:
      raise EvaluationError(f"{name}: expected an (H, W, Z) anomaly map, got {scores.shape}")
    selected = np.ones(scores.shape, bool)
    if labels is not None:
      selected &= ~metrics.check_mask(labels, scores.shape, f"{name}: labels")
    if brain is not None:
      selected &= metrics.check_mask(brain, scores.shape, f"{name}: brain")
    values = scores[selected]
    if not np.isfinite(values).all():
      raise EvaluationError(f"{name}: the anomaly map has NaN or infinite brain voxels")
    self._histogram.add(SortedScores.from_values(values))
    self.n_subjects += 1

  @property
  def n_voxels(self) -> int:
    _, counts = self._histogram.table()
    return int(counts.sum())

  def _table(self):
    values, counts = self._histogram.table()
    if counts.sum() == 0:
      raise EvaluationError("calibration: no brain voxel in the healthy validation set "
                            f"({self.n_subjects} subjects added)")
    return values, counts

  def thresholds(self, fprs, drop_intermediate: bool = True) -> np.ndarray:
    """(F,) float32 thresholds for target FPRs (the reference's printed values by default)."""
    values, counts = self._table()
    return metrics.threshold_at_fpr_from_counts(values, counts, fprs, drop_intermediate)

  def fpr_at(self, threshold) -> float:
    """Pooled FPR (strict `>`, float32 compare, 5 decimals) of a config-style threshold."""
    values, counts = self._table()
    fp = counts[values > np.float32(threshold)].sum()
    return float(metrics.round_fpr(fp, counts.sum()))

  def derived_sweep(self) -> tuple[float, float, float]:
    """`(start, end, step)` of a threshold sweep for a model whose score scale is not known in
    advance: DERIVED_SWEEP_STEPS steps (2 significant digits) from the healthy-validation
    threshold at FPR 0.5 to twice the one at FPR 1e-4, so the sweep covers the brain's upper
    tail, where lesions lie, on any score scale."""
    values, _ = self._table()
    if not values.size:
      raise EvaluationError("calibration: no healthy validation voxel to derive a threshold "
                            "sweep from; set eval.thr_start/thr_end/thr_step")
    # Below the resolution of the voxel count the threshold is infinite: use the top score.
    lo, hi = (float(t) if np.isfinite(t) else float(values[-1])
              for t in self.thresholds(np.array(DERIVED_SWEEP_FPRS), drop_intermediate=False))
    hi = max(2.0 * hi, lo + 1e-12)
    step = float(f"{(hi - lo) / DERIVED_SWEEP_STEPS:.2g}")
    start = float(f"{np.floor(lo / step) * step:.6g}")
    return start, start + DERIVED_SWEEP_STEPS * step, step

  def artifact(self, fpr_targets, *, lesion_result=None, postproc: str = "raw",
               validation_csv=None, checkpoint_step=None, method=None, modality=None,
               warnings=(), sweep=None) -> dict:
    """The calibration document (see the module docstring).

    warnings: caveats of the scored model (e.g. random backbone weights), kept in the document.
    lesion_result: the `EvaluationResult` of the lesion-validation cohort (lesion mode); its
    best sweep key of the mean Dice (`postproc` maps) is `opt_thr`, and the healthy FPR of
    `opt_thr` names its key, as in the reference's configs (spec §6).
    """
    fprs = metrics.check_fprs(fpr_targets)
    thinned = self.thresholds(fprs)
    full = self.thresholds(fprs, drop_intermediate=False)
    if not np.isfinite(thinned).all():
      raise EvaluationError(
          f"calibration: FPR targets {fprs[~np.isfinite(thinned)].tolist()} are below the "
          f"resolution of {self.n_voxels} validation voxels (no finite threshold)")
    pairs = [{"key": fpr_key(f), "fpr": float(f), "thr": float(t), "source": "target",
              "thr_full_curve": float(u), "achieved_fpr": self.fpr_at(t)}
             for f, t, u in zip(fprs, thinned, full)]
    opt = {"opt_thr": None, "opt_thr_key": None, "opt_thr_fpr": None}
    if lesion_result is not None:
      best = lesion_result.summary[postproc].get("best_mean_dice")
      if best is None:
        raise EvaluationError("calibration: the lesion-validation result has no defined mean "
                              "Dice on its sweep (no opt_thr)")
      fpr = self.fpr_at(best["threshold"])
      opt = {"opt_thr": best["threshold"], "opt_thr_key": best["key"], "opt_thr_fpr": fpr}
      pairs.append({"key": fpr_key(fpr), "fpr": fpr, "thr": float(best["threshold"]),
                    "source": "opt_thr", "achieved_fpr": fpr})
    for p in pairs:
      log.info("Threshold for FPR equal to %s is %r", p["fpr"], p["thr"])
    csv = None if validation_csv is None else Path(validation_csv)
    return {
        "schema": SCHEMA,
        "pairs": pairs,
        "fpr_targets": fprs.tolist(),
        **opt,
        "n_voxels": self.n_voxels,
        "n_subjects": self.n_subjects,
        "validation_csv": None if csv is None else str(csv),
        "validation_csv_sha256": None if csv is None else file_sha256(csv),
        "checkpoint_step": checkpoint_step,
        "method": method,
        "modality": modality,
        "warnings": list(warnings),
        "sweep": None if sweep is None else [float(v) for v in sweep],
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

  def write(self, directory, fpr_targets, **kwargs) -> Path:
    """Writes `<directory>/calibration.json` atomically (kwargs as for `artifact`)."""
    path = Path(directory) / ARTIFACT_NAME
    doc = self.artifact(fpr_targets, **kwargs)
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def load_artifact(directory) -> dict:
  """Reads `<directory>/calibration.json`; a missing file says how to make it."""
  path = Path(directory) / ARTIFACT_NAME
  if not path.is_file():
    raise ConfigError(
        f"no calibrated thresholds at {path}: run `python -m uad_jax.eval ... --calibrate` "
        "(healthy validation set, and the lesion validation set for opt_thr) for this "
        "checkpoint first, or give explicit (fpr, thr) pairs")
  doc = json.loads(path.read_text())
  if doc.get("schema") != SCHEMA:
    raise ConfigError(f"{path}: schema {doc.get('schema')!r}, expected {SCHEMA!r}")
  return doc


def sweep_of(eval_config, artifact: dict | None) -> tuple[float, float, float]:
  """The threshold sweep of an evaluation: the config's `(thr_start, thr_end, thr_step)`, or,
  when eval.thr_step is 0 (no range set), the one derived at calibration (`artifact`)."""
  if eval_config.thr_step:
    return (eval_config.thr_start, eval_config.thr_end, eval_config.thr_step)
  if artifact is None or not artifact.get("sweep"):
    raise ConfigError("eval.thr_step is 0 (a threshold sweep derived from the healthy "
                      "validation scores) but the calibration has none: run "
                      "`python -m uad_jax.eval ... --calibrate` again")
  return tuple(artifact["sweep"])


def threshold_pairs(artifact: dict) -> list[tuple[float, float]]:
  """The `(fpr, thr)` pairs of a calibration document, in its order (for `ThresholdSet`)."""
  return [(p["fpr"], p["thr"]) for p in artifact["pairs"]]


def load_thresholds(directory) -> list[tuple[float, float]]:
  """The `(fpr, thr)` pairs of `<directory>/calibration.json`, in its order."""
  return threshold_pairs(load_artifact(directory))


def results_info(artifact: dict) -> dict:
  """What an evaluation's `info["calibration"]` records of the artifact it used: the pairs
  (key, fpr, thr, source 'target' | 'opt_thr', achieved_fpr, ...), targets, opt_thr, its key
  and FPR, the validation CSV and its sha256, the checkpoint step, the creation time. Makes
  results.json self-contained: the report takes the threshold roles from it."""
  return {k: artifact.get(k) for k in RESULTS_INFO_FIELDS}
