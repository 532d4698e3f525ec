"""The report's figures (matplotlib, no pyplot state), written as PNG and SVG.

Sized for a paper page (7 in wide, 8 pt text); categorical colours from the Okabe–Ito
colour-blind-safe palette, maps in the perceptually uniform `magma`. Saving is deterministic
(no dates in the files, fixed SVG ids).
"""

import dataclasses
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from uad_jax.report import stats
from uad_jax.report.tables import (FACTORS, HEALTHY_FACTORS, column_label, ordered_levels,
                                   per_subject_values)

OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
             "#000000")
HATCHES = ("", "///", "...", "xxx", "\\\\\\", "ooo")
MARKERS = ("o", "s", "^", "D", "v", "P")
WIDTH = 7.0          # inches: a two-column paper page
STYLE = {"font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "legend.fontsize": 7,
         "xtick.labelsize": 7, "ytick.labelsize": 7, "figure.dpi": 100, "savefig.dpi": 200,
         "svg.hashsalt": "uad_jax.report", "svg.fonttype": "path", "hatch.linewidth": 0.6,
         "axes.spines.top": False, "axes.spines.right": False}
MASK_COLOUR = "#56B4E9"   # sky blue: lesion mask outline
PRED_COLOUR = "#E69F00"   # orange: predicted voxels


@dataclasses.dataclass(frozen=True)
class FigureFile:
  """A written figure: `<name>.png` and `<name>.svg` in the figures folder."""
  name: str
  title: str
  caption: str
  section: str
  run: str | None = None        # the run it belongs to (None: all runs), for TensorBoard
  modality: str | None = None


def save(fig: Figure, directory: Path, name: str) -> None:
  """Writes `name`.png and `name`.svg (deterministic bytes)."""
  directory.mkdir(parents=True, exist_ok=True)
  with matplotlib.rc_context(STYLE):
    fig.savefig(directory / f"{name}.png", metadata={"Software": None})
    fig.savefig(directory / f"{name}.svg", metadata={"Date": None, "Creator": None})


def _figure(width: float, height: float) -> Figure:
  with matplotlib.rc_context(STYLE):
    return Figure(figsize=(width, height), layout="constrained")


def run_colours(runs) -> dict[str, str]:
  return {r: OKABE_ITO[i % len(OKABE_ITO)] for i, r in enumerate(runs)}


def dice_overview(summary: pd.DataFrame, postproc: str) -> Figure:
  """Mean Dice per method and lesion cohort at the best sweep threshold (solid) and at each
  calibrated threshold (hatched), with 95 % bootstrap CIs; one panel per modality."""
  part = summary[(summary["metric"] == "dice") & (summary["postproc"] == postproc)]
  modalities = list(dict.fromkeys(part["modality"]))
  colours = run_colours(dict.fromkeys(summary["run"]))
  roles = list(dict.fromkeys(part["role"]))
  with matplotlib.rc_context(STYLE):
    fig = _figure(WIDTH, 2.4 * len(modalities) + 0.5)
    axes = fig.subplots(len(modalities), 1, squeeze=False)[:, 0]
    for ax, modality in zip(axes, modalities):
      rows = part[part["modality"] == modality]
      cohorts = list(dict.fromkeys(rows["cohort"]))
      runs = list(dict.fromkeys(rows["run"]))
      slots = len(runs) * len(roles)
      width = 0.84 / slots
      for i, run in enumerate(runs):
        for j, role in enumerate(roles):
          sel = rows[(rows["run"] == run) & (rows["role"] == role)].set_index("cohort")
          sel = sel.reindex(cohorts)
          x = np.arange(len(cohorts)) - 0.42 + width * (i * len(roles) + j + 0.5)
          value = sel["value"].to_numpy(np.float64)
          err = np.abs(np.stack([value - sel["ci_low"].to_numpy(np.float64),
                                 sel["ci_high"].to_numpy(np.float64) - value]))
          ax.bar(x, np.nan_to_num(value), width, color=colours[run],
                 alpha=1.0 if role == "best" else 0.55, hatch=HATCHES[j % len(HATCHES)],
                 edgecolor="white" if role == "best" else "black", linewidth=0.4)
          ax.errorbar(x, value, yerr=np.nan_to_num(err), fmt="none", ecolor="#333333",
                      elinewidth=0.7, capsize=1.5)
      ax.set_xticks(np.arange(len(cohorts)), cohorts)
      ax.set_ylabel(f"{modality}: mean Dice")
      top = np.nanmax(np.r_[rows["ci_high"].to_numpy(np.float64),
                            rows["value"].to_numpy(np.float64), 1e-3])
      ax.set_ylim(0, min(1.05, float(top) * 1.15))
      ax.grid(axis="y", linewidth=0.3, alpha=0.6)
    handles = [Patch(facecolor=colours[r], label=r) for r in colours
               if r in set(part["run"])]
    handles += [Patch(facecolor="#BBBBBB", hatch=HATCHES[j % len(HATCHES)], edgecolor="black",
                      linewidth=0.4, label=("best sweep threshold (oracle)" if r == "best"
                                            else f"calibrated: {r}"))
                for j, r in enumerate(roles)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 5),
               frameon=False)
  return fig


