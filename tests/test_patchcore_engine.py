"""PatchCore through the shared engine (tiny preset): bank building, resume, subsampling, the
paper preset's refusal without weights, calibrate/evaluate outputs, sharded scoring."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engine_helpers import cohort_config, tiny_cohort
from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.engine import checkpoints, evaluate, sharding, trainer
from uad_jax.engine.config import REPO_ROOT
from uad_jax.errors import ConfigError
from uad_jax.methods.patchcore import bank as patchcore_bank, coreset, method as patchcore

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return tiny_cohort(tmp_path_factory.mktemp("cohort"))


def _config(cohort, preset="tiny", **model):
  config = cohort_config("patchcore", cohort, preset)
  for k, v in model.items():
    config.model[k] = v
  return config


@pytest.fixture(scope="module")
def fitted(cohort, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(_config(cohort), workdir)
  return workdir


def _restore(workdir):
  store = checkpoints.CheckpointStore(workdir / "checkpoints", read_only=True)
  restored = store.restore(None)
  store.close()
  return restored


class _Writer:
  """A SummaryWriter stand-in that can fail after a given block (a simulated crash)."""

  def __init__(self, fail_at_step=None):
    self.fail_at_step = fail_at_step
    self.texts = []

  def text(self, step, tag, text):
    self.texts.append((tag, text))

  def scalars(self, step, values):
    if step == self.fail_at_step:
      raise KeyboardInterrupt("simulated crash")


def test_fit_stores_the_bank_and_the_warning(cohort, fitted):
  step, state, _, meta = _restore(fitted)
  config = _config(cohort)
  n = len(SliceDataSource(cohort["lmdb"]))
  plan = meta["plan"]
  assert step == 0 and meta["method"] == "patchcore"
  assert plan["train_slices"] == n and plan["grid"] == [4, 4]
  k = int(n * 16 * config.model.sample_size)
  assert plan["coreset_size"] == k and sum(plan["block_budgets"]) == k
  assert state["bank"].shape == (k, config.model.target_embed_dim)
  assert state["projection"].shape == (config.model.projection_dim, config.model.target_embed_dim)
  assert meta["coreset"]["start_indices"] == np.asarray(state["start_indices"]).tolist()
  assert len(set(map(tuple, np.asarray(state["bank"]).tolist()))) == k   # distinct rows
  assert meta["seed"] == config.seed and meta["backbone"]["random_weights"]
  assert any("RANDOM BACKBONE WEIGHTS" in w for w in meta["warnings"])
  assert not (fitted / patchcore_bank.FIT_STATE_DIR).exists()
  acc = EventAccumulator(str(fitted / "tensorboard" / "train"), size_guidance={"tensors": 0})
  acc.Reload()
  assert any("warnings" in t for t in acc.Tags()["tensors"])
  assert "fit/descriptors_per_s" in acc.Tags()["scalars"]


def test_bank_is_the_coreset_of_the_descriptors(cohort, fitted):
  """Replays the build independently: descriptors of the slices in the stream order, one-shot
  greedy per block continued from the earlier picks, must give the stored bank."""
  _, state, _, meta = _restore(fitted)
  config = _config(cohort)
  plan = meta["plan"]
  source = SliceDataSource(cohort["lmdb"])
  order = np.random.default_rng([config.seed, 0]).permutation(len(source))
  from uad_jax.data.volumes import center_crop_pad  # pylint: disable=import-outside-toplevel
  images = np.stack([center_crop_pad(source[int(i)]["image"], config.data.image_size)
                     for i in order])[..., None]
  desc = np.asarray(patchcore.features.descriptors(
      config, state["backbone"], images)).reshape(-1, config.model.target_embed_dim)
  z = np.asarray(coreset.project(desc, state["projection"]), np.float64)
  dist = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
  picks, offset, per_slice = [], 0, plan["descriptors_per_slice"]
  for valid, budget in zip(plan["block_valid_slices"], plan["block_budgets"]):
    block = np.arange(offset, offset + valid * per_slice)
    start = np.asarray(state["start_indices"])
    r = (dist(z[block], z[block[start]]).mean(1) if not picks
         else dist(z[block], z[picks]).min(1))
    for _ in range(budget):
      picks.append(int(block[np.argmax(r)]))
      r = np.minimum(r, dist(z[block], z[picks[-1:]])[:, 0])
    offset += valid * per_slice
  np.testing.assert_allclose(np.asarray(state["bank"]), desc[picks], rtol=1e-6, atol=1e-7)


def test_resumed_build_equals_uninterrupted(cohort, tmp_path):
  config = _config(cohort, coreset_block_slices=4)
  config.training.fit_state_minutes = 0.0          # save after every block
  mesh = sharding.make_mesh()
  key = jax.random.key(config.seed)
  straight, meta = patchcore.fit(config, cohort["lmdb"], mesh, key, _Writer(), tmp_path / "a")
  assert len(meta["plan"]["block_budgets"]) == 3
  with pytest.raises(KeyboardInterrupt):
    patchcore.fit(config, cohort["lmdb"], mesh, key, _Writer(fail_at_step=2), tmp_path / "b")
  assert (tmp_path / "b" / patchcore_bank.FIT_STATE_DIR / "1").is_dir()   # block 1 was saved
  other = _config(cohort, coreset_block_slices=8)
  with pytest.raises(ConfigError, match="another plan"):
    patchcore.fit(other, cohort["lmdb"], mesh, key, _Writer(), tmp_path / "b")
  resumed, _ = patchcore.fit(config, cohort["lmdb"], mesh, key, _Writer(), tmp_path / "b")
  for name in ("bank", "projection", "start_indices"):
    np.testing.assert_array_equal(np.asarray(resumed[name]), np.asarray(straight[name]))


def test_subsampling_uses_a_seeded_prefix_of_the_training_order(cohort, tmp_path):
  config = _config(cohort, max_train_slices=5, max_bank_size=3)
  _, meta = patchcore.fit(config, cohort["lmdb"], sharding.make_mesh(),
                          jax.random.key(config.seed), _Writer(), tmp_path)
  n = len(SliceDataSource(cohort["lmdb"]))
  assert meta["plan"]["train_slices"] == 5 and meta["plan"]["database_slices"] == n
  assert meta["plan"]["coreset_size"] == 3 and sum(meta["plan"]["block_budgets"]) == 3
  assert "first 5 of" in meta["subsampling"] and f"seed {config.seed}" in meta["subsampling"]


def test_paper_preset_refuses_without_weights(cohort, tmp_path):
  config = _config(cohort, preset="paper")
  assert not config.model.allow_random_backbone and config.model.backbone_weights == ""
  with pytest.raises(ConfigError, match=r"wide_resnet50_2-95faca4d\.pth.*import_weights"):
    trainer.train(config, tmp_path)
  assert not (tmp_path / "checkpoints" / "0").exists()


def test_calibrate_and_evaluate_carry_the_warning(cohort, fitted, tmp_path):
  config = _config(cohort)
  path = evaluate.calibrate(config, fitted)
  assert path == fitted / "checkpoints" / "0" / "calibration.json"
  results = evaluate.evaluate(config, fitted, out=str(tmp_path / "eval"))
  assert set(results) == {"healthy", "lesion"}
  for name in ("healthy", "lesion"):
    d = tmp_path / "eval" / name
    for f in (f"patchcore_T1w_{name}_raw.csv", f"patchcore_T1w_{name}_mf.csv", "results.json"):
      assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    info = json.loads((d / "results.json").read_text())["info"]
    assert any("RANDOM BACKBONE WEIGHTS" in w for w in info["warnings"])
  lesion = json.loads((tmp_path / "eval" / "lesion" / "results.json").read_text())
  keys = lesion["thresholds"]["sweep"]["keys"]
  assert len(keys) == 31 and keys[0] == "0.6" and keys[-1] == "0.9"   # numpy arange


def test_volume_scoring_is_deterministic_and_zero_on_background(cohort, fitted):
  run = evaluate.ScoringRun(_config(cohort), fitted, None)
  rng = np.random.default_rng(0)
  volume = rng.uniform(0.1, 1.0, (5, 32, 32)).astype(np.float32)
  volume[:, :7] = 0.0
  volume[2] = 0.0
  a = run.scorer(volume, key_index=3)
  b = run.scorer(volume, key_index=0)                      # no randomness in PatchCore
  np.testing.assert_array_equal(a, b)
  assert not a[2].any() and not a[:, :7].any()
  assert (a[[0, 1, 3, 4], 7:] > 0).all()


def test_bank_sharded_over_four_devices_equals_one_device():
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, str(TESTS / "patchcore_multidevice.py")], env=env,
                       capture_output=True, text=True, timeout=300, check=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  assert r["index_equal"] and r["empty_slice_zero"] and r["background_zero"], r
  # Only float32 rounding of the distance expansion differs (another matmul blocking).
  assert r["scores_diff_vs_sq_norm"] <= 2e-6 and r["maps_diff_vs_sq_norm"] <= 2e-6, r
  # Each device holds a quarter of the (padded) bank, and no collective gathers the bank.
  assert r["shard_shape"][1] == 1 and 4 * r["shard_shape"][2] >= r["bank_shape"][0], r
  assert r["largest_all_gather_vs_bank"] < 0.5, r
