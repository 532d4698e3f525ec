"""Every registered method through the functions the CLIs call, on its `:tiny` preset.

train (the tiny preset's few steps, or the fit) -> checkpoint -> restore -> calibrate (method
calibration and thresholds) -> evaluate one tiny lesion cohort; the outputs are complete, the
maps finite, zero on background, and a second scoring of a volume gives the same maps.
"""

import json

import jax
import numpy as np
import pytest

from engine_helpers import cohort_config, tiny_cohort
from uad_jax import methods
from uad_jax.engine import checkpoints, evaluate, run_dir, trainer


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return tiny_cohort(tmp_path_factory.mktemp("cohort"))


@pytest.mark.parametrize("name", methods.METHODS)
def test_train_restore_calibrate_evaluate(name, cohort, tmp_path):
  config = cohort_config(name, cohort)
  method = methods.get_method(name)
  workdir = tmp_path / "run"
  trainer.train(config, workdir)

  for stage in method.stages or ():
    store = checkpoints.CheckpointStore(run_dir.checkpoint_dir(workdir, method, stage.name),
                                        read_only=True)
    assert store.steps()[-1] == stage.n_iters(config), stage.name
    store.close()
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  states, step, step_dir, meta = evaluate.restore_states(config, method, workdir, None, mesh)
  assert set(states) == ({s.name for s in method.stages} or {"fit"})
  assert meta["method"] == name and step_dir.is_dir()

  calibration = evaluate.calibrate(config, workdir)
  doc = json.loads(calibration.read_text())
  assert doc["method"] == name and doc["checkpoint_step"] == step
  if method.calibrate is not None:
    assert (step_dir / evaluate.METHOD_CALIBRATION).is_file()

  out = tmp_path / "eval"
  results = evaluate.evaluate(config, workdir, out=str(out), cohorts=["lesion"])
  res = json.loads((out / "lesion" / "results.json").read_text())
  assert res["n_subjects"] == 2 and res["info"]["method"] == name
  assert np.isfinite(results["lesion"].summary["raw"]["auprc"])
  with np.load(sorted((out / "lesion" / "examples").glob("*.npz"))[0]) as example:
    image, maps = example["image"], example["map"]
  assert np.all(np.isfinite(maps))
  assert not np.any(maps[image == 0])   # background scores 0

  run = evaluate.ScoringRun(config, workdir, None)
  volume = image[None].repeat(3, axis=0)
  np.testing.assert_array_equal(run.scorer(volume, key_index=1),
                                run.scorer(volume, key_index=1))
