"""Nothing silent, nothing stuck (issue 15): data and checkpoint integrity, crash-safe outputs,
locks, config checks and one-line errors. Every case here failed before its fix."""

import json
import logging
import os
import shutil
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import lmdb
import numpy as np
import pytest

from configs import common
from engine_helpers import cohort_config, tiny_cohort, tiny_config
from uad_jax import methods
from uad_jax.data import lmdb_format
from uad_jax.data.demo import cohort as demo_cohort
from uad_jax.data.demo import prepare as demo_prepare
from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.lmdb_writer import write_slice_database
from uad_jax.engine import checkpoints, evaluate, optim, trainer, workdir_lock
from uad_jax.engine.train_state import TrainState
from uad_jax.engine.config import REPO_ROOT, check_types, load_config
from uad_jax.errors import ConfigError, DataError, TrainingError, UadError
from uad_jax.methods import contract
from uad_jax.report import load as report_load


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return tiny_cohort(tmp_path_factory.mktemp("cohort"))


def _put(db_dir, key: bytes, value: bytes) -> None:
  env = lmdb.open(str(db_dir))
  with env.begin(write=True) as txn:
    txn.put(key, value)
  env.close()


def _dead_pid() -> int:
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def _fresh_db(cohort, tmp_path):
  return write_slice_database(cohort["train"], tmp_path / "lmdb", progress=False)


# --- Data ---------------------------------------------------------------------------------------

def test_garbage_record_of_the_right_length_is_refused_naming_subject_and_slice(cohort, tmp_path):
  db = _fresh_db(cohort, tmp_path)
  _put(db, b"00000005", np.random.default_rng(0).bytes(20 * 20 * 4 + 4))
  src = SliceDataSource(db)
  with pytest.raises(DataError, match=r"key 00000005 \(sub-001 slice \d+\): corrupt record: "
                                      "checksum mismatch"):
    src[5]  # pylint: disable=pointless-statement
  src[4]  # pylint: disable=pointless-statement  # its neighbours still read


def test_non_finite_slices_are_refused_in_every_format(cohort, tmp_path):
  db = _fresh_db(cohort, tmp_path)
  nan = np.full((20, 20), np.nan, np.float32)
  _put(db, b"00000002", lmdb_format.encode_slice(nan))   # a valid checksum over NaNs
  with pytest.raises(DataError, match="key 00000002 .*400 non-finite values"):
    SliceDataSource(db)[2]  # pylint: disable=expression-not-assigned
  ref = write_slice_database(cohort["train"], tmp_path / "ref", reference_compatible=True,
                             progress=False)
  _put(ref, b"00000001", lmdb_format.encode_reference_slice(nan))
  with pytest.raises(DataError, match="key 00000001: corrupt record: 400 non-finite"):
    SliceDataSource(ref)[1]  # pylint: disable=expression-not-assigned


def test_training_on_a_corrupt_database_stops_with_the_record(cohort, toy, tmp_path):
  db = _fresh_db(cohort, tmp_path)
  env = lmdb.open(str(db))
  with env.begin(write=True) as txn:   # every record: garbage bytes of the right length
    for key, value in list(txn.cursor()):
      if key != lmdb_format.HEADER_KEY:
        txn.put(key, np.random.default_rng(1).bytes(len(value)))
  env.close()
  config = tiny_config(cohort)
  config.data.train_lmdb = str(tmp_path / "lmdb")
  with pytest.raises(DataError, match="checksum mismatch"):
    trainer.train(config, tmp_path / "run")
  assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))


