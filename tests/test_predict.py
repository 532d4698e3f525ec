"""`uad_jax.predict`: maps back on the input's own grid and header, thresholds, bad input."""

import nibabel as nib
import numpy as np
import pytest

from data_helpers import brain_volume, write_nifti
from engine_helpers import cohort_config, tiny_cohort
from uad_jax import predict
from uad_jax.data.volumes import center_crop_pad, undo_center_crop_pad
from uad_jax.engine import evaluate, trainer
from uad_jax.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A calibrated intensity-baseline run on the tiny cohort (scoring = 1 - x inside the brain)."""
  cohort = tiny_cohort(tmp_path_factory.mktemp("cohort"))
  config = cohort_config("intensity", cohort)
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(config, workdir)
  evaluate.calibrate(config, workdir)
  return config, workdir


def test_undo_center_crop_pad_inverts_the_placement():
  a = np.arange(7 * 5, dtype=np.float32).reshape(7, 5) + 1
  for size in (3, 4, 5, 8, 9):
    back = undo_center_crop_pad(center_crop_pad(a, size), a.shape)
    kept = undo_center_crop_pad(center_crop_pad(np.ones_like(a), size), a.shape) > 0
    assert back.shape == a.shape
    np.testing.assert_array_equal(back[kept], a[kept])
    assert not back[~kept].any()


@pytest.mark.parametrize("image_size", [16, 32])   # the 20x20 scan is cropped / padded
def test_map_on_the_input_grid_with_its_affine(run, tmp_path, image_size):
  config, workdir = run
  config = config.copy_and_resolve_references()
  config.data.image_size = image_size
  affine = np.diag([1.2, 0.9, 2.5, 1.0])
  affine[:3, 3] = [-10.0, 4.0, 7.5]
  volume = brain_volume((20, 20, 4), seed=9)
  scan = write_nifti(tmp_path / "sub-x_T1w.nii.gz", volume, affine=affine)
  (path,) = predict.predict(config, workdir, scan, tmp_path / "out" / "map.nii.gz",
                            threshold="0.5")
  out = nib.load(str(path))
  np.testing.assert_allclose(out.affine, affine)
  x = (volume - volume.min()) / (volume.max() - volume.min())
  expected = np.where(x == 0, 0.0, 1.0 - x)
  if image_size < 20:   # cropped away rows/columns (offset 2) score 0
    inside = np.zeros((20, 20, 1), bool)
    inside[2:18, 2:18] = True
    expected = np.where(inside, expected, 0.0)
  np.testing.assert_allclose(out.get_fdata(), expected, atol=1e-6)
  seg = nib.load(str(tmp_path / "out" / "map_anomaly_seg.nii.gz"))
  np.testing.assert_array_equal(seg.get_fdata(), expected > 0.5)


def test_calibrated_thresholds_and_bad_input(run, tmp_path):
  config, workdir = run
  step_dir = evaluate.ScoringRun(config, workdir, None).step_dir
  assert predict.resolve_threshold("opt", step_dir) > 0
  assert predict.resolve_threshold("fpr-0.01", step_dir) > 0
  with pytest.raises(ConfigError, match="fpr-0.01"):
    predict.resolve_threshold("fpr-0.5", step_dir)
  four_d = write_nifti(tmp_path / "sub-y_T1w.nii.gz", np.ones((4, 4, 4, 2)))
  with pytest.raises(DataError, match="3-D"):
    predict.predict(config, workdir, four_d, tmp_path / "m.nii.gz")
  t2 = write_nifti(tmp_path / "sub-z_T2w.nii.gz", brain_volume((20, 20, 4)))
  with pytest.raises(DataError, match="T2w scan"):
    predict.predict(config, workdir, t2, tmp_path / "m.nii.gz")
  nan = brain_volume((20, 20, 4))
  nan[5, 5, 1] = np.nan
  with pytest.raises(DataError, match="NaN"):
    predict.predict(config, workdir, write_nifti(tmp_path / "sub-n_T1w.nii.gz", nan),
                    tmp_path / "m.nii.gz")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(DataError, match="not a NIfTI"):
    predict.predict(config, workdir, tmp_path / "notes.txt", tmp_path / "m.nii.gz")
