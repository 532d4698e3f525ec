"""LMDB slice database: builder, both record formats, reader, bad input (data.md §8, §14.1, §14.7)."""

import hashlib
import json
import pickle
import zlib

import lmdb
import numpy as np
import pytest

from data_helpers import brain_volume, make_cohort, reference_normalise, write_csv, write_nifti
from uad_jax.data import SliceDataSource, lmdb_format, make_train_iterator
from uad_jax.data.create_lmdb import main as create_lmdb_main
from uad_jax.data.lmdb_writer import write_slice_database
from uad_jax.data.pipeline import EpochShuffle
from uad_jax.errors import DataError


@pytest.fixture
def cohort(tmp_path):
  """3 subjects of 20x20x6 with empty slices 0 (all) and 3 (subject 1 only) + split CSV."""
  paths = make_cohort(tmp_path / "ds", 3)
  vol = brain_volume(seed=1, empty_slices=(0, 3))
  write_nifti(paths[1], vol)
  return paths, write_csv(tmp_path / "train.csv", paths)


def _raw_entries(db_dir):
  env = lmdb.open(str(db_dir), readonly=True, lock=False)
  with env.begin() as txn:
    entries = dict(txn.cursor())
  env.close()
  return entries


def test_paper_geometry_acceptance(tmp_path):  # §14.1
  vol = brain_volume((240, 240, 155), seed=5, empty_slices=(*range(0, 10), *range(140, 155)))
  vol[:, :, 50] = 0.0
  vol[3, 237, 50] = 9.0  # a single voxel in the border that the 224 crop removes: still kept
  path = write_nifti(tmp_path / "ds" / "sub-1" / "anat" / "sub-1_T1w.nii", vol, dtype=np.int16)
  csv = write_csv(tmp_path / "train.csv", [path])
  expected_norm = reference_normalise(path, np.float32)
  kept = [k for k in range(155) if expected_norm[:, :, k].any()]
  assert len(kept) == 130 and 50 in kept

  for reference_compatible in (False, True):
    out = tmp_path / ("ref" if reference_compatible else "ours")
    db = write_slice_database(csv, out, reference_compatible=reference_compatible,
                              progress=False)
    assert db == out / "slices" and (db / "data.mdb").is_file()
    keys = sorted(k for k in _raw_entries(db) if k != lmdb_format.HEADER_KEY)
    assert keys == [f"{i:08d}".encode() for i in range(len(kept))]
    src = SliceDataSource(out)
    assert len(src) == len(kept)
    for i in (0, kept.index(50), len(kept) - 1):
      item = src[i]
      assert item["image"].shape == (240, 240) and item["image"].dtype == np.float32
      np.testing.assert_allclose(item["image"], expected_norm[:, :, kept[i]], atol=1e-7)
      if not reference_compatible:
        assert item["subject"] == "sub-1" and item["slice_index"] == kept[i]
    # Through the training pipeline: one batch = one epoch = every slice once, cropped.
    with make_train_iterator(out, global_batch_size=len(kept), image_size=224, seed=0) as it:
      batch = next(it)["image"]
    assert batch.shape == (len(kept), 224, 224, 1)
    order = EpochShuffle(len(kept), seed=0).epoch_order(0)
    expected = np.moveaxis(expected_norm[8:232, 8:232, kept], 2, 0)[order]
    np.testing.assert_allclose(batch[..., 0], expected, atol=1e-7)


def test_our_format_records_and_header(cohort, tmp_path):
  paths, csv = cohort
  db = write_slice_database(csv, tmp_path / "out", progress=False)
  entries = _raw_entries(db)
  header = json.loads(entries[lmdb_format.HEADER_KEY])
  assert header["format"] == "uad_jax.slices" and header["version"] == 2
  assert header["count"] == 5 + 4 + 5 == len(entries) - 1
  assert header["source_csv"] == {"path": str(csv.resolve()),
                                  "sha256": hashlib.sha256(csv.read_bytes()).hexdigest()}
  assert header["normalisation"] == {"method": "min-max", "clip_percentiles": None}
  assert header["shape"] == [20, 20] and header["record"] == {"dtype": "<f4", "order": "C",
                                                     "checksum": "crc32-le-suffix"}
  assert [v["slice_indices"] for v in header["volumes"]] == [[1, 2, 3, 4, 5], [1, 2, 4, 5],
                                                             [1, 2, 3, 4, 5]]
  assert [v["first_key"] for v in header["volumes"]] == [0, 5, 9]
  assert header["volumes"][1]["meta"]["scanner"] == "scanner1"
  # A record is the raw little-endian float32 slice (half the reference's float64 payload) and
  # the CRC-32 of those bytes.
  norm = reference_normalise(paths[1], np.float32)
  value = entries[b"00000007"]  # volume 1, kept slice #2 = slice index 4
  data = np.ascontiguousarray(norm[:, :, 4], "<f4").tobytes()
  assert value == data + zlib.crc32(data).to_bytes(4, "little")
  assert len(value) == 20 * 20 * 4 + 4