def test_version_1_database_is_read_with_a_warning(cohort, tmp_path, caplog):
  db = _fresh_db(cohort, tmp_path)
  env = lmdb.open(str(db))
  with env.begin(write=True) as txn:
    header = json.loads(txn.get(lmdb_format.HEADER_KEY))
    for key, value in list(txn.cursor()):
      if key != lmdb_format.HEADER_KEY:
        txn.put(key, value[:-4])       # version 1 records: no checksum
    header["version"] = 1
    del header["record"]["checksum"]
    txn.put(lmdb_format.HEADER_KEY, json.dumps(header).encode())
  env.close()
  expected = SliceDataSource(db)[3]["image"]
  assert "no per-record checksums" in caplog.text
  assert expected.shape == (20, 20) and np.isfinite(expected).all()


def test_truncated_data_file_is_an_error_naming_the_file(cohort, tmp_path):
  db = _fresh_db(cohort, tmp_path)
  data = db / "data.mdb"
  os.truncate(data, data.stat().st_size // 2)
  # Before: SIGBUS (the memory map read past the end of the file). Run in a child process so
  # that a crash fails the test instead of killing pytest.
  code = ("import sys; from uad_jax.data.lmdb_source import SliceDataSource\n"
          "from uad_jax.errors import DataError\n"
          f"try:\n  s = SliceDataSource({str(db)!r}); [s[i] for i in range(len(s))]\n"
          "except DataError as e:\n  print(e); sys.exit(3)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=REPO_ROOT, check=False)
  assert proc.returncode == 3, proc.stderr
  assert f"{data}: truncated LMDB file" in proc.stdout


def test_interrupted_database_replacement_is_recovered(cohort, tmp_path, caplog):
  db = _fresh_db(cohort, tmp_path)
  pid = _dead_pid()
  hidden = db.with_name(f".slices.old-{pid}")
  os.replace(db, hidden)                              # crash between the two renames
  partial = db.with_name(f".slices.tmp-{pid}")
  partial.mkdir()
  (partial / "data.mdb").write_bytes(b"half a database")
  src = SliceDataSource(tmp_path / "lmdb")            # the next run finds the old one again
  assert len(src) > 0 and db.is_dir() and not hidden.exists() and not partial.exists()
  assert f"restored {db}" in caplog.text and f"removed {partial}" in caplog.text


def test_database_replacement_swaps_in_one_step(cohort, tmp_path):
  db = _fresh_db(cohort, tmp_path)
  inode = (db / "data.mdb").stat().st_ino
  write_slice_database(cohort["train"], tmp_path / "lmdb", progress=False)
  assert (db / "data.mdb").stat().st_ino != inode
  assert sorted(p.name for p in (tmp_path / "lmdb").iterdir()) == ["slices"]


def test_record_checksum_is_crc32_of_the_slice_bytes():
  image = np.arange(6, dtype=np.float32).reshape(2, 3)
  value = lmdb_format.encode_slice(image)
  assert zlib.crc32(value[:-4]) == int.from_bytes(value[-4:], "little")
  np.testing.assert_array_equal(lmdb_format.decode_slice(value, (2, 3), where="t"), image)


# --- Checkpoints and training ------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
  """A workdir of the toy method trained for 4 steps (checkpoints at 2 and 4)."""
  workdir = tmp_path_factory.mktemp("run")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(methods, "get_method", lambda name: _toy_method())
    trainer.train(tiny_config(cohort), workdir)
  return workdir


def _toy_method(nan_from_step: int | None = None, refuse_init: bool = False) -> contract.Method:
  """A one-weight model registered as 'andi': the engine's behaviour in a second of compiling.

  nan_from_step: the loss is NaN from this step on. refuse_init: `init` raises a ConfigError
  (as PatchCore does without its backbone weights)."""
  def init(config, rng, ctx):
    if refuse_init:
      raise ConfigError("no weights for this model")
    tx, lr = optim.make_optimizer(config.optim, ctx.steps_per_epoch)
    w = jax.random.normal(rng, (config.model.nf, 64), jnp.float32)   # incompressible bytes
    return TrainState.create({"w": w}, tx, lr, ema=False)

  def train_step(config, state, batch, rng):
    loss_fn = lambda p: jnp.mean((batch["image"] * p["w"].mean() - 0.1) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    state = state.apply_gradients(grads)
    if nan_from_step is not None:
      loss = jnp.where(state.step >= nan_from_step, jnp.nan, loss)
    return state, {"loss": loss}

  def score(config, params, images, valid, rng):
    return images[..., 0] * jnp.abs(params["w"]).mean()   # 0 on background, as required

  return contract.Method(name="andi", score=score,
                         scoring_params=lambda config, states, artifacts: states["model"].params,
                         stages=(contract.Stage("model", init, train_step),))


@pytest.fixture
def toy(monkeypatch):
  """Registers `_toy_method(**kwargs)` as 'andi' (other methods stay); returns the registering
  function."""
  real = methods.get_method

  def use(**kwargs):
    monkeypatch.setattr(methods, "get_method",
                        lambda name: _toy_method(**kwargs) if name == "andi" else real(name))
  use()
  return use


def _copy(trained, tmp_path):
  work = tmp_path / "w"
  shutil.copytree(trained, work)
  return work


def _flip_bytes(step_dir) -> None:
  """Flips a byte in the middle of the largest array-data file of a checkpoint's state: orbax
  alone restores it without a word, one parameter changed."""
  f = max((p for p in (step_dir / "state").glob("ocdbt.process_*/d/*")),
          key=lambda p: p.stat().st_size)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0x10
  f.write_bytes(bytes(data))


def _restore(workdir, step=None):
  store = checkpoints.CheckpointStore(workdir / "checkpoints", read_only=True)
  try:
    return store.restore(None, step)
  finally:
    store.close()


def test_checkpoint_digest_is_verified_and_a_corrupt_newest_falls_back(cohort, toy, tmp_path,
                                                                       caplog):
  trainer.train(tiny_config(cohort), tmp_path)
  assert (tmp_path / "checkpoints" / "4" / checkpoints.DIGEST).is_file()
  _flip_bytes(tmp_path / "checkpoints" / "4")
  step, _, _, _ = _restore(tmp_path)   # before: step 4, with silently changed values
  assert step == 2
  assert "checkpoints/4 is corrupt: " in caplog.text and "differ from digest.json" in caplog.text
  with pytest.raises(DataError, match="checkpoints/4 is corrupt"):
    _restore(tmp_path, step=4)
  # Training resumes: before, step 4 counted as complete, and once resumed from step 2,
  # saving step 4 again raised StepAlreadyExistsError. Now step 4 is quarantined (kept).
  trainer.train(tiny_config(cohort), tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4",
                                                                         "4.corrupt-0"]
  assert _restore(tmp_path)[0] == 4


def test_non_finite_loss_stops_training_naming_step_and_slices(cohort, toy, tmp_path):
  toy(nan_from_step=3)
  config = tiny_config(cohort, log_freq=4)   # checked at the snapshot of step 4 all the same
  with pytest.raises(TrainingError, match=r"non-finite training metrics \{'loss': nan\} at step "
                                          r"3 \(batch of sub-00\d slice \d.*the last checkpoint"):
    trainer.train(config, tmp_path)
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2"]


def test_config_json_is_written_once_after_validation(cohort, toy, tmp_path):
  toy(refuse_init=True)
  wide = tiny_config(cohort, n_iters=2)
  wide.model.nf = 16
  with pytest.raises(ConfigError, match="no weights"):
    trainer.train(wide, tmp_path)
  assert not (tmp_path / "config.json").exists()       # before: written, locking the workdir
  toy()
  trainer.train(tiny_config(cohort, n_iters=2), tmp_path)   # the corrected launch runs
  recorded = (tmp_path / "config.json").read_text()
  other_batch = tiny_config(cohort)
  other_batch.data.batch_size = 2
  with pytest.raises(ConfigError, match="another pipeline"):
    trainer.train(other_batch, tmp_path)
  assert (tmp_path / "config.json").read_text() == recorded   # before: rewritten
  other_model = tiny_config(cohort)
  other_model.model.nf = 16
  with pytest.raises(ConfigError, match="holds a run of another model"):
    trainer.train(other_model, tmp_path)


def test_second_training_on_a_workdir_names_the_holder(cohort, toy, tmp_path):
  with workdir_lock.hold(tmp_path):
    with pytest.raises(ConfigError, match=rf"is in use by process {os.getpid()} on "):
      trainer.train(tiny_config(cohort), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def test_eval_with_another_methods_config_says_so(cohort, trained, toy, tmp_path):
  config = cohort_config("patchcore", cohort)
  with pytest.raises(ConfigError, match=r"holds a run of another method .*\"andi\".*"
                                        r"\"patchcore\""):
    evaluate.evaluate(config, trained, out=str(tmp_path / "eval"))
  work = _copy(trained, tmp_path)
  (work / "config.json").unlink()                      # the checkpoint's own record
  with pytest.raises(ConfigError, match="holds a andi checkpoint but config.method is patchcore"):
    evaluate.evaluate(config, work, out=str(tmp_path / "eval"))


# --- Evaluation outputs ------------------------------------------------------------------------

def test_interrupted_reevaluation_is_marked_and_refused_by_the_report(cohort, trained, toy,
                                                                     tmp_path):
  work = _copy(trained, tmp_path)
  config = tiny_config(cohort)
  evaluate.calibrate(config, work)
  out = work / "eval" / "step_4"
  evaluate.evaluate(config, work)
  assert sorted(p.name for p in out.iterdir()) == ["healthy", "lesion", "summary.md"]
  assert len(report_load.load_cohorts([work])) == 2
  broken = tiny_config(cohort)
  broken.eval.cohorts.lesion.csv = str(tmp_path / "moved.csv")   # fails at the second cohort
  with pytest.raises(ConfigError, match="moved.csv: no such file"):
    evaluate.evaluate(broken, work)
  # Before: the old lesion folder and summary.md stayed beside the new healthy one.
  assert sorted(p.name for p in out.iterdir()) == ["EVALUATION_IN_PROGRESS.json", "healthy"]
  with pytest.raises(DataError, match="the evaluation is incomplete"):
    report_load.load_cohorts([work])
  evaluate.evaluate(config, work)
  assert sorted(p.name for p in out.iterdir()) == ["healthy", "lesion", "summary.md"]
  # Cohorts of different evaluations in one folder (e.g. one written before a recalibration).
  results = out / "lesion" / "results.json"
  doc = json.loads(results.read_text())
  doc["info"]["calibration"]["opt_thr"] = 0.5
  results.write_text(json.dumps(doc))
  with pytest.raises(DataError, match="cohorts of different evaluations in one folder"):
    report_load.load_cohorts([work])


# --- The user's commands -----------------------------------------------------------------------

def _command(*args, cwd=REPO_ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("UAD_DEBUG", None)
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd,
                        env=env, timeout=300, check=False)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/andi.py:tiny", "--workdir", "W"],
     "config.data.train_lmdb is not set; pass --config.data.train_lmdb=PATH"),
    (["--config", "configs/andi.py:tiny", "--workdir", "W", "--config.model.nff=8"],
     "--config.model.nff: no such key in configs/andi.py:tiny; did you mean model.nf"),
    (["--config", "configs/andi.py:dmeo", "--workdir", "W"], "unknown preset 'dmeo'"),
    (["--config", "configs/andi.py:tiny", "--workdir", "W", "--config.model.ch_mult=foo"],
     "config.model.ch_mult=('foo',) has the wrong type: the default is (1, 2)"),
], ids=["missing-path", "unknown-key", "unknown-preset", "wrong-type"])
def test_train_errors_are_one_line_with_exit_code_2(args, message, tmp_path):
  proc = _command("uad_jax.train", *[str(tmp_path / a) if a == "W" else a for a in args])
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("uad_jax.train: error: ") and message in lines[0]


def test_eval_errors_are_one_line_and_debug_shows_the_traceback(cohort, trained, tmp_path):
  flags = ["--config", "configs/andi.py:tiny", f"--config.data.train_lmdb={cohort['lmdb']}",
           f"--config.eval.cohorts.test.csv={cohort['test_healthy']}",
           "--config.eval.cohorts.test.lesion=false"]
  proc = _command("uad_jax.eval", *flags, f"--ckpt={trained}", "--step", "3")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      f"uad_jax.eval: error: no checkpoint for step 3 in {trained / 'checkpoints'}; available: "
      "[2, 4]"]
  proc = _command("uad_jax.eval", *flags, f"--ckpt={tmp_path / 'nothing'}", "--debug")
  assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"uad_jax.eval: error: --ckpt {tmp_path / 'nothing'}: no such checkpoint directory")


