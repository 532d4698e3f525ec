"""Files written from an `EvaluationResult` (all atomic; the report module reads them).

In the output directory:
- `<prefix>_raw.csv`, `<prefix>_mf.csv`: the reference's CSVs for raw and median-filtered
  maps, byte-compatible with its pandas output: header `thr,value`; rows in order: lesion mode
  — every sweep key (mean Dice over subjects), every `FPR-<fpr>` key (mean Dice at that
  threshold), `AUPRC`; healthy mode — every `FPR-<fpr>` key (pooled brain-voxel FPR, 5
  decimals). Values: shortest round-trip repr of the float64, NaN as an empty field.
- `results.json`: `EvaluationResult.to_json()` — `mode`, `info`, `n_subjects`, `counts`,
  `thresholds` (keys, sweep values, FPR targets and thresholds), `warnings`, and per postproc
  (`raw`, `mf`): `reference` (the CSV rows), `fpr` / `fpr_exact` (pooled FPR over lesion-free
  brain voxels per key, rounded / exact), `subjects_without_brain`, `lesion_detection`
  (`lesions`, `hit` and `hit_rate` per key, `fp_components` and `fp_components_per_volume`
  per FPR key), `subject_score` (definition, median); lesion mode also `dice_mean`,
  `dice_nanmean`, `dice_nan_subjects` (per key), `auprc`, `auroc`, `best_mean_dice` (`key`,
  `threshold`, `value`: best sweep key of the mean Dice), `best_pooled_dice` (`value`,
  `min_score`: best pooled Dice over every threshold, predicting score >= min_score),
  `curves` (exact points of the pooled-voxel PR and ROC curves, thinned: `definition`,
  `threshold` (descending, null = +inf), `tp`, `fp`, `precision`, `recall`, `fpr`; see
  `metrics.curve_points`; null without lesion voxels). `info.calibration` (written by the
  engine): the calibration artifact's threshold pairs and provenance (see
  `calibration.results_info`). NaN/undefined values are `null`.
- `subjects.csv`: tidy, one row per subject × postproc: `subject_path`, metadata columns
  (`subject`, `dataset`, `lesion_type`, `scanner`, `age`, `sex`, `lesion_voxels_uncropped`
  where known, then any other metadata), `postproc`, `voxels`, `lesion_voxels` (cropped
  mask), `brain_voxels`, `eval_voxels` (brain & ~lesion), `lesions`, `subject_score`,
  `score_mean`; lesion mode: `best_key`, `dice_best` (Dice at the cohort's best sweep key of
  that postproc), `ap`, `auroc` (the subject's voxel AP and AUROC over every voxel of its
  volume, empty for an empty mask); per FPR key K: `dice@K` (lesion mode), `fpr@K`,
  `pred_voxels@K`, `lesions_hit@K`, `fp_components@K`.
- `subject_metrics.csv`: long format `subject_path, metric, threshold_key, postproc, value`:
  per key `dice` (lesion mode), `fpr`, `pred_voxels`, `tp_voxels`, `fp_voxels`,
  `lesions_hit`; per FPR key `fp_components`; with an empty threshold_key `subject_score`,
  `score_mean`, (lesion mode) `ap`, `auroc`, and `voxels`, `lesion_voxels`, `brain_voxels`,
  `eval_voxels`, `lesions`. Values are floats (counts too), NaN as an empty field.
"""

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from uad_jax.utils.atomic import atomic_write_text

POSTPROCS = ("raw", "mf")
_META_FIRST = ("subject", "dataset", "lesion_type", "scanner", "age", "sex",
               "lesion_voxels_uncropped")
_COUNTS = ("voxels", "lesion_voxels", "brain_voxels", "eval_voxels", "lesions")
_PER_KEY = ("dice", "fpr", "pred_voxels", "tp_voxels", "fp_voxels", "lesions_hit")
_PER_SUBJECT = ("subject_score", "score_mean", "ap", "auroc")


def format_value(value) -> str:
  """pandas' `to_csv` text of a float64: shortest round-trip repr, NaN as empty."""
  value = float(value)
  return "" if math.isnan(value) else repr(value)


