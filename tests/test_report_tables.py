"""Report tables: hand-computed strata on a tiny results table; cohort metrics vs results.json."""

import math
import shutil
import types

import numpy as np
import pandas as pd
import pytest
import scipy.stats

import report_synthetic
from uad_jax import evaluation
from uad_jax.report import load, stats, tables

OPTIONS = tables.Options(n_resamples=300, seed=0, min_stratum=3)


def _tiny_table() -> pd.DataFrame:
  """8 lesion subjects in 2 cohorts (scanners A, A, A, B, B, B, C, C) and 6 healthy ones, one
  calibrated threshold role 'R'."""
  lesion = pd.DataFrame({
      "cohort": ["c1"] * 4 + ["c2"] * 4, "mode": "lesion",
      "subject_path": [f"l{i}" for i in range(8)],
      "scanner": list("AAABBBCC"),
      "sex": list("FMFMFMFM"),
      "age": [10, 12, 15, 20, 30, 35, 70, 80],
      "lesion_type": "stroke",
      "lesion_size": [1, 2, 3, 4, 5, 6, 7, 8],
      "dice_best": [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9, 0.8],
      "dice@R": [0.0, 0.1, 0.2, 0.4, 0.5, 0.6, 0.8, 0.7],
      "lesions": [1, 2, 1, 2, 1, 2, 1, 2],
      "lesions_hit@R": [1, 1, 0, 2, 1, 2, 1, 0],
      "ap": [0.2, 0.4, 0.6, 0.5, 0.7, 0.9, np.nan, 0.8],        # l6: an empty mask
      "auroc": [0.9, 0.95, 0.8, 0.99, 0.97, 0.96, np.nan, 0.9],
  })
  fp = np.array([1, 2, 3, 10, 20, 30])
  healthy = pd.DataFrame({
      "cohort": "h1", "mode": "healthy",
      "subject_path": [f"h{i}" for i in range(6)],
      "scanner": list("AAABBB"), "sex": list("FFFMMM"), "age": [20, 30, 40, 50, 60, 70],
      "lesion_type": None, "lesion_size": 0.0, "lesions": 0, "lesions_hit@R": 0,
      "fp_voxels@R": fp, "eval_voxels": 100, "fpr@R": fp / 100,
  })
  table = pd.concat([lesion, healthy], ignore_index=True)
  table.insert(0, "run", "M")
  table.insert(1, "modality", "T1w")
  table["postproc"] = "raw"
  return tables.add_strata(table)


def _cohorts():
  return [types.SimpleNamespace(run="M", modality="T1w", roles=("R",))]


def _row(frame, **kw):
  sel = np.ones(len(frame), bool)
  for k, v in kw.items():
    sel &= (frame[k] == v).to_numpy()
  assert sel.sum() == 1, kw
  return frame[sel].iloc[0]


def test_strata_hand_computed():
  strata, _ = tables.bias_tables(_cohorts(), _tiny_table(), OPTIONS)
  dice = dict(scope=tables.ALL_LESION, factor="scanner", metric="dice", role="best")
  a = _row(strata, stratum="A", **dice)
  assert a["value"] == pytest.approx(0.2) and a["n"] == 3
  assert a["median"] == pytest.approx(0.2)
  assert (a["ci_low"], a["ci_high"]) == stats.bootstrap_ci([0.1, 0.2, 0.3],
                                                           stats.mean_statistic,
                                                           n_resamples=300, seed=0)
  assert 0.1 <= a["ci_low"] <= a["ci_high"] <= 0.3
  assert _row(strata, stratum="B", **dice)["value"] == pytest.approx(0.6)
  c = _row(strata, stratum="C", **dice)   # 2 subjects: reported as too few, not a number
  assert c["n"] == 2 and c["note"] == "n < 3" and math.isnan(c["value"])
  assert _row(strata, stratum="F", scope=tables.ALL_LESION, factor="sex", metric="dice",
              role="R")["value"] == pytest.approx((0.0 + 0.2 + 0.5 + 0.8) / 4)
  # Per-subject voxel AP / AUROC: means of the subjects' values; C has one defined value.
  ap = dict(scope=tables.ALL_LESION, factor="scanner", metric="ap_mean", role="")
  assert _row(strata, stratum="A", **ap)["value"] == pytest.approx(0.4)
  assert _row(strata, stratum="B", **ap)["value"] == pytest.approx(0.7)
  assert (_row(strata, stratum="B", **ap)["ci_low"], _row(strata, stratum="B", **ap)["ci_high"]
          ) == stats.bootstrap_ci([0.5, 0.7, 0.9], stats.mean_statistic, n_resamples=300,
                                  seed=0)
  c_ap = _row(strata, stratum="C", **ap)
  assert c_ap["n"] == 1 and c_ap["note"] == "n < 3"
  assert _row(strata, stratum="M", scope=tables.ALL_LESION, factor="sex",
              metric="auroc_voxel_mean", role="")["value"] == pytest.approx(
                  (0.95 + 0.99 + 0.96 + 0.9) / 4)
  # Detection is pooled: A (1 + 1 + 0) / (1 + 2 + 1), B (2 + 1 + 2) / (2 + 1 + 2).
  det = dict(scope=tables.ALL_LESION, factor="scanner", metric="detection", role="R")
  assert _row(strata, stratum="A", **det)["value"] == pytest.approx(0.5)
  assert _row(strata, stratum="B", **det)["value"] == pytest.approx(1.0)
  # Healthy FPR pooled over voxels: A 6 / 300, B 60 / 300.
  fpr = dict(scope="h1", factor="scanner", metric="fpr", role="R")
  assert _row(strata, stratum="A", **fpr)["value"] == pytest.approx(0.02)
  assert _row(strata, stratum="B", **fpr)["value"] == pytest.approx(0.2)
  # Age bins: <18 and 18-40 have 3 subjects, ≥65 two; lesion type is constant (no strata).
  ages = strata[(strata["factor"] == "age bin") & (strata["metric"] == "dice")
                & (strata["role"] == "best") & (strata["scope"] == tables.ALL_LESION)]
  assert list(ages["stratum"]) == ["<18", "18–40", "≥65"]
  assert list(ages["note"]) == ["", "", "n < 3"]
  assert not (strata["factor"] == "lesion type").any()
  # Each cohort is a scope of its own; one healthy cohort gets no pooled scope.
  assert set(strata["scope"]) == {tables.ALL_LESION, "c1", "c2", "h1"}
  assert _row(strata, scope="c1", factor="scanner", stratum="A", metric="dice",
              role="best")["value"] == pytest.approx(0.2)
  assert _row(strata, scope="c2", factor="scanner", stratum="B", metric="dice",
              role="best")["note"] == "n < 3"


