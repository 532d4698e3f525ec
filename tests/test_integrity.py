"""Nothing silent, nothing stuck (issue 15): data and checkpoint integrity, crash-safe outputs,
locks, config checks and one-line errors. Every case here failed before its fix."""

import json
import os
import subprocess
import sys
import zlib

import lmdb
import numpy as np
import pytest

from engine_helpers import tiny_cohort, tiny_config
from uad_jax.data import lmdb_format
from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.lmdb_writer import write_slice_database
from uad_jax.engine import trainer
from uad_jax.engine.config import REPO_ROOT
from uad_jax.errors import DataError


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


def test_training_on_a_corrupt_database_stops_with_the_record(cohort, tmp_path):
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
