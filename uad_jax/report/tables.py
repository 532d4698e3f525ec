"""The report's tables: per method x cohort metrics and the bias analysis (evaluation.md §10).

All tables are long (tidy) DataFrames, written as CSV; `wide_summary` and `markdown` make the
readable versions. Metrics (column `metric`, with `role` = 'best' or a calibrated threshold's
role, see `load`):
- `dice`: mean per-subject Dice at the cohort's best sweep threshold (role 'best', the paper's
  "Optimal"; the threshold is held fixed in the bootstrap) or at a calibrated threshold;
- `auprc`, `auroc_voxel`: pooled over every voxel of the cohort (results.json; the reference
  protocol's AUPRC): one number per cohort, no CI, no strata;
- `ap_mean`, `auroc_voxel_mean`: mean over subjects of each subject's own voxel AP / AUROC
  (subjects with a lesion): per-subject values, so with a bootstrap CI and strata. Not the
  pooled numbers above (every subject weighs the same, however large its lesion);
- `auroc_subject`: subject score of the lesion cohort against the run's healthy cohorts;
- `detection`: lesion-wise detection rate, Σ lesions hit / Σ lesions;
- `fp_components`: false-positive connected components per volume;
- `fpr`: pooled FPR over lesion-free brain voxels, Σ fp / Σ brain (exact, not rounded).
"""

import dataclasses
import math

import numpy as np
import pandas as pd

from uad_jax.evaluation import metrics
from uad_jax.report import stats

SUMMARY_COLUMNS = ("run", "method", "modality", "cohort", "mode", "postproc", "metric", "role",
                   "threshold_key", "threshold", "value", "ci_low", "ci_high", "n", "note")
STRATA_COLUMNS = ("run", "modality", "postproc", "scope", "factor", "stratum", "metric", "role",
                  "n", "value", "ci_low", "ci_high", "median", "note")
TEST_COLUMNS = ("run", "modality", "postproc", "scope", "metric", "role", "factor", "test",
                "statistic", "p", "p_holm", "effect", "effect_name", "strata", "n", "note")
# Stratification factors: (column of the per-subject table, label, continuous column and its
# label for an added Spearman trend, or None).
FACTORS = (("scanner", "scanner", None), ("lesion_type", "lesion type", None),
           ("size_quartile", "lesion-size quartile", ("lesion_size", "lesion size (voxels)")),
           ("age_bin", "age bin", ("age", "age (years)")), ("sex", "sex", None))
HEALTHY_FACTORS = ("scanner", "age_bin", "sex")
ALL_LESION = "all lesion cohorts"
ALL_HEALTHY = "all healthy cohorts"
METRIC_LABELS = {"dice": "Dice", "auprc": "AUPRC (pooled)",
                 "ap_mean": "AP (mean per subject)", "auroc_voxel": "voxel AUROC (pooled)",
                 "auroc_voxel_mean": "voxel AUROC (mean per subject)",
                 "auroc_subject": "subject AUROC", "detection": "lesion detection",
                 "fp_components": "FP components / volume", "fpr": "FPR"}
# The paper's ranking (UAD-IMAG, Fig. 2: mean best Dice over its lesion datasets).
PAPER_MEAN_BEST_DICE = {"disyre": 0.303, "andi": 0.211, "fae": 0.177, "patchcore": 0.162,
                        "uniad": 0.148, "reverse_distillation": 0.115, "itermask": 0.114,
                        "riad": 0.108}
BASELINES = ("intensity", "zscore")
# Per-subject ranking metrics (lesion cohorts; role ""): metric -> subjects.csv column.
RANKING_METRICS = {"ap_mean": "ap", "auroc_voxel_mean": "auroc"}


@dataclasses.dataclass(frozen=True)
class Options:
  """Statistics settings shared by every table (fixed seed: deterministic reports)."""
  n_resamples: int = stats.N_RESAMPLES
  seed: int = stats.SEED
  min_stratum: int = stats.MIN_STRATUM

  def mean_ci(self, values) -> tuple[float, float]:
    return stats.bootstrap_ci(values, stats.mean_statistic, n_resamples=self.n_resamples,
                              seed=self.seed)

  def ratio_ci(self, num, den) -> tuple[float, float]:
    return stats.bootstrap_ci(np.stack([num, den], axis=1), stats.ratio_statistic,
                              n_resamples=self.n_resamples, seed=self.seed)