def has_curves(cohort) -> bool:
  """Whether a lesion cohort's results.json stores its PR curve points (raw and mf)."""
  return all(cohort.summary(p).get("curves") for p in ("raw", "mf"))


def pr_curves(cohorts, modality: str) -> Figure:
  """Pooled-voxel precision–recall curves per lesion cohort (raw solid, median-filtered
  dashed): the exact curve points of results.json (`curves`, sampled every 0.5 % of recall),
  the sweep thresholds as dots on them, the best mean-Dice threshold as a star, the pooled
  AUPRC of each run in the corner. Cohorts evaluated before the curves were stored show their
  sweep points only, joined by a thin line."""
  lesion = [c for c in cohorts if c.mode == "lesion" and c.modality == modality]
  names = list(dict.fromkeys(c.cohort for c in lesion))
  colours = run_colours(dict.fromkeys(c.run for c in cohorts))
  cols = min(3, len(names))
  rows = math.ceil(len(names) / cols)
  with matplotlib.rc_context(STYLE):
    fig = _figure(WIDTH, 2.3 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, name in zip(axes, names):
      auprc = []
      for c in [c for c in lesion if c.cohort == name]:
        keys, _ = c.sweep
        total = float(c.results["counts"]["lesion_voxels"])
        for p, style in (("raw", "-"), ("mf", "--")):
          counts = c.pooled_counts.loc[p].reindex(keys)
          tp = counts["tp_voxels"].to_numpy(np.float64)
          pred = counts["pred_voxels"].to_numpy(np.float64)
          with np.errstate(invalid="ignore", divide="ignore"):
            precision, recall = tp / pred, tp / total
          curve = c.summary(p).get("curves")
          if curve:
            ax.plot(curve["recall"], curve["precision"], style, color=colours[c.run],
                    linewidth=1.0)
            ax.plot(recall, precision, ".", color=colours[c.run], markersize=2.5)
          else:
            ax.plot(recall, precision, style, color=colours[c.run], linewidth=0.6,
                    marker=".", markersize=2.5)
          best = c.summary(p).get("best_mean_dice")
          if best:
            k = keys.index(best["key"])
            ax.plot(recall[k], precision[k], "*", color=colours[c.run], markersize=6,
                    markeredgecolor="black", markeredgewidth=0.3)
        auprc.append(f"{c.run}: {_num(c.summary('raw').get('auprc')):.3f} / "
                     f"{_num(c.summary('mf').get('auprc')):.3f}")
      ax.text(0.03, 0.03, "AUPRC raw / mf\n" + "\n".join(auprc), transform=ax.transAxes,
              fontsize=6, va="bottom", ha="left")
      ax.set_title(name)
      ax.set_xlabel("recall (pooled voxels)")
      ax.set_ylabel("precision")
      ax.set_xlim(0, 1.02)
      ax.set_ylim(0, 1.02)
      ax.grid(linewidth=0.3, alpha=0.6)
    for ax in axes[len(names):]:
      ax.set_visible(False)
    handles = [Line2D([], [], color=colours[r], label=r) for r in dict.fromkeys(
        c.run for c in lesion)]
    handles += [Line2D([], [], color="grey", linestyle="-", label="raw maps"),
                Line2D([], [], color="grey", linestyle="--", label="median-filtered"),
                Line2D([], [], color="grey", marker=".", linestyle="none",
                       label="sweep thresholds"),
                Line2D([], [], color="grey", marker="*", linestyle="none",
                       label="best mean-Dice threshold")]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6),
               frameon=False)
  return fig