def test_tests_hand_computed_and_holm_within_family():
  _, tests = tables.bias_tables(_cohorts(), _tiny_table(), OPTIONS)
  family = tests[(tests["scope"] == tables.ALL_LESION) & (tests["metric"] == "dice")
                 & (tests["role"] == "best")]
  scanner = _row(family, factor="scanner")   # C (n = 2) left out: A vs B
  want = scipy.stats.mannwhitneyu([0.1, 0.2, 0.3], [0.5, 0.6, 0.7], alternative="two-sided")
  assert scanner["test"] == "Mann–Whitney U" and scanner["strata"] == "A | B"
  assert scanner["statistic"] == 0.0 and scanner["effect"] == -1.0
  assert scanner["p"] == pytest.approx(want.pvalue)
  age = _row(family, factor="age (years)")
  rho = scipy.stats.spearmanr([10, 12, 15, 20, 30, 35, 70, 80],
                              [0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9, 0.8])
  assert age["test"] == "Spearman" and age["statistic"] == pytest.approx(rho.statistic)
  quartile = _row(family, factor="lesion-size quartile")   # 2 subjects per quartile
  assert quartile["test"] == "" and "fewer than 2 strata" in quartile["note"]
  assert list(family["factor"]) == ["scanner", "lesion-size quartile", "lesion size (voxels)",
                                    "age bin", "age (years)", "sex"]
  np.testing.assert_allclose(family["p_holm"], stats.holm(family["p"]))
  smallest = family["p"].idxmin()   # Holm: the smallest p times the number of tests run
  assert family.loc[smallest, "p_holm"] == pytest.approx(
      min(1.0, family["p"].notna().sum() * family["p"].min()))
  healthy = _row(tests, scope="h1", factor="scanner", metric="fpr", role="R")
  want = scipy.stats.mannwhitneyu([0.01, 0.02, 0.03], [0.1, 0.2, 0.3], alternative="two-sided")
  assert healthy["p"] == pytest.approx(want.pvalue) and healthy["effect"] == -1.0


def test_min_stratum_option():
  strata, _ = tables.bias_tables(_cohorts(), _tiny_table(),
                                 tables.Options(n_resamples=50, min_stratum=2))
  c = _row(strata, scope=tables.ALL_LESION, factor="scanner", stratum="C", metric="dice",
           role="best")
  assert c["value"] == pytest.approx(0.85) and c["note"] == ""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  workdir, results = report_synthetic.make_run(root, "ANDi")
  cohorts = load.load_cohorts([workdir])
  subjects = tables.add_strata(load.subject_table(cohorts))
  return cohorts, subjects, results