def add_strata(subjects: pd.DataFrame) -> pd.DataFrame:
  """Adds `age_bin` and `size_quartile` (within each lesion cohort of a run) columns."""
  out = subjects.copy()
  out["age_bin"] = [stats.age_bin(a) for a in out["age"]]
  out["size_quartile"] = None
  lesion = out["mode"] == "lesion"
  for _, index in out[lesion].groupby(["run", "modality", "cohort", "postproc"]).groups.items():
    labels, _ = stats.size_quartiles(out.loc[index, "lesion_size"].to_numpy(np.float64))
    out.loc[index, "size_quartile"] = labels
  return out


def per_subject_values(rows: pd.DataFrame, metric: str, role: str) -> np.ndarray:
  """Per-subject values of a metric (NaN where undefined)."""
  if metric in RANKING_METRICS:
    return rows[RANKING_METRICS[metric]].to_numpy(np.float64)
  if metric == "dice":
    return rows[f"dice_{role}" if role == "best" else f"dice@{role}"].to_numpy(np.float64)
  if metric == "detection":
    with np.errstate(invalid="ignore", divide="ignore"):
      return (rows[f"lesions_hit@{role}"].to_numpy(np.float64)
              / rows["lesions"].to_numpy(np.float64))
  if metric == "fpr":
    return rows[f"fpr@{role}"].to_numpy(np.float64)
  if metric == "fp_components":
    return rows[f"fp_components@{role}"].to_numpy(np.float64)
  raise KeyError(metric)


def _ratio_parts(rows: pd.DataFrame, metric: str, role: str):
  """(numerator, denominator) per subject of a pooled-rate metric, or None for means."""
  if metric == "detection":
    return rows[f"lesions_hit@{role}"].to_numpy(np.float64), rows["lesions"].to_numpy(np.float64)
  if metric == "fpr":
    return (rows[f"fp_voxels@{role}"].to_numpy(np.float64),
            rows["eval_voxels"].to_numpy(np.float64))
  return None


def estimate(rows: pd.DataFrame, metric: str, role: str, options: Options) -> dict:
  """Value, 95 % CI and n of a per-subject metric over `rows` (mean, or pooled ratio)."""
  parts = _ratio_parts(rows, metric, role)
  if parts is None:
    values = per_subject_values(rows, metric, role)
    values = values[np.isfinite(values)]
    if not values.size:
      return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    low, high = options.mean_ci(values)
    return {"value": float(values.mean()), "ci_low": low, "ci_high": high, "n": values.size}
  num, den = parts
  ok = np.isfinite(num) & np.isfinite(den) & (den > 0)
  num, den = num[ok], den[ok]
  if not num.size:
    return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
  low, high = options.ratio_ci(num, den)
  return {"value": float(num.sum() / den.sum()), "ci_low": low, "ci_high": high,
          "n": int(num.size)}


def _metric_roles(cohort) -> list[tuple[str, str]]:
  """(metric, role) pairs with per-subject values for a cohort's mode."""
  roles = list(cohort.roles)
  if cohort.mode == "lesion":
    return ([("dice", "best")] + [("dice", r) for r in roles]
            + [(m, "") for m in RANKING_METRICS]
            + [("detection", r) for r in roles] + [("fp_components", r) for r in roles]
            + [("fpr", r) for r in roles])
  return [("fpr", r) for r in roles] + [("fp_components", r) for r in roles]