def threshold_curves(cohorts, run: str, modality: str) -> Figure:
  """Mean Dice of each lesion cohort (left) and pooled FPR of each cohort's lesion-free brain
  voxels (right, log scale) over the sweep thresholds; calibrated thresholds as vertical lines."""
  mine = [c for c in cohorts if c.run == run and c.modality == modality]
  colours = {c.cohort: OKABE_ITO[i % len(OKABE_ITO)] for i, c in enumerate(mine)}
  with matplotlib.rc_context(STYLE):
    fig = _figure(WIDTH, 2.6)
    ax_dice, ax_fpr = fig.subplots(1, 2)
    for c in mine:
      keys, values = c.sweep
      for p, style in (("raw", "-"), ("mf", "--")):
        s = c.summary(p)
        if c.mode == "lesion":
          ax_dice.plot(values, [_num(s["dice_mean"].get(k)) for k in keys], style,
                       color=colours[c.cohort], linewidth=1.0)
        fpr = np.array([_num(s["fpr_exact"].get(k)) for k in keys])
        ax_fpr.plot(values, np.where(fpr > 0, fpr, np.nan), style, color=colours[c.cohort],
                    linewidth=1.0)
    for j, t in enumerate(mine[0].calibrated if mine else ()):
      for ax in (ax_dice, ax_fpr):
        ax.axvline(t.value, color="black", linewidth=0.6, linestyle=(0, (1, 1 + j)))
      ax_fpr.annotate(t.role, (t.value, 1), xycoords=("data", "axes fraction"), rotation=90,
                      va="top", ha="right", fontsize=6)
    ax_dice.set(xlabel="threshold", ylabel="mean Dice", title="Dice (lesion cohorts)")
    ax_fpr.set(xlabel="threshold", ylabel="FPR (lesion-free brain voxels)", yscale="log",
               title="false-positive rate (all cohorts)")
    for ax in (ax_dice, ax_fpr):
      ax.grid(linewidth=0.3, alpha=0.6)
    handles = [Line2D([], [], color=colours[c.cohort], label=c.cohort) for c in mine]
    handles += [Line2D([], [], color="grey", linestyle="-", label="raw"),
                Line2D([], [], color="grey", linestyle="--", label="median-filtered")]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6),
               frameon=False)
  return fig


def _num(value) -> float:
  return math.nan if value is None else float(value)


def _box_panel(ax, groups: dict[str, np.ndarray], min_stratum: int, colour: str,
               ylabel: str, title: str, seed: int) -> None:
  """Box plot of strata with n >= min_stratum, every subject as a point (strata below the
  minimum show their points and "n < min" in the label)."""
  names = list(groups)
  rng = np.random.default_rng(seed)
  big = [i for i, k in enumerate(names) if np.isfinite(groups[k]).sum() >= min_stratum]
  if big:
    ax.boxplot([groups[names[i]][np.isfinite(groups[names[i]])] for i in big],
               positions=big, widths=0.55, showfliers=False,
               medianprops={"color": "black", "linewidth": 1.0},
               boxprops={"linewidth": 0.7}, whiskerprops={"linewidth": 0.7},
               capprops={"linewidth": 0.7})
  for i, k in enumerate(names):
    v = groups[k][np.isfinite(groups[k])]
    ax.plot(i + rng.uniform(-0.15, 0.15, v.size), v, "o", color=colour, markersize=2.5,
            alpha=0.8, markeredgewidth=0)
  labels = [f"{k}\nn={np.isfinite(groups[k]).sum()}" if i in big else
            f"{k}\nn<{min_stratum}" for i, k in enumerate(names)]
  ax.set_xticks(range(len(names)), labels)
  ax.set_xlim(-0.6, len(names) - 0.4)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(axis="y", linewidth=0.3, alpha=0.6)


