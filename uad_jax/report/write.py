"""Builds the whole report from evaluation outputs: tables, figures, index.html, TensorBoard.

Layout of the report folder (written into a temporary sibling, renamed when complete):
  index.html                       every table and figure (open in a browser, offline)
  tables/summary.csv               per run x cohort x postproc every metric, 95 % CI (long)
  tables/{ranking,models,segmentation,detection,healthy}.md   the readable (wide) versions
  tables/bias_strata.{csv,md}      metrics per stratum ("n < 3" where too small)
  tables/bias_tests.{csv,md}       tests across strata, effect sizes, Holm-adjusted p
  tables/subjects.csv              every subject with metadata, strata and metrics
  figures/<name>.{png,svg}
"""

import dataclasses
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd

from uad_jax.report import figures as figs
from uad_jax.report import load, stats, tables, tensorboard, training
from uad_jax.report.html import figure_html, page, table_html
from uad_jax.utils.atomic import atomic_path

SEGMENTATION = ("dice", "auprc", "ap_mean", "auroc_voxel", "auroc_voxel_mean", "auroc_subject")
DETECTION = ("detection", "fp_components", "fpr")
RANKING_NOTE = (
    "<p class='note'>Runs ranked by their mean Dice at each lesion cohort's best sweep threshold "
    "(raw maps), the statistic of the paper's Fig. 2, beside the paper's value and rank for the "
    "method. The intensity and z-score baselines are the rows every deep method must beat. "
    "Caveat: the demo cohort is synthetic (MNI152-derived anatomy, simulated lesions and "
    "scanners) and the demo models are trained for minutes on a CPU, so the demo ranking says "
    "how the implementations behave, not how the methods compare on real scans.</p>")
MODELS_NOTE = (
    "<p class='note'>Per run: the training it had (steps of the global batch at the slice "
    "size, per stage), its wall time from the TensorBoard step times of the machine that "
    "trained it, the last logged loss, and where the model comes from (a bundled demo "
    "checkpoint names the command that trained it). The paper's models trained for tens of "
    "thousands of steps on a GPU.</p>")
HEALTHY = ("fpr", "fp_components")
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
SIGNIFICANCE = 0.05


@dataclasses.dataclass(frozen=True)
class Report:
  """What `write_report` produced.

  Attributes:
    directory: the report folder; index: its index.html.
    summary_markdown: the main tables (segmentation, healthy cohorts) as Markdown.
    figures: every figure written.
    tensorboard: event folders written into training workdirs.
  """
  directory: Path
  index: Path
  summary_markdown: str
  figures: tuple
  tensorboard: tuple


def models_table(cohorts) -> pd.DataFrame:
  """One row per run with a training workdir: `training.describe` of it."""
  rows = []
  for run, workdir in dict.fromkeys((c.run, c.workdir) for c in cohorts):
    if workdir is not None and (workdir / "config.json").is_file():
      rows.append({"run": run, **training.describe(workdir)})
  return pd.DataFrame(rows)


def _slug(*parts) -> str:
  return "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(p)).strip("-") for p in parts if p)