def summary_table(cohorts, subjects: pd.DataFrame, options: Options) -> pd.DataFrame:
  """Per run x cohort x postproc every metric with its 95 % CI (long format)."""
  rows = []
  for c in cohorts:
    healthy = [h for h in cohorts if h.mode == "healthy" and h.run == c.run
               and h.modality == c.modality]
    keys = {t.role: (t.key, t.value) for t in c.calibrated}
    for p in ("raw", "mf"):
      s = c.summary(p)
      mine = subjects[(subjects["run"] == c.run) & (subjects["modality"] == c.modality)
                      & (subjects["cohort"] == c.cohort) & (subjects["postproc"] == p)]
      base = {"run": c.run, "method": c.method, "modality": c.modality, "cohort": c.cohort,
              "mode": c.mode, "postproc": p}
      for metric, role in _metric_roles(c):
        if role == "best":
          best = s.get("best_mean_dice")
          key, thr = (best["key"], best["threshold"]) if best else ("", math.nan)
        else:
          key, thr = keys.get(role, ("", math.nan))
        est = estimate(mine, metric, role, options)
        note = ("no per-subject value (outputs written before they were stored, or no "
                "subject with a lesion)" if metric in RANKING_METRICS and not est["n"] else "")
        rows.append(dict(base, metric=metric, role=role, threshold_key=key, threshold=thr,
                         note=note, **est))
      if c.mode == "lesion":
        note = ("pooled over every voxel of the cohort (reference protocol): no CI; see the "
                "mean per-subject values for CIs")
        for metric, value in (("auprc", s.get("auprc")), ("auroc_voxel", s.get("auroc"))):
          rows.append(dict(base, metric=metric, role="", threshold_key="", threshold=math.nan,
                           value=_num(value), ci_low=math.nan, ci_high=math.nan,
                           n=len(mine), note=note))
        rows.append(dict(base, metric="auroc_subject", role="", threshold_key="",
                         threshold=math.nan, **_subject_auroc(mine, subjects, healthy, p,
                                                              options)))
  return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def _num(value) -> float:
  return math.nan if value is None else float(value)


def _subject_auroc(lesion_rows, subjects, healthy, postproc, options) -> dict:
  """Subject-score AUROC of lesion subjects (positive) vs the run's healthy subjects."""
  if not healthy:
    return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": len(lesion_rows),
            "note": "no healthy cohort in this run"}
  names = [h.cohort for h in healthy]
  h = subjects[(subjects["run"] == healthy[0].run) & (subjects["modality"] == healthy[0].modality)
               & subjects["cohort"].isin(names) & (subjects["postproc"] == postproc)]
  x = h["subject_score"].to_numpy(np.float64)
  y = lesion_rows["subject_score"].to_numpy(np.float64)
  x, y = x[np.isfinite(x)], y[np.isfinite(y)]
  auc = lambda a, b: metrics.auroc(np.r_[a, b], np.r_[np.zeros(a.size, bool),
                                                      np.ones(b.size, bool)])
  low, high = stats.bootstrap_ci_two_sample(x, y, auc, n_resamples=options.n_resamples,
                                            seed=options.seed)
  return {"value": auc(x, y), "ci_low": low, "ci_high": high, "n": int(x.size + y.size),
          "note": f"vs {', '.join(names)} ({x.size} healthy subjects)"}


def _scopes(subjects: pd.DataFrame):
  """(scope name, rows, mode) per run/modality/postproc: every cohort, and the lesion (healthy)
  cohorts pooled when there are several."""
  for (run, modality, postproc), rows in subjects.groupby(["run", "modality", "postproc"],
                                                          sort=False):
    for mode, pooled in (("lesion", ALL_LESION), ("healthy", ALL_HEALTHY)):
      part = rows[rows["mode"] == mode]
      names = list(dict.fromkeys(part["cohort"]))
      if len(names) > 1:
        yield (run, modality, postproc), pooled, part, mode
      for name in names:
        yield (run, modality, postproc), name, part[part["cohort"] == name], mode