def strata_boxplots(subjects: pd.DataFrame, run: str, modality: str, postproc: str,
                    roles, min_stratum: int, seed: int) -> Figure | None:
  """Per-subject Dice at the best threshold (pooled lesion cohorts) and FPR at the first
  calibrated threshold (pooled healthy cohorts) per stratum of each factor."""
  rows = subjects[(subjects["run"] == run) & (subjects["modality"] == modality)
                  & (subjects["postproc"] == postproc)]
  panels = []
  lesion = rows[rows["mode"] == "lesion"]
  healthy = rows[rows["mode"] == "healthy"]
  if len(lesion):
    panels.append((lesion, "dice", "best", FACTORS, OKABE_ITO[0]))
  if len(healthy) and roles:
    panels.append((healthy, "fpr", roles[0], [f for f in FACTORS if f[0] in HEALTHY_FACTORS],
                   OKABE_ITO[5]))
  if not panels:
    return None
  cols = max(len(p[3]) for p in panels)
  with matplotlib.rc_context(STYLE):
    fig = _figure(WIDTH * 1.25, 2.3 * len(panels))
    axes = fig.subplots(len(panels), cols, squeeze=False)
    for r, (part, metric, role, factors, colour) in enumerate(panels):
      values = per_subject_values(part, metric, role)
      for ax, (column, label, _) in zip(axes[r], factors):
        levels = part[column]
        names = ordered_levels(column, levels[levels.notna()])
        groups = {k: values[(levels == k).to_numpy()] for k in names}
        _box_panel(ax, groups, min_stratum, colour, column_label(metric, role)
                   if ax is axes[r][0] else "", f"by {label}", seed)
      for ax in axes[r][len(factors):]:
        ax.set_visible(False)
  return fig


def fpr_vs_age(subjects: pd.DataFrame, run: str, modality: str, postproc: str,
               roles) -> Figure | None:
  """Healthy subjects' FPR against age at each calibrated threshold: colour = scanner,
  marker = sex, least-squares line and Spearman's ρ as the trend."""
  rows = subjects[(subjects["run"] == run) & (subjects["modality"] == modality)
                  & (subjects["postproc"] == postproc) & (subjects["mode"] == "healthy")]
  if rows.empty or not roles:
    return None
  scanners = sorted(set(rows["scanner"].dropna()), key=str)
  sexes = sorted(set(rows["sex"].dropna()), key=str)
  colour = {s: OKABE_ITO[i % len(OKABE_ITO)] for i, s in enumerate(scanners)}
  marker = {s: MARKERS[i % len(MARKERS)] for i, s in enumerate(sexes)}
  with matplotlib.rc_context(STYLE):
    fig = _figure(WIDTH, 2.6)
    axes = fig.subplots(1, len(roles), squeeze=False)[0]
    age = rows["age"].to_numpy(np.float64)
    for ax, role in zip(axes, roles):
      fpr = rows[f"fpr@{role}"].to_numpy(np.float64)
      for scanner, sex, a, f in zip(rows["scanner"], rows["sex"], age, fpr):
        ax.plot(a, f, marker.get(sex, "x"), color=colour.get(scanner, "grey"), markersize=4,
                markeredgewidth=0.3, markeredgecolor="black", alpha=0.85)
      trend = stats.spearman_trend(age, fpr)
      ok = np.isfinite(age) & np.isfinite(fpr)
      title = f"FPR @{role}"
      if trend.test and ok.sum() >= 2:
        slope, intercept = np.polyfit(age[ok], fpr[ok], 1)
        xs = np.linspace(age[ok].min(), age[ok].max(), 50)
        ax.plot(xs, slope * xs + intercept, color="black", linewidth=0.8)
        title += f"\nSpearman ρ = {trend.statistic:.2f}, p = {trend.p:.3g}, n = {trend.n}"
      ax.set(xlabel="age (years)", ylabel="FPR (brain voxels)", title=title)
      ax.grid(linewidth=0.3, alpha=0.6)
    handles = [Line2D([], [], color=colour[s], marker="o", linestyle="none", label=s)
               for s in scanners]
    handles += [Line2D([], [], color="grey", marker=marker[s], linestyle="none", label=s)
                for s in sexes]
    handles.append(Line2D([], [], color="black", linewidth=0.8, label="linear trend"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 8),
               frameon=False)
  return fig


