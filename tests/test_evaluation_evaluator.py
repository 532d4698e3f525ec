"""The streaming Evaluator/Calibrator against an in-memory reference computation, outputs, errors."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.ndimage
from sklearn.metrics import (average_precision_score, precision_recall_curve,
                             roc_auc_score, roc_curve)

from uad_jax.errors import ConfigError, EvaluationError
from uad_jax.evaluation import (Calibrator, Evaluator, ThresholdSet, load_artifact,
                                load_thresholds, subject_auroc)

SHAPE = (24, 20, 10)
SWEEP = (0.05, 0.6, 0.05)
PAIRS = [(0.01, 0.3), (0.05, 0.2)]


def _cohort(seed, n=4, lesion=True):
  """Synthetic subjects: ellipsoid brain, lesion blobs, quantised maps (ties), zero background."""
  rng = np.random.default_rng(seed)
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij")
  brain = x**2 + y**2 + z**2 < 0.9
  subjects = []
  for i in range(n):
    labels = np.zeros(SHAPE, bool)
    if lesion and i != 1:                 # subject 1 has an empty mask
      c = rng.integers((7, 6, 3), (14, 12, 6))
      labels[c[0] - 3:c[0] + 2, c[1] - 2:c[1] + 3, c[2] - 2:c[2] + 2] = True
      labels[c[0] + 4, c[1] + 4, c[2]] = True
      labels &= brain
    m = rng.gamma(2.0, 0.08, SHAPE) + 0.35 * labels
    m = np.round(m * 40) / 40
    if lesion and i == 1:                 # nothing predicted above 0.4: NaN Dice there
      m = np.minimum(m, 0.4)
    m[rng.random(SHAPE) < 0.01] = 0.2     # exactly float32(0.2): the float64/float32 pitfall
    m = (m * brain).astype(np.float32)
    subjects.append((m, labels, brain, {"path": f"/d/sub-{i}_T1w.nii.gz", "subject": f"sub-{i}",
                                        "age": 20 + i, "sex": "F" if i % 2 else "M",
                                        "scanner": "A" if i < 2 else "B"}))
  return subjects


def _reference_numbers(subjects, mode):
  """The reference protocol on in-memory arrays: numpy per threshold, scikit-learn AP."""
  maps = np.stack([s[0] for s in subjects])
  labels = np.stack([s[1] for s in subjects])
  brain = np.stack([s[2] for s in subjects])
  out = {}
  for name, mm in (("raw", maps), ("mf", np.stack([scipy.ndimage.median_filter(m, size=4)
                                                    for m in maps]))):
    rows = {}
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
      warnings.simplefilter("ignore")
      if mode == "lesion":
        # np.float64 sweep scalars compare in float64, Python-float thr_fpr in float32.
        for t in [round(t, 7) for t in np.arange(*SWEEP)]:
          rows[str(t)] = np.mean([2 * (m > t)[l].sum() / ((m > t).sum() + l.sum())
                                  for m, l in zip(mm, labels)])
        for f, thr in PAIRS:
          rows[f"FPR-{f}"] = np.mean([2 * (m > thr)[l].sum() / ((m > thr).sum() + l.sum())
                                      for m, l in zip(mm, labels)])
        norm = (mm - mm.min()) / (mm.max() - mm.min())
        rows["AUPRC"] = average_precision_score(labels.ravel(), norm.ravel())
      else:
        evaluated = brain & ~labels
        for f, thr in PAIRS:
          fp = (mm > thr)[evaluated].sum()
          rows[f"FPR-{f}"] = round(fp / (fp + (mm <= thr)[evaluated].sum()), 5)
    out[name] = (rows, mm)
  return out, labels, brain


def _run(subjects, mode):
  ev = Evaluator(mode, ThresholdSet.build(SWEEP, PAIRS), info={"method": "test"})
  for m, lab, brain, meta in subjects:
    ev.add(m, lab, brain, meta)
  return ev


def test_lesion_mode_equals_in_memory_reference():
  subjects = _cohort(0)
  res = _run(subjects, "lesion").result()
  ref, labels, brain = _reference_numbers(subjects, "lesion")
  for p in ("raw", "mf"):
    rows, maps = ref[p]
    ours = dict(res.reference_rows(p))
    assert list(ours) == list(rows)
    auprc = ours.pop("AUPRC")
    assert auprc == pytest.approx(rows.pop("AUPRC"), abs=1e-7)
    np.testing.assert_allclose(list(ours.values()), list(rows.values()), rtol=0, atol=1e-12)
    assert np.isnan(list(ours.values())).any()   # the empty-mask subject poisons the mean
    s = res.summary[p]
    assert s["auroc"] == pytest.approx(roc_auc_score(labels.ravel(), maps.ravel()), abs=1e-12)
    nan_count = np.array(list(s["dice_nan_subjects"].values()))
    assert set(nan_count) <= {0, 1} and nan_count.max() == 1
    # Per-subject extras against direct computations.
    evaluated = brain & ~labels
    for i, m in enumerate(maps):
      assert res.per_subject[p]["subject_score"][i] == np.quantile(m[brain[i]], 0.999,
                                                                   method="higher")
      for t, c in enumerate(res.thresholds.cutoffs):
        assert res.per_subject[p]["fp_voxels"][t, i] == (m[evaluated[i]] > c).sum()
    best = s["best_mean_dice"]
    assert best["value"] == np.nanmax(list(rows.values())[:len(res.thresholds.sweep_keys)])


def test_per_subject_ap_and_auroc_equal_sklearn():
  subjects = _cohort(8)
  res = _run(subjects, "lesion").result()
  ref, labels, _ = _reference_numbers(subjects, "lesion")
  for p in ("raw", "mf"):
    maps = ref[p][1]
    ap, auc = res.per_subject[p]["ap"], res.per_subject[p]["auroc"]
    assert ap.shape == auc.shape == (len(subjects),)
    for i, (m, lab) in enumerate(zip(maps, labels)):
      if not lab.any():                 # subject 1: empty mask, no ranking metric
        assert np.isnan(ap[i]) and np.isnan(auc[i])
        continue
      # Every voxel of the subject's volume, as the pooled AUPRC.
      assert ap[i] == pytest.approx(average_precision_score(lab.ravel(), m.ravel()), abs=1e-12)
      assert auc[i] == pytest.approx(roc_auc_score(lab.ravel(), m.ravel()), abs=1e-12)


def test_stored_curves_lie_on_sklearn_curves():
  subjects = _cohort(9)
  doc = _run(subjects, "lesion").result().to_json()
  ref, labels, _ = _reference_numbers(subjects, "lesion")
  y = labels.ravel()
  for p in ("raw", "mf"):
    x = ref[p][1].ravel()
    c = doc[p]["curves"]
    precision, recall, thr = precision_recall_curve(y, x)
    fpr, tpr, roc_thr = roc_curve(y, x, drop_intermediate=False)
    pr = dict(zip(np.float32(thr), zip(precision, recall)))
    roc = dict(zip(np.float32(roc_thr), zip(fpr, tpr)))
    assert c["threshold"][0] is None   # +inf: nothing predicted
    assert (c["precision"][0], c["recall"][0], c["fpr"][0]) == (1.0, 0.0, 0.0)
    assert (precision[-1], recall[-1]) == (1.0, 0.0) and (fpr[0], tpr[0]) == (0.0, 0.0)
    for t, pc, rc, f in zip(*(c[k][1:] for k in ("threshold", "precision", "recall", "fpr"))):
      t = np.float32(t)
      assert pr[t] == (pc, rc) and roc[t] == (f, rc)
    # Quantised maps: fewer distinct lesion scores than recall levels, so every one is kept.
    kept = set(np.float32(c["threshold"][1:]))
    assert set(np.unique(x[y])) <= kept and kept <= set(np.unique(x[y])) | {x.min()}
    assert c["threshold"][-1] == x.min() and c["recall"][-1] == c["fpr"][-1] == 1.0
    assert "lesion" in c["definition"]


def test_healthy_mode_equals_in_memory_reference():
  subjects = _cohort(1, n=3, lesion=True)   # healthy mode on a lesion cohort: lesion-free brain
  res = _run(subjects, "healthy").result()
  ref, _, _ = _reference_numbers(subjects, "healthy")
  for p in ("raw", "mf"):
    assert dict(res.reference_rows(p)) == ref[p][0]
    assert "dice" not in res.per_subject[p] and "auprc" not in res.summary[p]
    assert "ap" not in res.per_subject[p] and "curves" not in res.summary[p]


def test_outputs(tmp_path):
  subjects = _cohort(2)
  ev = _run(subjects, "lesion")
  paths = ev.write(tmp_path / "out", "RD_T1w_test")
  res = ev.result()
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
      ["RD_T1w_test_raw.csv", "RD_T1w_test_mf.csv", "results.json", "subjects.csv",
       "subject_metrics.csv"])
  lines = paths["csv_raw"].read_text().splitlines()
  assert lines[0] == "thr,value"
  assert [l.split(",")[0] for l in lines[1:]] == list(res.thresholds.keys) + ["AUPRC"]
  doc = json.loads(paths["results"].read_text(),
                   parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
  assert doc["mode"] == "lesion" and doc["info"] == {"method": "test"}
  lesions = sum(scipy.ndimage.label(s[1], structure=np.ones((3, 3, 3)))[1] for s in subjects)
  assert doc["n_subjects"] == 4 and doc["counts"]["lesions"] == res.summary["raw"][
      "lesion_detection"]["lesions"] == lesions
  assert doc["raw"]["auprc"] == res.summary["raw"]["auprc"]
  assert set(doc["mf"]) >= {"reference", "dice_nanmean", "auroc", "best_pooled_dice", "fpr"}
  table = pd.read_csv(paths["subjects"], dtype={"best_key": str})
  assert len(table) == 8 and list(table.columns[:3]) == ["subject_path", "subject", "scanner"]
  row = table[(table.subject == "sub-0") & (table.postproc == "mf")].iloc[0]
  best = res.best_key("mf")
  assert row.best_key == best
  assert row.dice_best == res.per_subject["mf"]["dice"][res.thresholds.keys.index(best), 0]
  assert row["fpr@FPR-0.01"] == res.per_subject["mf"]["fpr"][res.thresholds.keys.index(
      "FPR-0.01"), 0]
  assert (row.ap, row.auroc) == (res.per_subject["mf"]["ap"][0], res.per_subject["mf"]["auroc"][0])
  assert table[table.subject == "sub-1"].ap.isna().all()   # empty mask
  long = pd.read_csv(paths["subject_metrics"], dtype={"threshold_key": str})
  assert list(long.columns) == ["subject_path", "metric", "threshold_key", "postproc", "value"]
  dice = long[(long.metric == "dice") & (long.postproc == "raw")]
  assert len(dice) == 4 * len(res.thresholds.keys)
  assert dice.value.isna().sum() == np.isnan(res.per_subject["raw"]["dice"]).sum()
  auroc = long[(long.metric == "auroc") & (long.postproc == "raw")]
  assert auroc.threshold_key.isna().all()
  np.testing.assert_array_equal(auroc.value, res.per_subject["raw"]["auroc"])


def test_lesion_detection_counts():
  subjects = _cohort(3)
  res = _run(subjects, "lesion").result()
  keys = res.thresholds.keys
  structure = np.ones((3, 3, 3))
  for p in ("raw", "mf"):
    hit = np.zeros(len(keys), int)
    fp = np.zeros(len(res.thresholds.fpr_keys), int)
    for m, lab, _, _ in subjects:
      m = m if p == "raw" else scipy.ndimage.median_filter(m, size=4)
      ids, n = scipy.ndimage.label(lab, structure=structure)
      for j, c in enumerate(res.thresholds.cutoffs):
        hit[j] += sum((m[ids == i] > c).any() for i in range(1, n + 1))
      for j, (_, thr) in enumerate(PAIRS):
        pid, k = scipy.ndimage.label(m > thr, structure=structure)
        fp[j] += sum(not lab[pid == i].any() for i in range(1, k + 1))
    det = res.summary[p]["lesion_detection"]
    assert list(det["hit"].values()) == hit.tolist()
    assert list(det["fp_components"].values()) == fp.tolist()


def test_calibration_artifact_roundtrip(tmp_path):
  healthy = _cohort(4, n=3, lesion=False)
  cal = Calibrator()
  for m, lab, brain, meta in healthy:
    cal.add(m, lab, brain, meta)
  lesion_val = _run(_cohort(5), "lesion").result()
  csv = tmp_path / "val_healthy.csv"
  csv.write_text("Path\n/d/a.nii.gz\n")
  with pytest.raises(ConfigError, match="--calibrate"):
    load_thresholds(tmp_path / "ckpt")
  cal.write(tmp_path / "ckpt", [0.01, 0.05], lesion_result=lesion_val, validation_csv=csv,
            checkpoint_step=6, method="RD", modality="T1w")
  doc = load_artifact(tmp_path / "ckpt")
  assert doc["checkpoint_step"] == 6 and len(doc["validation_csv_sha256"]) == 64
  assert doc["n_voxels"] == sum(int(b.sum()) for _, _, b, _ in healthy)
  pairs = load_thresholds(tmp_path / "ckpt")
  best = lesion_val.summary["raw"]["best_mean_dice"]
  assert pairs[-1] == (cal.fpr_at(best["threshold"]), best["threshold"])
  brain = np.concatenate([m[b] for m, _, b, _ in healthy])
  for (f, thr), target in zip(pairs[:2], [0.01, 0.05]):
    assert f == target and (brain >= np.float32(thr)).mean() < target
  ts = ThresholdSet.build(SWEEP, pairs)
  assert ts.fpr_keys[-1] == f"FPR-{pairs[-1][0]}"


def test_subject_auroc():
  healthy = _run(_cohort(6, n=3, lesion=False), "healthy").result()
  lesion = _run(_cohort(7, n=4), "lesion").result()
  h = healthy.per_subject["raw"]["subject_score"]
  l = lesion.per_subject["raw"]["subject_score"]
  assert subject_auroc(healthy, lesion) == pytest.approx(
      roc_auc_score(np.r_[np.zeros(3), np.ones(4)], np.r_[h, l]))


def _evaluator(mode="lesion"):
  return Evaluator(mode, ThresholdSet.build(SWEEP, PAIRS))


@pytest.mark.parametrize("case, match", [
    ("shape", "shape"),
    ("nan", "NaN"),
    ("labels", "not binary"),
    ("empty", "empty cohort"),
    ("duplicate", "twice"),
    ("no_brain_healthy", "no subject has a brain voxel"),
])
def test_bad_input_is_a_clear_error(case, match):
  m = np.zeros(SHAPE, np.float32)
  m[5, 5, 5] = 0.5
  lab = np.zeros(SHAPE, bool)
  ev = _evaluator("healthy" if case == "no_brain_healthy" else "lesion")
  with pytest.raises(EvaluationError, match=match):
    if case == "shape":
      ev.add(m, lab[:, :, :5])
    elif case == "nan":
      bad = m.copy()
      bad[1, 2, 3] = np.nan
      ev.add(bad, lab)
    elif case == "labels":
      ev.add(m, np.where(lab, 1, 2))
    elif case == "empty":
      ev.result()
    elif case == "duplicate":
      ev.add(m, lab, meta={"path": "a"})
      ev.add(m, lab, meta={"path": "a"})
    else:
      ev.add(m, lab, brain=np.zeros(SHAPE, bool))
      ev.result()


def test_bad_configuration_and_calibration_input():
  with pytest.raises(ConfigError, match="mode"):
    Evaluator("slice", ThresholdSet.build(SWEEP))
  with pytest.raises(ConfigError, match="empty threshold sweep"):
    ThresholdSet.build((0.3, 0.1, 0.01))
  cal = Calibrator()
  cal.add(np.ones(SHAPE, np.float32), brain=np.zeros(SHAPE, bool))
  with pytest.raises(EvaluationError, match="no brain voxel"):
    cal.thresholds([0.01])
  cal.add(np.ones(SHAPE, np.float32))
  for bad in ([0.0], [1.0], [1.2], [-0.01]):
    with pytest.raises(EvaluationError, match=r"\(0, 1\)"):
      cal.thresholds(bad)