def bias_tables(cohorts, subjects: pd.DataFrame,
                options: Options) -> tuple[pd.DataFrame, pd.DataFrame]:
  """(strata, tests): per-stratum metrics with CIs and the tests across strata.

  Lesion scopes: Dice (best and calibrated), per-subject voxel AP and AUROC (`ap_mean`,
  `auroc_voxel_mean`) and lesion detection by scanner, lesion type,
  size quartile, age bin and sex (plus Spearman vs age and lesion size); healthy scopes: FPR by
  scanner, age bin and sex (plus Spearman vs age). Holm correction within each family = one
  outcome (metric, role) in one scope of one run, postproc.
  """
  roles = {(c.run, c.modality): list(c.roles) for c in cohorts}
  strata_rows, test_rows = [], []
  for (run, modality, postproc), scope, rows, mode in _scopes(subjects):
    run_roles = roles[(run, modality)]
    outcomes = ([("dice", "best")] + [("dice", r) for r in run_roles]
                + [(m, "") for m in RANKING_METRICS]
                + [("detection", r) for r in run_roles]) if mode == "lesion" else [
                    ("fpr", r) for r in run_roles]
    factors = [f for f in FACTORS if mode == "lesion" or f[0] in HEALTHY_FACTORS]
    base = {"run": run, "modality": modality, "postproc": postproc, "scope": scope}
    for metric, role in outcomes:
      family = []
      per_subject = per_subject_values(rows, metric, role)
      for column, label, continuous in factors:
        levels = rows[column]
        known = levels.notna().to_numpy()
        names = ordered_levels(column, levels[known])
        if len(names) < 2:
          continue   # constant factor in this scope (e.g. lesion type of one cohort)
        groups = {}
        for name in names:
          sel = (levels == name).to_numpy()
          groups[name] = per_subject[sel]
          part = rows[sel]
          n = int(np.isfinite(per_subject[sel]).sum())
          row = dict(base, factor=label, stratum=name, metric=metric, role=role, n=n)
          if n < options.min_stratum:
            row.update(value=math.nan, ci_low=math.nan, ci_high=math.nan, median=math.nan,
                       note=f"n < {options.min_stratum}")
          else:
            est = estimate(part, metric, role, options)
            row.update(value=est["value"], ci_low=est["ci_low"], ci_high=est["ci_high"],
                       median=float(np.nanmedian(per_subject[sel])), note="")
          strata_rows.append(row)
        unknown = int((~known).sum())
        family.append((label, stats.compare_strata(groups, options.min_stratum), unknown))
        if continuous:
          trend_column, trend_label = continuous
          family.append((trend_label, stats.spearman_trend(
              rows[trend_column].to_numpy(np.float64), per_subject, options.min_stratum), 0))
      adjusted = stats.holm([t.p for _, t, _ in family])
      for (label, t, unknown), p_holm in zip(family, adjusted):
        note = t.note + (f"; {unknown} subjects of unknown {label}" if unknown else "")
        test_rows.append(dict(base, metric=metric, role=role, factor=label, test=t.test,
                              statistic=t.statistic, p=t.p, p_holm=p_holm, effect=t.effect,
                              effect_name=t.effect_name, strata=" | ".join(t.strata), n=t.n,
                              note=note.strip("; ")))
  return (pd.DataFrame(strata_rows, columns=STRATA_COLUMNS),
          pd.DataFrame(test_rows, columns=TEST_COLUMNS))


def ordered_levels(column: str, values: pd.Series) -> list[str]:
  present = set(values)
  if column == "age_bin":
    return [label for _, _, label in stats.AGE_BINS if label in present]
  if column == "size_quartile":
    return [label for label in stats.QUARTILE_LABELS if label in present]
  return sorted(present, key=str)


# ----------------------------------------------------------------------------- formatting

def format_number(value, digits: int = 3) -> str:
  """`digits` decimals; `digits` significant digits below 0.1 (FPRs such as 0.00267), one
  decimal from 10 on."""
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return "n/a"
  value = float(value)
  if value != 0 and abs(value) < 0.1:
    return f"{value:.{digits}g}"
  if abs(value) >= 10:   # counts such as false-positive components per volume
    return f"{value:.1f}"
  return f"{value:.{digits}f}"


def format_estimate(row, digits: int = 3) -> str:
  """'0.412 [0.351, 0.470]', the note for strata too small for a number, or 'n/a'."""
  note = row.get("note", "") if hasattr(row, "get") else ""
  if isinstance(note, str) and note.startswith("n < "):
    return note
  text = format_number(row["value"], digits)
  if math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"]):
    text += f" [{format_number(row['ci_low'], digits)}, {format_number(row['ci_high'], digits)}]"
  return text


def column_label(metric: str, role: str) -> str:
  label = METRIC_LABELS[metric]
  if role == "best":
    return f"{label} @best"
  return f"{label} @{role}" if role else label


def wide_summary(summary: pd.DataFrame, mode: str, metric_set) -> pd.DataFrame:
  """Readable table: one row per run x cohort x postproc, one column per (metric, role)."""
  part = summary[(summary["mode"] == mode) & summary["metric"].isin(metric_set)]
  if part.empty:
    return pd.DataFrame()
  ids = ["modality", "run", "cohort", "postproc"]
  order = [(m, r) for m in metric_set for r in dict.fromkeys(part.loc[part["metric"] == m,
                                                                        "role"])]
  out = []
  for key, rows in part.groupby(ids, sort=False):
    row = dict(zip(ids, key))
    row["n"] = int(rows.loc[rows["metric"] == metric_set[0], "n"].max())
    for metric, role in order:
      sel = rows[(rows["metric"] == metric) & (rows["role"] == role)]
      text = format_estimate(sel.iloc[0]) if len(sel) else "–"
      if len(sel) and role == "best" and sel.iloc[0]["threshold_key"]:
        text += f" (thr {sel.iloc[0]['threshold_key']})"
      row[column_label(metric, role)] = text
    out.append(row)
  return pd.DataFrame(out)