def test_summary_matches_the_evaluation_results(synthetic):
  cohorts, subjects, results = synthetic
  summary = tables.summary_table(cohorts, subjects, OPTIONS)
  for c in cohorts:
    for p in ("raw", "mf"):
      s = results[c.cohort].summary[p]
      rows = summary[(summary["cohort"] == c.cohort) & (summary["postproc"] == p)]
      get = lambda metric, role="": _row(rows, metric=metric, role=role)
      for t in c.calibrated:
        assert get("fpr", t.role)["value"] == pytest.approx(s["fpr_exact"][t.key], rel=1e-12)
        assert get("fp_components", t.role)["value"] == pytest.approx(
            s["lesion_detection"]["fp_components_per_volume"][t.key])
      if c.mode == "lesion":
        best = get("dice", "best")
        assert best["value"] == pytest.approx(s["best_mean_dice"]["value"], rel=1e-12)
        assert best["threshold_key"] == s["best_mean_dice"]["key"]
        assert best["ci_low"] <= best["value"] <= best["ci_high"]
        for t in c.calibrated:
          assert get("dice", t.role)["value"] == pytest.approx(s["dice_mean"][t.key], rel=1e-12)
          assert get("detection", t.role)["value"] == pytest.approx(
              s["lesion_detection"]["hit_rate"][t.key])
        assert get("auprc")["value"] == s["auprc"]
        assert get("auroc_voxel")["value"] == s["auroc"]
        for metric in ("auprc", "auroc_voxel"):   # pooled (reference protocol): no CI
          assert math.isnan(get(metric)["ci_low"]) and "pooled" in get(metric)["note"]
        for metric, name in (("ap_mean", "ap"), ("auroc_voxel_mean", "auroc")):
          values = results[c.cohort].per_subject[p][name]
          row = get(metric)
          assert row["value"] == pytest.approx(np.nanmean(values), rel=1e-12)
          assert row["n"] == np.isfinite(values).sum() == len(values)
          assert row["ci_low"] <= row["value"] <= row["ci_high"] and row["note"] == ""
        assert get("auroc_subject")["value"] == pytest.approx(evaluation.subject_auroc(
            results["test_healthy"], results[c.cohort], p))


def test_wide_tables_and_markdown(synthetic):
  cohorts, subjects, _ = synthetic
  summary = tables.summary_table(cohorts, subjects, OPTIONS)
  wide = tables.wide_summary(summary, "lesion", ("dice", "auprc"))
  assert list(wide.columns) == ["modality", "run", "cohort", "postproc", "n", "Dice @best",
                                "Dice @FPR-0.01", "Dice @opt_thr", "AUPRC (pooled)"]
  assert list(wide["n"]) == [7, 7, 8, 8]   # test_ms, test_tumour x raw, mf
  text = tables.markdown(wide)
  assert text.count("\n") == len(wide) + 2 and text.startswith("| modality | run |")
  cell = wide.iloc[0]["Dice @best"]
  assert cell.count("[") == 1 and "(thr " in cell


def test_outputs_without_per_subject_ranking_values(synthetic, tmp_path):
  """Outputs written before subjects.csv had `ap`/`auroc`: n/a with a note, no error."""
  cohorts, _, _ = synthetic
  step = tmp_path / "step_5"
  shutil.copytree(cohorts[0].directory.parent, step)
  for name in ("test_ms", "test_tumour"):
    path = step / name / "subjects.csv"
    pd.read_csv(path).drop(columns=["ap", "auroc"]).to_csv(path, index=False)
  old = load.load_cohorts([step])
  subjects = tables.add_strata(load.subject_table(old))
  summary = tables.summary_table(old, subjects, OPTIONS)
  rows = summary[summary["metric"] == "ap_mean"]
  assert len(rows) == 4 and rows["value"].isna().all() and (rows["n"] == 0).all()
  assert rows["note"].str.startswith("no per-subject value").all()
  assert summary[summary["metric"] == "dice"]["value"].notna().all()


def test_ranking_table_orders_runs_by_mean_best_dice():
  def rows(run, method, values):
    return [dict(run=run, method=method, modality="T1w", cohort=c, mode="lesion",
                 postproc=p, metric="dice", role="best", threshold_key="", threshold=0.5,
                 value=v, ci_low=v - 0.1, ci_high=v + 0.1, n=6, note="")
            for c, v in values.items() for p in ("raw", "mf")] + [
            dict(run=run, method=method, modality="T1w", cohort=c, mode="lesion",
                 postproc="raw", metric="auroc_voxel", role="", threshold_key="",
                 threshold=math.nan, value=0.9, ci_low=math.nan, ci_high=math.nan, n=6,
                 note="") for c in values]
  summary = pd.DataFrame(rows("a", "andi", {"t": 0.2, "s": 0.4})
                         + rows("b", "intensity", {"t": 0.5, "s": 0.3})
                         + rows("c", "disyre", {"t": 0.1, "s": 0.1}),
                         columns=tables.SUMMARY_COLUMNS)
  table = tables.ranking_table(summary)
  assert list(table["run"]) == ["b", "a", "c"]          # means 0.4, 0.3, 0.1
  assert list(table["rank"]) == [1, 2, 3]
  assert list(table["mean Dice @best"]) == [tables.format_number(v) for v in (0.4, 0.3, 0.1)]
  assert list(table["paper: mean best Dice (rank)"]) == ["baseline", "0.211 (2)", "0.303 (1)"]
  assert table.loc[1, "t: Dice @best"] == tables.format_estimate(
      pd.Series({"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "n": 6, "note": ""}))
  assert table.loc[1, "s: voxel AUROC"] == tables.format_number(0.9)
