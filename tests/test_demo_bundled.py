"""Bundled demo checkpoints: made from a finished run, installed instead of training, scored
through the usual commands, and named honestly in the report's Models table."""

import json

import pytest

from engine_helpers import cohort_config, tiny_cohort
from uad_jax.data.demo import bundled
from uad_jax.engine import checkpoints, evaluate, run_dir, trainer
from uad_jax.report import training


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return tiny_cohort(tmp_path_factory.mktemp("cohort"))


def test_bundle_install_score_and_describe(cohort, tmp_path, monkeypatch):
  config = cohort_config("itermask", cohort)   # two stages: both stores travel
  workdir = tmp_path / "run"
  trainer.train(config, workdir)
  evaluate.calibrate(config, workdir)
  trained = training.describe(workdir)
  assert trained["origin"] == "trained in this workdir"
  assert trained["training"] == (f"{config.training.n_iters} steps (first) + "
                                 f"{config.training.ae_n_iters} steps (ae) of "
                                 f"{config.data.batch_size} slices at {config.data.image_size}²")
  assert float(trained["training minutes"]) > 0

  monkeypatch.setattr(bundled, "MODELS_DIR", tmp_path / "models")
  bundle = bundled.make_bundle(workdir, "python -m uad_jax.train --config X --workdir W")
  assert bundle == tmp_path / "models" / "itermask_T1w"
  assert not list(bundle.rglob("calibration.json"))   # calibrations are made where it is used
  for store_dir in ("checkpoints", "stages/first/checkpoints"):
    src = checkpoints.CheckpointStore(workdir / store_dir, read_only=True)
    dst = checkpoints.CheckpointStore(bundle / store_dir, read_only=True)
    assert dst.steps() == src.steps()[-1:] and dst.intact(dst.steps()[0])
    src.close(), dst.close()
  info = json.loads((bundle / training.BUNDLE_FILE).read_text())
  assert info["method"] == "itermask" and info["command"].startswith("python -m uad_jax.train")

  installed = tmp_path / "demo_run"
  assert bundled.install("itermask", "T1w", installed) == info
  assert bundled.install("itermask", "T1w", installed) is None   # never over a run
  assert bundled.install("andi", "T1w", tmp_path / "other") is None   # no such bundle
  trainer.train(config, installed)   # complete: nothing is trained
  store = checkpoints.CheckpointStore(run_dir.checkpoint_dir(installed), read_only=True)
  assert store.steps() == [config.training.ae_n_iters]
  store.close()
  assert evaluate.calibrate(config, installed).is_file()   # restores and scores
  described = training.describe(installed)
  assert described["origin"].startswith("bundled demo checkpoint, trained by `python -m")
  assert described["training"] == trained["training"]