def ranking_table(summary: pd.DataFrame) -> pd.DataFrame:
  """Every run ranked by its mean Dice @best over its lesion cohorts (raw maps, the paper's
  Fig. 2 statistic), with per cohort Dice @best [95 % CI] and the pooled voxel AUROC, and the
  paper's mean best Dice and rank of the method beside it (baselines: 'baseline')."""
  raw = summary[(summary["mode"] == "lesion") & (summary["postproc"] == "raw")]
  dice = raw[(raw["metric"] == "dice") & (raw["role"] == "best")]
  if dice.empty:
    return pd.DataFrame()
  auroc = raw[raw["metric"] == "auroc_voxel"].set_index(["run", "modality", "cohort"])["value"]
  paper_rank = {m: i + 1 for i, m in enumerate(sorted(PAPER_MEAN_BEST_DICE,
                                                      key=PAPER_MEAN_BEST_DICE.get,
                                                      reverse=True))}
  rows = []
  for (run, method, modality), part in dice.groupby(["run", "method", "modality"], sort=False):
    row = {"run": run, "method": method, "modality": modality,
           "mean Dice @best": float(part["value"].mean())}
    for _, r in part.iterrows():
      row[f"{r['cohort']}: Dice @best"] = format_estimate(r)
      row[f"{r['cohort']}: voxel AUROC"] = format_number(
          auroc.get((run, modality, r["cohort"]), math.nan))
    if method in PAPER_MEAN_BEST_DICE:
      row["paper: mean best Dice (rank)"] = (f"{PAPER_MEAN_BEST_DICE[method]:.3f} "
                                             f"({paper_rank[method]})")
    else:
      row["paper: mean best Dice (rank)"] = "baseline" if method in BASELINES else "–"
    rows.append(row)
  table = pd.DataFrame(rows).sort_values("mean Dice @best", ascending=False, kind="stable")
  table.insert(0, "rank", np.arange(1, len(table) + 1))
  table["mean Dice @best"] = table["mean Dice @best"].map(format_number)
  return table.fillna("–").reset_index(drop=True)


def strata_display(strata: pd.DataFrame) -> pd.DataFrame:
  """Strata table with formatted estimates ('n < 3' where too small)."""
  if strata.empty:
    return strata
  out = strata[["run", "modality", "postproc", "scope", "factor", "stratum", "metric",
                "role", "n"]].copy()
  out["metric"] = [column_label(m, r) for m, r in zip(strata["metric"], strata["role"])]
  out = out.drop(columns="role")
  out["value [95% CI]"] = [format_estimate(r) for _, r in strata.iterrows()]
  out["median"] = [("" if r["note"] else format_number(r["median"])) for _, r in
                   strata.iterrows()]
  return out


def tests_display(tests: pd.DataFrame) -> pd.DataFrame:
  if tests.empty:
    return tests
  out = tests[["run", "modality", "postproc", "scope", "metric", "role", "factor", "test"]].copy()
  out["metric"] = [column_label(m, r) for m, r in zip(tests["metric"], tests["role"])]
  out = out.drop(columns="role")
  out["statistic"] = [format_number(v) for v in tests["statistic"]]
  out["p"] = [format_number(v, 4) for v in tests["p"]]
  out["p (Holm)"] = [format_number(v, 4) for v in tests["p_holm"]]
  out["effect"] = [f"{format_number(v)} ({name})" if name else "n/a"
                   for v, name in zip(tests["effect"], tests["effect_name"])]
  out["n"] = tests["n"]
  out["strata / note"] = [s if not note else (f"{s}; {note}" if s else note)
                          for s, note in zip(tests["strata"], tests["note"])]
  return out


def markdown(table: pd.DataFrame) -> str:
  """A GitHub-flavoured Markdown table (cells' '|' escaped)."""
  if table.empty:
    return "(no rows)\n"
  cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(cell(c) for c in table.columns) + " |",
           "|" + "---|" * len(table.columns)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |"
            for row in table.itertuples(index=False)]
  return "\n".join(lines) + "\n"
