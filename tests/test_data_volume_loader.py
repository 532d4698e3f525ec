"""Evaluation volume iterator (data.md §10): layout, crop, masks, read-ahead, errors."""

import threading
import time

import numpy as np
import pytest

from data_helpers import make_cohort, reference_normalise, write_csv, write_nifti
from uad_jax.data import iterate_volumes, read_split
from uad_jax.data import volume_loader
from uad_jax.errors import ConfigError, DataError


def _reader_threads():
  return [t for t in threading.enumerate() if t.name == "uad_jax-volume-reader"]


def test_volumes_are_zxy_cropped_with_masks_and_metadata(tmp_path):
  paths = make_cohort(tmp_path / "ds", 3, lesion=True)
  mask = np.zeros((20, 20, 6), np.float32)
  mask[0, 0, 1] = 1.0  # outside the 16x16 crop: counted uncropped, gone after the crop
  mask[8:10, 9, 3] = 2.0
  write_nifti(paths[1].with_name("sub-001_seg-anomaly_mask.nii.gz"), mask)
  records = read_split(write_csv(tmp_path / "lesion.csv", paths))
  volumes = list(iterate_volumes(records, image_size=16, require_masks=True))
  assert [v.record.subject for v in volumes] == ["sub-000", "sub-001", "sub-002"]
  v = volumes[1]
  assert v.record.meta["lesion_type"] == "tumour"
  assert v.image.shape == v.mask.shape == (6, 16, 16)
  assert v.image.dtype == np.float32 and v.mask.dtype == bool
  norm = reference_normalise(paths[1], np.float32)  # (X, Y, Z)
  np.testing.assert_allclose(v.image, np.transpose(norm, (2, 0, 1))[:, 2:18, 2:18], atol=1e-7)
  assert v.lesion_voxels_uncropped == 3
  assert np.argwhere(v.mask).tolist() == [[3, 6, 7], [3, 7, 7]]
  assert volumes[0].lesion_voxels_uncropped == 4 * 5 * 2


def test_healthy_cohort_without_masks_and_uncropped(tmp_path):
  paths = make_cohort(tmp_path / "ds", 2, shape=(20, 18, 4))
  records = read_split(write_csv(tmp_path / "healthy.csv", paths))
  (a, b) = iterate_volumes(records, image_size=None, require_masks=False, prefetch=1)
  assert a.image.shape == (4, 20, 18) and not a.mask.any() and a.lesion_voxels_uncropped == 0
  assert b.record.path == paths[1]


def test_error_is_raised_at_the_failing_record_and_names_the_file(tmp_path):
  paths = make_cohort(tmp_path / "ds", 3, lesion=True)
  paths[1].with_name("sub-001_seg-anomaly_mask.nii.gz").unlink()
  records = read_split(write_csv(tmp_path / "lesion.csv", paths))
  it = iterate_volumes(records, image_size=16, require_masks=True)
  assert next(it).record.subject == "sub-000"
  with pytest.raises(DataError, match="sub-001_seg-anomaly_mask.nii.gz: anomaly mask not found"):
    next(it)
  assert not _reader_threads()


def test_unexpected_errors_are_wrapped_with_the_file(tmp_path, monkeypatch):
  (path,) = make_cohort(tmp_path / "ds", 1)
  (record,) = read_split(write_csv(tmp_path / "s.csv", [path]))

  def broken(*args, **kwargs):
    raise MemoryError("out of memory")
  monkeypatch.setattr(volume_loader, "load_volume", broken)
  with pytest.raises(DataError, match=r"sub-000_T1w.nii.gz: cannot load \(MemoryError"):
    list(iterate_volumes([record], image_size=16, require_masks=False))


def test_reads_ahead_and_stops_when_the_consumer_stops(tmp_path, monkeypatch):
  paths = make_cohort(tmp_path / "ds", 6)
  records = read_split(write_csv(tmp_path / "s.csv", paths))
  loaded = []
  real = volume_loader.load_eval_volume

  def counting(record, **kwargs):
    loaded.append(record.subject)
    return real(record, **kwargs)
  monkeypatch.setattr(volume_loader, "load_eval_volume", counting)
  it = iterate_volumes(records, image_size=16, require_masks=False, prefetch=2)
  next(it)
  deadline = time.monotonic() + 5
  while len(loaded) < 4 and time.monotonic() < deadline:  # 1 consumed + 2 queued + 1 waiting
    time.sleep(0.01)
  time.sleep(0.1)
  assert len(loaded) == 4  # read ahead, but bounded by `prefetch`
  it.close()
  assert not _reader_threads()
  assert len(loaded) == 4


def test_constant_volume_in_an_eval_cohort(tmp_path):
  paths = make_cohort(tmp_path / "ds", 2)
  write_nifti(paths[0], np.full((20, 20, 6), 3.0))
  records = read_split(write_csv(tmp_path / "s.csv", paths))
  with pytest.raises(DataError, match="sub-000_T1w.nii.gz: constant volume"):
    next(iterate_volumes(records, image_size=16, require_masks=False))


def test_configured_data_type_must_match_the_file_names(tmp_path):
  paths = make_cohort(tmp_path / "ds", 1, modality="T2w")
  records = read_split(write_csv(tmp_path / "s.csv", paths))
  (v,) = iterate_volumes(records, image_size=16, require_masks=False, data_type="T2w")
  assert v.record.modality == "T2w"
  with pytest.raises(ConfigError, match="sub-000_T2w.nii.gz: file name says T2w but data_type"):
    list(iterate_volumes(records, image_size=16, require_masks=False, data_type="T1w"))