def test_missing_calibration_is_one_error(cohort, trained, toy, tmp_path):
  with pytest.raises(UadError, match="no calibrated thresholds at .*calibration.json"):
    evaluate.evaluate(tiny_config(cohort), trained, out=str(tmp_path / "eval"))


def test_help_lists_presets_and_print_config_lists_every_key():
  proc = _command("uad_jax.train", "--help")
  assert proc.returncode == 0
  assert "configs/andi.py: :demo, :tiny" in proc.stdout and "--print_config" in proc.stdout
  proc = _command("uad_jax.eval", "--config", "configs/patchcore.py", "--print_config",
                  "--config.eval.cohorts.brats.csv=/data/brats_T2w.csv")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert "eval.cohorts.brats.csv = '/data/brats_T2w.csv'" in lines   # before: KeyError
  assert "eval.cohorts.brats.lesion = True" in lines
  assert "data.batch_size = 32" in lines or any(l.startswith("data.batch_size = ") for l in lines)


def test_config_types_are_checked_against_the_preset():
  defaults = load_config(str(REPO_ROOT / "configs" / "andi.py") + ":tiny")
  config = load_config(str(REPO_ROOT / "configs" / "andi.py") + ":tiny")
  with config.unlocked():
    config.model.ch_mult = (1, 2, 2)
    config.optim.lr = 1                        # an int where a float is expected is fine
  check_types(config, defaults)
  with config.unlocked():
    config.model.ch_mult = ("foo",)
  with pytest.raises(ConfigError, match=r"config.model.ch_mult=\('foo',\) has the wrong type"):
    check_types(config, defaults)