def test_reference_compatible_records_are_the_reference_pickles(cohort, tmp_path):
  paths, csv = cohort
  db = write_slice_database(csv, tmp_path / "out", reference_compatible=True, progress=False)
  entries = _raw_entries(db)
  assert lmdb_format.HEADER_KEY not in entries and len(entries) == 14
  norm = reference_normalise(paths[0], np.float64)
  assert entries[b"00000000"] == pickle.dumps(norm[:, :, 1], protocol=4)


def test_both_formats_read_identically(cohort, tmp_path):  # §14.7
  _, csv = cohort
  ours = SliceDataSource(write_slice_database(csv, tmp_path / "a", progress=False))
  ref = SliceDataSource(write_slice_database(csv, tmp_path / "b", reference_compatible=True,
                                             progress=False))
  assert (ours.format, ref.format) == ("uad_jax", "reference")
  assert len(ours) == len(ref) == 14
  for i in range(14):
    a, b = ours[i]["image"], ref[i]["image"]
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (20, 20)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)  # float32 vs float64 normalisation
  assert "subject" not in ref[0]
  assert [ours[i]["subject"] for i in (0, 4, 5, 13)] == ["sub-000", "sub-000", "sub-001",
                                                          "sub-002"]
  assert [ours[i]["slice_index"] for i in range(5, 9)] == [1, 2, 4, 5]
  assert ours.volume_of(6)["path"].endswith("sub-001_T1w.nii.gz")


def test_source_accepts_both_paths_pickles_and_shares_the_environment(cohort, tmp_path):
  _, csv = cohort
  write_slice_database(csv, tmp_path / "out", progress=False)
  a, b = SliceDataSource(tmp_path / "out"), SliceDataSource(tmp_path / "out" / "slices")
  assert a.path == b.path and repr(a) == repr(b)
  c = pickle.loads(pickle.dumps(a))
  np.testing.assert_array_equal(c[3]["image"], a[3]["image"])
  with pytest.raises(IndexError):
    a[14]  # pylint: disable=pointless-statement
  assert a[np.int64(2)]["slice_index"] == 3


def test_map_size_grows_from_a_tiny_start(cohort, tmp_path):
  _, csv = cohort
  db = write_slice_database(csv, tmp_path / "out", map_size=16 * 4096, progress=False)
  env = lmdb.open(str(db), readonly=True, lock=False)
  grown = env.info()["map_size"]
  env.close()
  assert grown > 16 * 4096
  assert len(SliceDataSource(db)) == 14


def test_failed_build_leaves_nothing_and_keeps_the_old_database(cohort, tmp_path):
  paths, csv = cohort
  out = tmp_path / "out"
  write_slice_database(csv, out, progress=False)
  old = (out / "slices" / "data.mdb").read_bytes()
  bad = brain_volume(seed=9)
  bad[5, 5, 2] = np.nan
  write_nifti(paths[2], bad)
  with pytest.raises(DataError, match="sub-002_T1w.nii.gz: 1 of 2400 voxels are NaN"):
    write_slice_database(csv, out, progress=False)
  assert sorted(p.name for p in out.iterdir()) == ["slices"]  # no temporary left behind
  assert (out / "slices" / "data.mdb").read_bytes() == old
  with pytest.raises(DataError):
    write_slice_database(csv, tmp_path / "fresh", progress=False)
  assert list((tmp_path / "fresh").iterdir()) == []


def _corrupt(db_dir, key, value):
  env = lmdb.open(str(db_dir))
  with env.begin(write=True) as txn:
    txn.put(key, value)
  env.close()