def write_report(runs, out_dir, *, options: tables.Options = tables.Options(),
                 write_tensorboard: bool = True) -> Report:
  """Reads the eval outputs named by `runs` (see `load`) and writes the report to `out_dir`.

  Args:
    runs: workdirs, `eval/step_<N>` folders or cohort folders (any number, any methods).
    out_dir: the report folder (replaced atomically if it exists).
    options: bootstrap resamples, seed, minimum stratum size.
    write_tensorboard: also add the figures to `<workdir>/tensorboard/report` of every run
      that has a training workdir.
  """
  out_dir = Path(out_dir).resolve()
  cohorts = load.load_cohorts(runs)
  subjects = tables.add_strata(load.subject_table(cohorts))
  summary = tables.summary_table(cohorts, subjects, options)
  strata, tests = tables.bias_tables(cohorts, subjects, options)
  wide = {
      "ranking": tables.ranking_table(summary),
      "models": models_table(cohorts),
      "segmentation": tables.wide_summary(summary, "lesion", SEGMENTATION),
      "detection": tables.wide_summary(summary, "lesion", DETECTION),
      "healthy": tables.wide_summary(summary, "healthy", HEALTHY),
  }
  strata_text = tables.strata_display(strata)
  tests_text = tables.tests_display(tests)
  summary_md = "".join(f"## {title}\n\n{tables.markdown(wide[k])}\n" for k, title in (
      ("ranking", "Ranking (mean Dice @best over the lesion cohorts, raw maps)"),
      ("models", "Models: how each was trained"),
      ("segmentation", "Lesion cohorts: segmentation"),
      ("healthy", "Healthy cohorts: false positives")) if not wide[k].empty)
  with atomic_path(out_dir) as tmp:
    tmp.mkdir(parents=True)
    tdir = tmp / TABLES_DIR
    tdir.mkdir()
    summary.to_csv(tdir / "summary.csv", index=False)
    strata.to_csv(tdir / "bias_strata.csv", index=False)
    tests.to_csv(tdir / "bias_tests.csv", index=False)
    subjects.to_csv(tdir / "subjects.csv", index=False)
    for name, table in wide.items():
      (tdir / f"{name}.md").write_text(tables.markdown(table), encoding="utf-8")
    (tdir / "bias_strata.md").write_text(tables.markdown(strata_text), encoding="utf-8")
    (tdir / "bias_tests.md").write_text(tables.markdown(tests_text), encoding="utf-8")
    written = _write_figures(cohorts, subjects, summary, options, tmp / FIGURES_DIR)
    document = _index(cohorts, wide, strata, strata_text, tests, tests_text, written, options)
    (tmp / "index.html").write_text(document, encoding="utf-8")
  events = _write_tensorboard(cohorts, written, out_dir, summary_md) if write_tensorboard else ()
  return Report(out_dir, out_dir / "index.html", summary_md, tuple(written), tuple(events))


def _write_figures(cohorts, subjects, summary, options, directory: Path) -> list:
  """Renders every figure into `directory`; returns the FigureFile records in page order."""
  out = []

  def add(fig, record):
    if fig is not None:
      figs.save(fig, directory, record.name)
      out.append(record)

  lesion = [c for c in cohorts if c.mode == "lesion"]
  runs = list(dict.fromkeys((c.run, c.modality) for c in cohorts))
  roles = {(c.run, c.modality): list(c.roles) for c in cohorts}
  if lesion:
    for p, label in (("raw", "raw maps"), ("mf", "median-filtered maps")):
      add(figs.dice_overview(summary, p), figs.FigureFile(
          f"dice_overview_{p}", f"Dice per method and cohort ({label})",
          "Mean per-subject Dice at the best sweep threshold of each test cohort (solid; an "
          "oracle, the benchmark's 'Optimal') and at the thresholds calibrated on healthy "
          "validation data (hatched; 'opt_thr' is the lesion-validation Dice-optimal one, the "
          "benchmark's 'Estimate'). Error bars: 95 % bootstrap CI over subjects.", "overview"))
  for modality in dict.fromkeys(c.modality for c in lesion):
    older = sorted({c.cohort for c in lesion if c.modality == modality
                    and not figs.has_curves(c)})
    caveat = (f" Cohorts evaluated before the curves were stored ({', '.join(older)}) show "
              "only their sweep points, joined by a thin line." if older else "")
    add(figs.pr_curves(cohorts, modality), figs.FigureFile(
        f"precision_recall_{_slug(modality)}", f"Precision–recall curves ({modality})",
        "Pooled-voxel precision–recall curve of each lesion cohort, the curve whose area is "
        "the pooled AUPRC (lower left; raw / median-filtered): exact points of the curve "
        "(first point at every 0.5 % of recall, no interpolation) joined by lines. Dots: the "
        "thresholds of the sweep, also points of the curve (between the stored points the "
        "curve dips in a saw-tooth, so a dot can lie below the line); star: the threshold of "
        "the best mean Dice." + caveat,
        "curves", modality=modality))
  for run, modality in runs:
    add(figs.threshold_curves(cohorts, run, modality), figs.FigureFile(
        f"thresholds_{_slug(run, modality)}", f"{run} {modality}: Dice and FPR over the "
        "threshold sweep", "Left: mean Dice of each lesion cohort; right: pooled FPR over "
        "lesion-free brain voxels of every cohort (log scale). Vertical lines: calibrated "
        "thresholds.", "curves", run, modality))
  for run, modality in runs:
    for p in ("raw", "mf"):
      add(figs.strata_boxplots(subjects, run, modality, p, roles[(run, modality)],
                               options.min_stratum, options.seed), figs.FigureFile(
          f"strata_{_slug(run, modality, p)}", f"{run} {modality} ({p}): per-subject "
          "metrics by stratum", "Top: Dice at the best sweep threshold, lesion cohorts pooled "
          "(lesion-size quartiles within each cohort); bottom: FPR of healthy subjects at the "
          f"first calibrated threshold. Boxes only for strata with n ≥ {options.min_stratum}; "
          "every subject is a point.", "bias", run, modality))
      add(figs.fpr_vs_age(subjects, run, modality, p, roles[(run, modality)]),
          figs.FigureFile(
              f"fpr_age_{_slug(run, modality, p)}", f"{run} {modality} ({p}): healthy-subject "
              "FPR against age", "Each point a healthy subject (colour: scanner, marker: sex); "
              "black line: least-squares trend; Spearman's ρ in the title.", "bias", run,
              modality))
  for c in lesion:
    add(figs.example_panel(c, subjects), figs.FigureFile(
        f"examples_{_slug(c.run, c.modality, c.cohort)}", f"{c.run} {c.modality} "
        f"{c.cohort}: best, median and worst subject", "Rows ranked by Dice at the cohort's "
        "best sweep threshold (raw maps), on the stored slice of largest lesion: image, "
        "lesion mask, anomaly map (mask outline in blue), prediction at the best threshold.",
        "examples", c.run, c.modality))
  return out