def reference_csv_text(rows) -> str:
  """The reference CSV (`thr,value`) of (key, value) rows."""
  return "thr,value\n" + "".join(f"{k},{format_value(v)}\n" for k, v in rows)


def subjects_table(result) -> pd.DataFrame:
  """One row per subject × postproc with metadata and the main per-subject metrics."""
  meta_keys = {k for s in result.subjects for k in s} - set(_COUNTS) - {"path"}
  meta_cols = [k for k in _META_FIRST if k in meta_keys] + sorted(meta_keys - set(_META_FIRST))
  fpr_keys = result.thresholds.fpr_keys
  keys = result.thresholds.keys
  rows = []
  for p in POSTPROCS:
    per = result.per_subject[p]
    best = result.best_key(p) if result.mode == "lesion" else None
    for i, s in enumerate(result.subjects):
      row = {"subject_path": s["path"]}
      row.update({k: _cell(s.get(k)) for k in meta_cols})
      row["postproc"] = p
      row.update({k: s[k] for k in _COUNTS})
      row["subject_score"] = per["subject_score"][i]
      row["score_mean"] = per["score_mean"][i]
      if result.mode == "lesion":
        row["best_key"] = best
        row["dice_best"] = per["dice"][keys.index(best), i] if best else math.nan
        row["ap"] = per["ap"][i]
        row["auroc"] = per["auroc"][i]
      for f, key in enumerate(fpr_keys):
        t = keys.index(key)
        if result.mode == "lesion":
          row[f"dice@{key}"] = per["dice"][t, i]
        row[f"fpr@{key}"] = per["fpr"][t, i]
        row[f"pred_voxels@{key}"] = per["pred_voxels"][t, i]
        row[f"lesions_hit@{key}"] = per["lesions_hit"][t, i]
        row[f"fp_components@{key}"] = per["fp_components"][f, i]
      rows.append(row)
  return pd.DataFrame(rows)


def _cell(value):
  return value if value is None or np.isscalar(value) else str(value)


def subject_metrics_table(result) -> pd.DataFrame:
  """Long table: subject_path, metric, threshold_key, postproc, value (every threshold)."""
  paths = np.array([s["path"] for s in result.subjects], object)
  n = paths.size
  keys = np.array(result.thresholds.keys, object)
  fpr_keys = np.array(result.thresholds.fpr_keys, object)
  parts = []

  def add(metric, values, threshold_keys, postproc):
    values = np.asarray(values, np.float64).reshape(len(threshold_keys), n)
    parts.append(pd.DataFrame({
        "subject_path": np.tile(paths, len(threshold_keys)),
        "metric": metric,
        "threshold_key": np.repeat(threshold_keys, n),
        "postproc": postproc,
        "value": values.ravel()}))

  for p in POSTPROCS:
    per = result.per_subject[p]
    for metric in _PER_KEY:
      if metric in per:
        add(metric, per[metric], keys, p)
    add("fp_components", per["fp_components"], fpr_keys, p)
    for metric in _PER_SUBJECT:
      if metric in per:
        add(metric, per[metric], np.array([""], object), p)
    for metric in _COUNTS:
      add(metric, [s[metric] for s in result.subjects], np.array([""], object), p)
  return pd.concat(parts, ignore_index=True)


def write_outputs(result, out_dir, prefix: str) -> dict[str, Path]:
  """Writes the five files described in the module docstring; returns {name: path}."""
  out_dir = Path(out_dir)
  paths = {f"csv_{p}": out_dir / f"{prefix}_{p}.csv" for p in POSTPROCS}
  paths.update(results=out_dir / "results.json", subjects=out_dir / "subjects.csv",
               subject_metrics=out_dir / "subject_metrics.csv")
  for p in POSTPROCS:
    atomic_write_text(paths[f"csv_{p}"], reference_csv_text(result.reference_rows(p)))
  atomic_write_text(paths["results"],
                    json.dumps(result.to_json(), indent=1, allow_nan=False) + "\n")
  atomic_write_text(paths["subjects"], subjects_table(result).to_csv(index=False))
  atomic_write_text(paths["subject_metrics"], subject_metrics_table(result).to_csv(index=False))
  return paths
