"""The shared engine on the tiny ANDi config: resume, TensorBoard, calibrate/eval outputs."""

import json

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine_helpers import tiny_cohort, tiny_config
from uad_jax.engine import checkpoints, evaluate, trainer
from uad_jax.engine.config import REPO_ROOT, load_config
from uad_jax.errors import ConfigError
from uad_jax.methods import andi


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return tiny_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
  """A workdir trained for 4 steps in one go (checkpoints at 2 and 4)."""
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(tiny_config(cohort), workdir)
  return workdir


def _restore(config, workdir, step=None):
  store = checkpoints.CheckpointStore(workdir / "checkpoints", read_only=True)
  target = andi.init_state(config, jax.random.key(0))
  restored = store.restore(target, step)
  store.close()
  return restored


def test_checkpoints_at_snapshot_steps(cohort, trained):
  store = checkpoints.CheckpointStore(trained / "checkpoints", read_only=True)
  assert store.steps() == [2, 4]
  step, state, data, meta = _restore(tiny_config(cohort), trained)
  assert step == 4 and int(state.step) == 4 and meta["method"] == "andi"
  assert "process_0" in data
  init = andi.init_state(tiny_config(cohort), jax.random.key(0))
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       state.params, init.params)
  assert max(jax.tree.leaves(moved)) > 0   # training changed the parameters


def test_resume_equals_uninterrupted_bit_for_bit(cohort, trained, tmp_path):
  config = tiny_config(cohort, n_iters=2)
  trainer.train(config, tmp_path)               # "interrupted" after step 2
  trainer.train(tiny_config(cohort), tmp_path)  # resumed to step 4
  _, resumed, _, _ = _restore(tiny_config(cohort), tmp_path)
  _, straight, _, _ = _restore(tiny_config(cohort), trained)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_corrupt_latest_checkpoint_falls_back(cohort, trained, tmp_path):
  import shutil
  work = tmp_path / "w"
  shutil.copytree(trained, work)
  for f in (work / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  step, _, _, _ = _restore(tiny_config(cohort), work)
  assert step == 2


def test_tensorboard_events_readable(trained):
  acc = EventAccumulator(str(trained / "tensorboard" / "train"),
                         size_guidance={"images": 0, "scalars": 0})
  acc.Reload()
  tags = acc.Tags()
  for tag in ("loss", "lr", "slices_per_s", "step_time_s"):
    assert tag in tags["scalars"]
  assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
  assert all(np.isfinite(e.value) for e in acc.Scalars("loss"))
  assert acc.Scalars("lr")[0].value == pytest.approx(1e-4)
  assert "samples" in tags["images"]
  assert any("config" in t for t in tags["tensors"])


def test_train_calibrate_evaluate_writes_every_output(cohort, trained, tmp_path):
  config = tiny_config(cohort)
  path = evaluate.calibrate(config, trained)
  doc = json.loads(path.read_text())
  assert path == trained / "checkpoints" / "4" / "calibration.json"
  assert doc["checkpoint_step"] == 4 and doc["method"] == "andi"
  assert [p["source"] for p in doc["pairs"]] == ["target", "opt_thr"]
  results = evaluate.evaluate(config, trained, out=str(tmp_path / "eval"))
  assert set(results) == {"healthy", "lesion"}
  for name, mode in (("healthy", "healthy"), ("lesion", "lesion")):
    d = tmp_path / "eval" / name
    for f in (f"andi_T1w_{name}_raw.csv", f"andi_T1w_{name}_mf.csv", "results.json",
              "subjects.csv", "subject_metrics.csv"):
      assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    res = json.loads((d / "results.json").read_text())
    assert res["mode"] == mode and res["n_subjects"] == 2
    assert res["info"]["checkpoint_step"] == 4
    # The calibration travels with the results (the report's threshold roles).
    cal = res["info"]["calibration"]
    assert cal["pairs"] == doc["pairs"] and cal["checkpoint_step"] == 4
    assert (cal["opt_thr"], cal["opt_thr_key"]) == (doc["opt_thr"], doc["opt_thr_key"])
    assert cal["validation_csv_sha256"] == doc["validation_csv_sha256"] is not None
    examples = sorted((d / "examples").glob("*.npz"))
    assert len(examples) == 2
    with np.load(examples[0]) as z:
      assert z["map"].shape == (16, 16) and z["image"].shape == (16, 16)
  assert (tmp_path / "eval" / "summary.md").is_file()


def test_scoring_is_deterministic_and_zero_on_background(cohort, trained):
  config = tiny_config(cohort)
  run = evaluate.ScoringRun(config, trained, None)
  rng = np.random.default_rng(0)
  volume = rng.uniform(0.1, 1.0, (5, 16, 16)).astype(np.float32)
  volume[:, :3] = 0.0
  volume[2] = 0.0                                # an empty slice is not scored: exactly 0
  a = run.scorer(volume, key_index=3)
  b = run.scorer(volume, key_index=3)
  np.testing.assert_array_equal(a, b)
  assert not a[2].any() and not a[:, :3].any()
  assert (a[[0, 1, 3, 4], 3:] > 0).mean() > 0.5


def test_missing_calibration_is_a_clear_error(cohort, trained, tmp_path):
  import shutil
  work = tmp_path / "w"
  shutil.copytree(trained, work)
  for f in (work / "checkpoints").rglob("calibration.json"):
    f.unlink()
  with pytest.raises(ConfigError, match="--calibrate"):
    evaluate.evaluate(tiny_config(cohort), work, out=str(tmp_path / "eval"))


def test_config_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown preset"):
    load_config(str(REPO_ROOT / "configs" / "andi.py") + ":dmeo")
  config = load_config(str(REPO_ROOT / "configs" / "andi.py") + ":tiny")
  with pytest.raises(AttributeError):
    config.model.nff = 3                       # locked: a typo cannot add a key
  with pytest.raises(ConfigError, match="data.train_lmdb is not set"):
    trainer.train(config, tmp_path)