def _intro(cohorts, options) -> str:
  runs = {}
  for c in cohorts:
    runs.setdefault((c.run, c.modality, c.step), []).append(f"{c.cohort} ({c.mode})")
  items = "".join(f"<li><b>{html.escape(r)}</b> {html.escape(m)}, checkpoint step "
                  f"{html.escape(str(s))}: {html.escape(', '.join(v))}</li>"
                  for (r, m, s), v in runs.items())
  sources = "".join(f"<li><code>{html.escape(str(c.directory))}</code></li>" for c in cohorts)
  warnings = sorted({w for c in cohorts for w in c.results.get("warnings", [])
                     + c.results["info"].get("warnings", [])})
  warn = ("<p><b>Warnings from the evaluations:</b></p><ul>" + "".join(
      f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>") if warnings else ""
  return (
      f"<p>Runs:</p><ul>{items}</ul>{warn}"
      "<p class='note'>Every metric is given for raw anomaly maps (<i>raw</i>) and for their "
      "3-D median-filtered copies (<i>mf</i>). Intervals are 95 % percentile bootstrap "
      f"confidence intervals over subjects ({options.n_resamples} resamples, seed "
      f"{options.seed}). Dice @best uses each test cohort's best sweep threshold (an oracle, "
      "held fixed in the bootstrap); the calibrated thresholds come from healthy validation "
      "data ('opt_thr': the lesion-validation Dice-optimal threshold). <i>AUPRC (pooled)</i> "
      "and <i>voxel AUROC (pooled)</i> are computed over all voxels of a cohort pooled, as "
      "the benchmark's AUPRC: one number per cohort, no CI or strata. <i>AP (mean per "
      "subject)</i> and <i>voxel AUROC (mean per subject)</i> average each subject's own "
      "voxel AP / AUROC (subjects with a lesion; every voxel of the volume): these have "
      "bootstrap CIs and strata, and differ from the pooled numbers (every subject weighs "
      "the same). Lesion detection = lesions hit / lesions; FPR = false-positive voxels / "
      "lesion-free brain voxels, pooled.</p>"
      "<p class='note'>Bias analysis (our choices; the paper does not state its tests): "
      "Kruskal–Wallis (≥ 3 strata, effect size ε² = H/(n−1)) or two-sided Mann–Whitney U "
      "(2 strata, rank-biserial r = P(first &gt; second) − P(first &lt; second)) on "
      "per-subject values, Spearman's ρ for age and lesion size; p-values Holm-adjusted "
      "within one outcome of one scope. Strata with fewer than "
      f"{options.min_stratum} subjects are reported as 'n &lt; {options.min_stratum}' and "
      "left out of the tests. Age bins: " + ", ".join(b for *_, b in stats.AGE_BINS)
      + "; lesion-size quartiles within each cohort (≤p25, (p25, p50], (p50, p75], &gt;p75, "
      "lesion voxels of the uncropped mask).</p>"
      f"<details><summary>Input folders</summary><ul>{sources}</ul></details>")


def _index(cohorts, wide, strata, strata_text, tests, tests_text, written, options) -> str:
  by_section = {}
  for f in written:
    by_section.setdefault(f.section, []).append(f)
  block = lambda section, **kw: "".join(
      figure_html(f) for f in by_section.get(section, [])
      if all(getattr(f, k) == v for k, v in kw.items()))
  sections = [
      ("ranking", "Ranking", RANKING_NOTE + table_html(wide["ranking"])),
      ("models", "Models: how each was trained", MODELS_NOTE + table_html(wide["models"])),
      ("segmentation", "Lesion cohorts: segmentation",
       table_html(wide["segmentation"]) + block("overview")),
      ("detection", "Lesion cohorts: detection and false positives",
       table_html(wide["detection"])),
      ("healthy", "Healthy cohorts: false positives", table_html(wide["healthy"])),
      ("curves", "Curves", block("curves")),
  ]
  tested = (tests["test"] != "").to_numpy() if len(tests) else np.zeros(0, bool)
  significant = (tests["p_holm"] < SIGNIFICANCE).to_numpy()[tested] if len(tests) else None
  bias = ["<h3>Tests across strata</h3><p class='note'>Highlighted: Holm-adjusted p &lt; "
          f"{SIGNIFICANCE}.</p>", table_html(tests_text[tested], significant),
          f"<details><summary>Not tested ({int((~tested).sum())}: too few subjects per "
          "stratum or a constant factor)</summary>"
          f"{table_html(tests_text[~tested])}</details>"]
  for run, modality in dict.fromkeys((c.run, c.modality) for c in cohorts):
    bias.append(f"<h3>{html.escape(run)} {html.escape(modality)}</h3>")
    bias.append(block("bias", run=run, modality=modality))
    for p in ("raw", "mf"):
      sel = ((strata["run"] == run) & (strata["modality"] == modality)
             & (strata["postproc"] == p)).to_numpy() if len(strata) else []
      if len(strata) and sel.any():
        bias.append(f"<details><summary>Per-stratum values ({p})</summary>"
                    f"{table_html(strata_text[sel].drop(columns=['run', 'modality', 'postproc']))}"
                    "</details>")
  sections.append(("bias", "Bias analysis", "".join(bias)))
  sections.append(("examples", "Examples", block("examples") or
                   "<p class='note'>No examples stored (eval.save_examples off).</p>"))
  return page("uad_jax results report", sections, _intro(cohorts, options))


def _write_tensorboard(cohorts, written, out_dir: Path, summary_md: str) -> list[Path]:
  """The figures of each run (and the shared ones) into its workdir's TensorBoard."""
  events = []
  done = set()
  for c in cohorts:
    if c.workdir is None or c.step is None or (c.workdir, c.step) in done:
      continue
    done.add((c.workdir, c.step))
    mine = [(f.name, out_dir / FIGURES_DIR / f"{f.name}.png") for f in written
            if f.run in (None, c.run) and f.modality in (None, c.modality)]
    events.append(tensorboard.write(c.workdir, c.step, mine, summary_md))
  return events

