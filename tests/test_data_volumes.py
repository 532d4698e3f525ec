"""Volume loading, normalisation, crop/pad and masks against data.md §5-7 and §14.2-14.5."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_helpers import brain_volume, reference_normalise, write_nifti
from uad_jax.data.volumes import (center_crop_pad, load_mask, load_volume, mask_path_for,
                                  modality_of)
from uad_jax.errors import ConfigError, DataError


def test_min_max_maps_min_to_zero_and_max_to_one(tmp_path):  # §14.2
  raw = brain_volume((12, 10, 5), seed=3) + 7.0  # background 7, not 0
  path = write_nifti(tmp_path / "sub-1_T1w.nii.gz", raw)
  vol = load_volume(path)
  assert vol.dtype == np.float32 and vol.shape == (12, 10, 5)
  assert vol.min() == 0.0 and vol.max() == 1.0
  np.testing.assert_allclose(vol, (raw - raw.min()) / (raw.max() - raw.min()), rtol=0, atol=1e-7)


def test_float64_load_is_the_reference_builder_bit_for_bit(tmp_path):
  path = write_nifti(tmp_path / "sub-1_T1w.nii.gz", brain_volume(seed=1))
  vol = load_volume(path, dtype=np.float64)
  assert vol.dtype == np.float64
  np.testing.assert_array_equal(vol, reference_normalise(path, np.float64))


def test_percentile_clipping_uses_numpy_linear_percentiles_over_all_voxels(tmp_path):  # §14.2
  raw = brain_volume((16, 16, 4), seed=2)
  path = write_nifti(tmp_path / "sub-1_T1w.nii.gz", raw)
  vol = load_volume(path, clip_percentiles=(1, 99))
  lo, hi = np.percentile(raw, [1, 99])  # background zeros included: lo == 0 here
  assert lo == 0.0
  expected = (np.clip(raw, lo, hi) - lo) / (hi - lo)
  np.testing.assert_allclose(vol, expected, atol=1e-6)
  assert np.count_nonzero(vol == 1.0) >= 0.01 * raw.size  # the top percent is saturated


def test_raw_voxel_order_and_scaling_are_kept(tmp_path):
  raw = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
  flipped = np.diag([-1.0, 1.0, 1.0, 1.0])  # an affine a reorienting loader would flip
  img = nib.Nifti1Image(raw.astype(np.int16), flipped)
  img.header.set_slope_inter(2.0, 5.0)
  img.to_filename(str(tmp_path / "sub-1_T1w.nii"))
  vol = load_volume(tmp_path / "sub-1_T1w.nii")
  scaled = raw * 2.0 + 5.0
  np.testing.assert_allclose(vol, (scaled - scaled.min()) / (scaled.max() - scaled.min()),
                             atol=1e-7)


@pytest.mark.parametrize("n, before, after", [(182, 21, 21), (219, 2, 3), (223, 0, 1)])
def test_pad_splits_floor_before_ceil_after(n, before, after):  # §14.5
  x = np.ones((3, n, n), np.float32)
  y = center_crop_pad(x, 224)
  assert y.shape == (3, 224, 224)
  ones_rows = np.flatnonzero(y[0, :, 112])
  assert ones_rows[0] == before and 224 - 1 - ones_rows[-1] == after


@pytest.mark.parametrize("n, offset", [(240, 8), (225, 0), (241, 8), (243, 10), (226, 1)])
def test_crop_offset_is_python_round_half_even(n, offset):  # §6, §14.5
  x = np.arange(n)[:, None] * 1000 + np.arange(n)[None, :]
  y = center_crop_pad(x, 224)
  assert y[0, 0] == offset * 1000 + offset and y[-1, -1] == (offset + 223) * 1001


def test_240_to_224_keeps_rows_8_to_231_and_mixed_crop_pad():
  x = np.random.default_rng(0).random((2, 240, 200))
  y = center_crop_pad(x, 224)
  np.testing.assert_array_equal(y[:, :, 12:212], x[:, 8:232, :])
  assert not y[:, :, :12].any() and not y[:, :, 212:].any()
  z = center_crop_pad(x, (100, 300), axes=(1, 2))  # explicit sizes and axes
  np.testing.assert_array_equal(z[:, :, 50:250], x[:, 70:170, :])


def test_mask_path_and_modality_from_name():  # §14.3
  p = Path("/d/sub-1/anat/sub-1_T2w.nii.gz")
  assert mask_path_for(p, "T2w") == Path("/d/sub-1/anat/sub-1_seg-anomaly_mask.nii.gz")
  assert mask_path_for(p) == Path("/d/sub-1/anat/sub-1_seg-anomaly_mask.nii.gz")
  assert mask_path_for("/d/sub-1/ses-2/anat/sub-1_ses-2_T1w.nii") == Path(
      "/d/sub-1/ses-2/anat/sub-1_ses-2_seg-anomaly_mask.nii.gz")
  assert modality_of(p) == "T2w" and modality_of("/x/brain.nii.gz") is None


def test_mask_lookup_rejects_a_wrong_data_type_instead_of_an_empty_mask():  # §7.1 pitfall
  with pytest.raises(ConfigError, match=r"sub-1_T2w.nii.gz.*T2w.*'T1w'"):
    mask_path_for("/d/sub-1/anat/sub-1_T2w.nii.gz", "T1w")
  with pytest.raises(DataError, match="brain.nii.gz: cannot derive the modality"):
    mask_path_for("/d/brain.nii.gz")


def test_mask_binarises_above_one_half(tmp_path):  # §14.3
  image = write_nifti(tmp_path / "sub-1_T1w.nii.gz", brain_volume((5, 1, 1), empty_slices=()))
  m = np.array([0.0, 0.5, 0.6, 2.0, 4.0], np.float32).reshape(5, 1, 1)
  write_nifti(tmp_path / "sub-1_seg-anomaly_mask.nii.gz", m)
  mask = load_mask(image, (5, 1, 1), required=True)
  assert mask.dtype == bool
  assert mask.ravel().tolist() == [False, False, True, True, True]


def test_missing_mask_healthy_vs_lesion_cohort(tmp_path):  # §14.4
  image = write_nifti(tmp_path / "sub-1_T1w.nii.gz", brain_volume())
  mask = load_mask(image, (20, 20, 6), required=False)
  assert mask.shape == (20, 20, 6) and mask.dtype == bool and not mask.any()
  with pytest.raises(DataError, match="sub-1_seg-anomaly_mask.nii.gz: anomaly mask not found"):
    load_mask(image, (20, 20, 6), required=True)


def test_mask_shape_must_match_its_image(tmp_path):
  image = write_nifti(tmp_path / "sub-1_T1w.nii.gz", brain_volume())
  write_nifti(tmp_path / "sub-1_seg-anomaly_mask.nii.gz", np.zeros((20, 20, 5)))
  with pytest.raises(DataError, match=r"seg-anomaly_mask.nii.gz: mask shape \(20, 20, 5\) "
                                      r"differs from the shape \(20, 20, 6\)"):
    load_mask(image, (20, 20, 6), required=False)


def _not_nifti(tmp_path):
  p = tmp_path / "sub-1_T1w.nii.gz"
  p.write_text("this is not an image\n")
  return p


def _truncated(tmp_path):
  p = write_nifti(tmp_path / "sub-1_T1w.nii.gz", brain_volume((30, 30, 8)))
  p.write_bytes(p.read_bytes()[:2000])
  return p


def _with(value):
  def make(tmp_path):
    vol = brain_volume()
    vol[3, 4, 2] = value
    return write_nifti(tmp_path / "sub-1_T1w.nii.gz", vol)
  return make


@pytest.mark.parametrize("make, message", [
    (lambda t: t / "sub-1_T1w.nii.gz", "image volume not found"),
    (_not_nifti, "not a readable NIfTI file"),
    (_truncated, "cannot read voxel data"),
    (lambda t: write_nifti(t / "sub-1_T1w.nii.gz", np.ones((4, 4, 3, 2))),
     r"expected a 3-D volume, got shape \(4, 4, 3, 2\)"),
    (_with(np.nan), "1 of 2400 voxels are NaN or Inf"),
    (_with(np.inf), "1 of 2400 voxels are NaN or Inf"),
    (lambda t: write_nifti(t / "sub-1_T1w.nii.gz", np.full((4, 4, 3), 5.0)),
     "constant volume"),
], ids=["missing", "not-nifti", "truncated", "4d", "nan", "inf", "constant"])
def test_bad_volumes_raise_naming_the_file(tmp_path, make, message):
  path = make(tmp_path)
  with pytest.raises(DataError, match=message) as info:
    load_volume(path)
  assert str(path) in str(info.value)


def test_constant_after_clipping_is_rejected(tmp_path):
  vol = np.zeros((10, 10, 10), np.float32)
  vol[0, 0, 0] = 1.0  # 1 voxel in 1000: the 99th percentile is 0
  path = write_nifti(tmp_path / "sub-1_T1w.nii.gz", vol)
  with pytest.raises(DataError, match="constant volume .* after percentile clipping"):
    load_volume(path, clip_percentiles=(1, 99))