def test_demo_preset_builds_its_missing_data_resumably(tmp_path, monkeypatch, caplog):
  caplog.set_level(logging.INFO, logger="uad_jax")
  calls, generate = [], demo_cohort.generate

  def small_generate(out_dir):
    calls.append(out_dir)
    return generate(out_dir, scale=0.1, progress=False)

  monkeypatch.setattr(demo_prepare.demo_cohort, "generate", small_generate)
  config = load_config(str(REPO_ROOT / "configs" / "andi.py") + ":demo")
  common.use_demo_cohort(config, str(tmp_path / "demo"))
  assert demo_prepare.demo_root(config) == tmp_path / "demo"
  demo_prepare.ensure_demo_data(config)        # before: "data.train_lmdb ...: no such dir"
  assert "generating the demo cohort" in caplog.text
  assert SliceDataSource(config.data.train_lmdb).header["version"] == lmdb_format.FORMAT_VERSION
  for csv in (config.eval.val_healthy_csv, config.eval.cohorts.test_ms.csv):
    assert os.path.isfile(csv)
  demo_prepare.ensure_demo_data(config)        # complete: nothing is redone
  assert len(calls) == 1
  assert demo_prepare.demo_root(tiny_config({"lmdb": "x", "val_healthy": "v", "val_lesion": "l",
                                             "test_healthy": "h", "test_lesion": "t"})) is None