def ranked_examples(rows: pd.DataFrame, examples: dict) -> list[tuple[str, pd.Series]]:
  """[('best'|'median'|'worst', subject row)] by Dice at the best threshold among subjects
  with a stored example (ties broken by subject path)."""
  rows = rows[rows["subject_path"].isin(examples) & np.isfinite(rows["dice_best"])]
  if rows.empty:
    return []
  rows = rows.sort_values(["dice_best", "subject_path"], ascending=[False, True])
  picks = {"best": 0, "median": (len(rows) - 1) // 2, "worst": len(rows) - 1}
  return [(k, rows.iloc[i]) for k, i in picks.items()]


def example_panel(cohort, subjects: pd.DataFrame, postproc: str = "raw") -> Figure | None:
  """Best, median and worst subject of a lesion cohort (Dice at the best threshold, raw
  maps): image, lesion mask, anomaly map, prediction at the best threshold."""
  examples = cohort.examples()
  rows = subjects[(subjects["run"] == cohort.run) & (subjects["modality"] == cohort.modality)
                  & (subjects["cohort"] == cohort.cohort) & (subjects["postproc"] == postproc)]
  picks = ranked_examples(rows, examples)
  best = cohort.summary(postproc).get("best_mean_dice")
  if not picks or not best:
    return None
  data = []
  for rank, row in picks:
    with np.load(examples[row["subject_path"]]) as z:
      data.append((rank, row, z["image"].astype(np.float32), z["mask"].astype(bool),
                   z["map"].astype(np.float32)))
  brain = np.concatenate([m[i > 0] for *_, i, _, m in data])
  vmax = float(np.quantile(brain, 0.995)) if brain.size else 1.0
  vmax = max(vmax, float(best["threshold"]) * 1.2, 1e-12)
  with matplotlib.rc_context(STYLE):
    fig = _figure(WIDTH * 0.8, 1.4 * len(data) + 0.5)
    axes = fig.subplots(len(data), 4, squeeze=False)
    for r, (rank, row, image, mask, amap) in enumerate(data):
      pred = amap > best["threshold"]
      overlay = np.zeros(image.shape + (4,), np.float32)
      overlay[pred & ~mask] = matplotlib.colors.to_rgba(PRED_COLOUR, 0.9)
      overlay[pred & mask] = matplotlib.colors.to_rgba("#009E73", 0.9)
      overlay[~pred & mask] = matplotlib.colors.to_rgba(MASK_COLOUR, 0.9)
      axes[r, 0].imshow(image.T, cmap="gray", origin="lower", interpolation="nearest")
      axes[r, 1].imshow(image.T, cmap="gray", origin="lower", interpolation="nearest")
      if mask.any():
        axes[r, 1].contour(mask.T.astype(float), levels=[0.5], colors=[MASK_COLOUR],
                           linewidths=0.8, origin="lower")
      im = axes[r, 2].imshow(amap.T, cmap="magma", vmin=0, vmax=vmax, origin="lower",
                             interpolation="nearest")
      if mask.any():
        axes[r, 2].contour(mask.T.astype(float), levels=[0.5], colors=[MASK_COLOUR],
                           linewidths=0.6, origin="lower")
      axes[r, 3].imshow(image.T, cmap="gray", origin="lower", interpolation="nearest")
      axes[r, 3].imshow(np.transpose(overlay, (1, 0, 2)), origin="lower",
                        interpolation="nearest")
      meta = ", ".join(str(row[k]) for k in ("scanner", "sex") if isinstance(row[k], str))
      age = f", {row['age']:.0f} y" if np.isfinite(row["age"]) else ""
      axes[r, 0].set_ylabel(f"{rank}\nDice {row['dice_best']:.3f}", fontsize=7)
      axes[r, 0].set_title(f"{row['subject']} ({meta}{age})", fontsize=6.5, loc="left")
      for ax in axes[r]:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
    for ax, title in zip(axes[0], ("", "lesion mask", "anomaly map",
                                   f"map > {best['threshold']:.4g}")):
      if title:
        ax.set_title(title, fontsize=7)
    fig.colorbar(im, ax=axes, location="right", shrink=0.5, label="anomaly score")
    fig.legend(handles=[Patch(color="#009E73", label="true positive"),
                        Patch(color=PRED_COLOUR, label="false positive"),
                        Patch(color=MASK_COLOUR, label="missed lesion")],
               loc="outside lower center", ncols=3, frameon=False)
  return fig
