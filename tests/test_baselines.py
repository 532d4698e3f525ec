"""The intensity and z-score baselines against direct numpy computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import cohort_config, tiny_cohort
from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.volumes import center_crop_pad
from uad_jax.errors import ConfigError
from uad_jax.methods import baselines


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return tiny_cohort(tmp_path_factory.mktemp("cohort"))


def test_zscore_statistics_per_slice_position(cohort):
  config = cohort_config("zscore", cohort)
  state, meta = baselines.zscore_fit(config, cohort["lmdb"], None, None, None, None)
  source = SliceDataSource(cohort["lmdb"])
  items = [source[i] for i in range(len(source))]
  assert meta["training_slices"] == len(items)
  for z in range(config.eval.split_size):
    # Positions without training slices (the empty slice 0) keep mean = std = 0.
    stack = [center_crop_pad(it["image"], 16) for it in items if it["slice_index"] == z]
    stack = np.stack(stack) if stack else np.zeros((1, 16, 16))
    np.testing.assert_allclose(state["mean"][z], stack.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(state["std"][z], stack.std(axis=0), atol=1e-5)
  images = np.stack([center_crop_pad(items[0]["image"], 16)] * 4)[..., None]
  maps = np.asarray(baselines.zscore_score(config, state, jnp.asarray(images), None, None))
  x = images[..., 0]
  expected = np.abs(x - state["mean"]) / np.maximum(state["std"], config.model.min_std)
  np.testing.assert_allclose(maps, np.where(x == 0, 0, expected), rtol=1e-6)


def test_intensity_polarity(cohort):
  config = cohort_config("intensity", cohort)
  images = np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)[None, ..., None]
  dark = baselines.intensity_score(config, None, jnp.asarray(images), None, None)
  np.testing.assert_allclose(dark[0], [[0.0, 0.75], [0.5, 0.0]])
  config.model.polarity = "bright"
  bright = baselines.intensity_score(config, None, jnp.asarray(images), None, None)
  np.testing.assert_allclose(bright[0], images[0, ..., 0])
  config.model.polarity = "brigth"
  with pytest.raises(ConfigError, match="polarity"):
    baselines.intensity_fit(config, None, None, None, None, None)
