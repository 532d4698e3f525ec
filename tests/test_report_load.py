"""Finding and reading `uad_jax.eval` outputs for the report."""

import json
import shutil

import numpy as np
import pytest

import report_synthetic
from uad_jax.errors import DataError
from uad_jax.report import load

SMALL = (("test_healthy", None, 4), ("test_ms", "ms", 4))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  andi, _ = report_synthetic.make_run(root, "ANDi", cohorts=SMALL,
                                      extra_meta={"cohort": "participants-cohort"})
  return root, andi


def test_workdir_step_cohort_and_parent_folders(runs):
  root, andi = runs
  step = andi / "eval" / "step_5"
  want = [step / "test_healthy", step / "test_ms"]
  assert load.find_result_dirs([andi]) == want
  assert load.find_result_dirs([step]) == want
  assert load.find_result_dirs([step / "test_ms"]) == [step / "test_ms"]
  assert load.find_result_dirs([root]) == want


def test_newest_step_of_a_workdir(runs, tmp_path):
  _, andi = runs
  work = tmp_path / "w"
  shutil.copytree(andi, work)
  shutil.copytree(work / "eval" / "step_5", work / "eval" / "step_12")
  shutil.copytree(work / "eval" / "step_5", work / "eval" / "step_9")
  assert {d.parent.name for d in load.find_result_dirs([work])} == {"step_12"}


def test_cohorts_roles_and_subject_rows(runs):
  _, andi = runs
  cohorts = load.load_cohorts([andi])
  assert [(c.run, c.cohort, c.mode) for c in cohorts] == [
      ("ANDi", "test_healthy", "healthy"), ("ANDi", "test_ms", "lesion")]
  c = cohorts[1]
  assert c.workdir == andi and c.step == 5 and c.modality == "T1w"
  assert [(t.role, t.key, t.value) for t in c.calibrated] == [
      ("FPR-0.01", "FPR-0.01", 0.55), ("opt_thr", "FPR-0.05", 0.45)]
  rows = c.subjects
  assert len(rows) == 8 and set(rows["postproc"]) == {"raw", "mf"}
  # The metadata column 'cohort' is kept under another name; ours is the eval cohort.
  assert set(rows["cohort"]) == {"test_ms"}
  assert set(rows["meta_cohort"]) == {"participants-cohort"}
  assert {"dice@opt_thr", "fp_voxels@opt_thr", "fpr@FPR-0.01", "dice_best"} <= set(rows.columns)
  np.testing.assert_allclose(rows["fp_voxels@opt_thr"] / rows["eval_voxels"],
                             rows["fpr@opt_thr"], rtol=1e-12)
  assert (rows["lesion_size"] == rows["lesion_voxels_uncropped"]).all()
  examples = c.examples()
  assert set(examples) == set(rows["subject_path"])
  counts = c.pooled_counts.loc["raw"]
  assert counts.loc["FPR-0.01", "fp_voxels"] == rows.loc[rows["postproc"] == "raw",
                                                         "fp_voxels@FPR-0.01"].sum()


def _rewrite_info(cohort_dir, **changes):
  """Edits results.json `info`: a value of None deletes the key."""
  path = cohort_dir / "results.json"
  doc = json.loads(path.read_text())
  for k, v in changes.items():
    if v is None:
      doc["info"].pop(k)
    else:
      doc["info"][k] = v
  path.write_text(json.dumps(doc))


def test_roles_travel_with_the_results(runs, tmp_path):
  _, andi = runs
  work = tmp_path / "w"
  shutil.copytree(andi, work)
  cohort = work / "eval/step_5/test_ms"
  roles = lambda: [t.role for t in load.load_cohorts([cohort])[0].calibrated]
  doc = json.loads((cohort / "results.json").read_text())
  assert [p["source"] for p in doc["info"]["calibration"]["pairs"]] == ["target", "opt_thr"]
  # The checkpoint (and its calibration.json) is gone: the roles come from results.json.
  _rewrite_info(cohort, checkpoint=str(tmp_path / "nowhere"))
  assert roles() == ["FPR-0.01", "opt_thr"]
  # Outputs written before info.calibration: calibration.json next to the checkpoint.
  _rewrite_info(cohort, calibration=None, checkpoint=str(andi / "checkpoints" / "5"))
  assert roles() == ["FPR-0.01", "opt_thr"]
  # Neither: every key is its own role.
  _rewrite_info(cohort, checkpoint=str(tmp_path / "nowhere"))
  assert roles() == ["FPR-0.01", "FPR-0.05"]


def test_two_runs_of_one_method_get_workdir_labels(runs, tmp_path):
  _, andi = runs
  shutil.copytree(andi, tmp_path / "seed1")
  shutil.copytree(andi, tmp_path / "seed2")
  labels = {c.run for c in load.load_cohorts([tmp_path / "seed1", tmp_path / "seed2"])}
  assert labels == {"ANDi (seed1)", "ANDi (seed2)"}


def test_errors_name_the_problem(runs, tmp_path):
  _, andi = runs
  with pytest.raises(DataError, match="no results.json"):
    load.find_result_dirs([tmp_path])
  with pytest.raises(DataError, match="no such directory"):
    load.find_result_dirs([tmp_path / "missing"])
  with pytest.raises(DataError, match="named twice"):
    load.find_result_dirs([andi, andi / "eval" / "step_5" / "test_ms"])
  (tmp_path / "eval").mkdir()
  with pytest.raises(DataError, match="without eval/step_<N>"):
    load.find_result_dirs([tmp_path])
  broken = tmp_path / "broken"
  shutil.copytree(andi / "eval" / "step_5" / "test_ms", broken)
  (broken / "subjects.csv").unlink()
  with pytest.raises(DataError, match="subjects.csv: missing"):
    _ = load.load_cohorts([broken])[0].subjects
  (broken / "results.json").write_text(json.dumps({"schema": "other"}))
  with pytest.raises(DataError, match="schema"):
    load.load_cohorts([broken])