@pytest.mark.parametrize("reference_compatible, value, message", [
    (False, b"\x00" * 100, "corrupt record: 100 bytes, expected 1604"),
    (False, b"\x00" * 1608, "corrupt record: 1608 bytes, expected 1604"),
    (True, b"\x80\x04garbage", "corrupt or disallowed pickle record"),
    (True, pickle.dumps([1.0, 2.0]), "expected a 2-D float array, got list"),
    (True, pickle.dumps(np.zeros((2, 2, 2))), r"expected a 2-D float array, got array of shape"),
], ids=["short", "long", "garbage-pickle", "list", "3d-array"])
def test_corrupt_records_raise_naming_database_and_key(cohort, tmp_path, reference_compatible,
                                                       value, message):
  _, csv = cohort
  db = write_slice_database(csv, tmp_path / "out", reference_compatible=reference_compatible,
                            progress=False)
  _corrupt(db, b"00000006", value)
  src = SliceDataSource(db)
  src[5]  # pylint: disable=pointless-statement  # neighbours still read
  with pytest.raises(DataError, match=message) as info:
    src[6]  # pylint: disable=pointless-statement
  assert f"{db.resolve()} key 00000006" in str(info.value)


class _Exploit:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (open, (self.target, "w"))


def test_restricted_unpickler_never_runs_code_from_a_database(cohort, tmp_path):
  _, csv = cohort
  db = write_slice_database(csv, tmp_path / "out", reference_compatible=True, progress=False)
  target = tmp_path / "pwned"
  exploit = pickle.dumps(_Exploit(str(target)), protocol=4)
  pickle.loads(exploit).close()  # a plain unpickler runs it: the file appears
  assert target.exists()
  target.unlink()
  _corrupt(db, b"00000001", exploit)
  with pytest.raises(DataError, match="global 'io.open' is not allowed"):
    SliceDataSource(db)[1]  # pylint: disable=expression-not-assigned
  assert not target.exists()
  for protocol in (2, 3, 4, 5):  # while every protocol's plain numpy array still loads
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    got = lmdb_format.decode_reference_slice(pickle.dumps(arr, protocol=protocol), where="t")
    np.testing.assert_array_equal(got, arr)


def test_wrong_format_version_and_incomplete_database(cohort, tmp_path):
  _, csv = cohort
  db = write_slice_database(csv, tmp_path / "out", progress=False)
  header = json.loads(_raw_entries(db)[lmdb_format.HEADER_KEY])
  env = lmdb.open(str(db))
  with env.begin(write=True) as txn:
    txn.delete(b"00000013")
  env.close()
  with pytest.raises(DataError, match="header counts 14 slices but the database holds 13"):
    SliceDataSource(db)
  header["version"] = 99
  _corrupt(db, lmdb_format.HEADER_KEY, json.dumps(header).encode())
  with pytest.raises(DataError, match=r"key __meta__: format version 99 is not supported .*"
                                      r"rebuild the database"):
    SliceDataSource(db)
  del header["volumes"]
  header["version"] = 2
  _corrupt(db, lmdb_format.HEADER_KEY, json.dumps(header).encode())
  with pytest.raises(DataError, match="key __meta__: malformed header .*volumes"):
    SliceDataSource(db)
  _corrupt(db, lmdb_format.HEADER_KEY, b"{not json")
  with pytest.raises(DataError, match="key __meta__: header record is not valid JSON"):
    SliceDataSource(db)


def test_missing_or_foreign_database(tmp_path):
  with pytest.raises(DataError, match="no LMDB slice database"):
    SliceDataSource(tmp_path)
  sibling = tmp_path.parent / (tmp_path.name + "\\slices")  # the reference's POSIX quirk
  env = lmdb.open(str(sibling))
  with env.begin(write=True) as txn:
    txn.put(b"00000000", lmdb_format.encode_reference_slice(np.ones((2, 2))))
  env.close()
  with pytest.raises(DataError, match=r"the reference tool wrote it to .*\\\\slices"):
    SliceDataSource(tmp_path)
  assert len(SliceDataSource(sibling)) == 1
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "data.mdb").write_bytes(b"not an lmdb file" * 300)
  with pytest.raises(DataError, match="bad: cannot open as LMDB"):
    SliceDataSource(tmp_path / "bad")


def test_cli_same_flags_as_the_reference(cohort, tmp_path, capsys):
  _, csv = cohort
  assert create_lmdb_main(["-d", str(csv), "-p", str(tmp_path / "o1"), "--no-progress"]) == 0
  assert create_lmdb_main(["--dataset", str(csv), "--path", str(tmp_path / "o2"),
                           "--reference-compatible", "--clip-percentiles", "1", "99"]) == 0
  assert SliceDataSource(tmp_path / "o1").format == "uad_jax"
  assert SliceDataSource(tmp_path / "o2").format == "reference"
  assert capsys.readouterr().out.strip().endswith("o2/slices")
  assert create_lmdb_main(["-d", str(tmp_path / "missing.csv"), "-p", str(tmp_path / "o3")]) == 2
  assert "missing.csv: split CSV not found" in capsys.readouterr().err
  assert not (tmp_path / "o3").exists()
