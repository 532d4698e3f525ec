"""DISYRE's feed, schedule, sliding window and method functions beyond the reference fixtures:
shapes, determinism, the spec's constants, independent numpy/scipy computations, a toy train step.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.cluster import vq

from configs import disyre as disyre_configs
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.methods.disyre import anomaly, augment, codebook, method, severity
from uad_jax.methods.disyre import sliding_window as sw

fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
CODEBOOK = {"codebook": list(disyre_configs.REFERENCE_T1_CODEBOOK)}


def tiny():
  return disyre_configs.get_config("tiny")


def brain_slices(n, size, seed=0):
  """(n, size, size, 1) float32: discs of varying radius and texture on a zero background."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
  out = np.zeros((n, size, size, 1), np.float32)
  for b in range(n):
    disc = np.hypot(yy, xx) < size * rng.uniform(0.25, 0.45)
    out[b, ..., 0] = disc * np.clip(0.5 + 0.2 * rng.standard_normal((size, size)), 0.05, 1)
  return out


# --- severity schedule -------------------------------------------------------------------------

def test_schedule_values_and_labels_of_the_spec():
  s = severity.sqrt_alphas_cumprod(100, 0.1, 20.0)
  np.testing.assert_allclose(s[[0, 24, 49, 74, 99]],
                             [0.9995, 0.726579, 0.272391, 0.050776, 0.004516], atol=2e-6)
  assert np.all(np.diff(s) < 0)
  alpha = np.array([0, 0.05, 0.25, 0.5, 0.75, 1.0])
  np.testing.assert_array_equal(severity.severity_labels(alpha, np.zeros(6), s),
                                [99, 74, 51, 36, 23, 0])
  # the label uses max(α_tex, α_bias)
  assert severity.severity_labels([0.0], [1.0], s)[0] == 0
  np.testing.assert_array_equal(severity.scoring_timesteps(100, 4), [99, 74, 49, 24])
  with pytest.raises(ConfigError):
    severity.scoring_timesteps(100, 0)


# --- augmentation ------------------------------------------------------------------------------

def test_random_crop_or_pad_bounds():
  rng = np.random.default_rng(0)
  image = np.arange(30 * 10, dtype=np.float32).reshape(30, 10) + 1
  for _ in range(20):
    out = augment.random_crop_or_pad(image, 16, rng)
    assert out.shape == (16, 16)
    # rows: a crop starting in [0, 30 - 16); cols: 10 -> 16 padded (3 before, 3 after)
    assert np.all(out[:, :3] == 0) and np.all(out[:, 13:] == 0)
    top = int(out[0, 3] - 1) // 10
    assert 0 <= top < 14
    np.testing.assert_array_equal(out[:, 3:13], image[top:top + 16])


def test_deformed_samples_when_the_first_slice_is_smaller_than_the_patch():
  """The centre range U(P/2, S⁰ - P/2) is reversed when S⁰ < P: still a value between."""
  images = [np.ones((6, 9), np.float32), np.ones((30, 30), np.float32)]
  cfg = augment.AugmentConfig(p_scale=1.0, **{k: 0.0 for k in (
      "p_elastic", "p_rotation", "p_brightness", "p_gamma", "p_inverted_gamma", "p_noise",
      "p_blur")})
  out = augment.spatial_augment(images, 16, np.random.default_rng(0), cfg)
  assert out.shape == (2, 16, 16) and np.isfinite(out).all()


def test_foreground_crop():
  image = np.zeros((10, 12))
  image[2:5, 3:9] = 1
  assert augment.foreground_crop(image).shape == (3, 6)
  assert augment.foreground_crop(np.zeros((4, 4))).shape == (4, 4)


def test_augment_batch_shapes_range_and_determinism():
  images = [im[..., 0] for im in brain_slices(6, 30)]
  cfg = augment.AugmentConfig(*(0.5,) * 8)   # exercise every branch
  a = augment.augment_batch(images, 16, np.random.default_rng(3), cfg)
  b = augment.augment_batch(images, 16, np.random.default_rng(3), cfg)
  assert a.shape == (6, 16, 16) and a.dtype == np.float32
  assert a.min() >= 0 and a.max() <= 1
  np.testing.assert_array_equal(a, b)


# --- anomaly -----------------------------------------------------------------------------------

def test_quantise_matches_scipy_vq():
  x = np.random.default_rng(0).uniform(0, 1, (20, 20))
  code = np.asarray(disyre_configs.REFERENCE_T1_CODEBOOK)
  expected, _ = vq.vq(x.reshape(-1, 1), code.reshape(-1, 1))
  np.testing.assert_array_equal(anomaly.quantise(x, code).ravel(), expected)


def test_shapes_are_binary_in_range_and_scale():
  rng = np.random.default_rng(0)
  cfg = anomaly.AnomalyConfig(patch=64, codebook=np.zeros(5))
  for fn in (anomaly.square_shape, anomaly.sphere_shape):
    for _ in range(10):
      shape = fn(cfg, rng)
      assert shape.shape == (64, 64)
      assert set(np.unique(shape)) <= {0.0, 1.0}
  assert anomaly.AnomalyConfig(patch=32, codebook=np.zeros(5)).scaled(44) == 22
  # a warp with scale 1 and no rotation is the identity on a binary mask
  mask = np.zeros((20, 20))
  mask[4:12, 6:15] = 1
  np.testing.assert_array_equal(anomaly.warp_mask(mask, 20, 0.0, 1.0, rng), mask)


def test_dag_anomaly_stays_in_its_window():
  clean = brain_slices(8, 32)[..., 0]
  cfg = anomaly.AnomalyConfig(patch=16, codebook=np.asarray(disyre_configs.REFERENCE_T1_CODEBOOK))
  corrupted, alpha_tex, alpha_bias = anomaly.dag_anomalies(clean, cfg, np.random.default_rng(1))
  assert corrupted.dtype == np.float32 and corrupted.min() >= 0 and corrupted.max() <= 1
  assert np.all((alpha_tex >= 0) & (alpha_tex < 1) & (alpha_bias >= 0) & (alpha_bias <= 1))
  for b in range(8):
    rows, cols = np.nonzero(corrupted[b] != clean[b])
    if rows.size:
      assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16
    # background (exact zeros of the clean slice) is never touched
    assert np.all(corrupted[b][clean[b] == 0] == 0)
  # the realised bias severity is the largest change the bias step made
  assert np.any(alpha_tex > 0)


def test_foreign_patch_comes_from_another_slice():
  batch = np.stack([np.full((16, 16), v, np.float32) for v in (0.2, 0.7)])
  fp = anomaly.foreign_patch(batch, 0, 8, np.random.default_rng(0))
  np.testing.assert_array_equal(fp, np.full((8, 8), 0.7, np.float32))


def test_batch_transform_feed():
  config = tiny()
  transform = method.batch_transform(config, CODEBOOK)
  batch = {"image": brain_slices(4, 30)}
  out = transform(batch, np.random.default_rng(5))
  again = transform(batch, np.random.default_rng(5))
  p = config.data.patch_size
  assert out["image"].shape == out["corrupted"].shape == (4, p, p, 1)
  assert out["image"].dtype == out["corrupted"].dtype == np.float32
  assert out["label"].dtype == np.int32 and np.all((out["label"] >= 0) & (out["label"] < 100))
  for k in out:
    np.testing.assert_array_equal(out[k], again[k])
  with pytest.raises(ConfigError, match="codebook"):
    method.batch_transform(config, {})


# --- codebook ----------------------------------------------------------------------------------

def test_kmeans_codebook_finds_the_clusters():
  rng = np.random.default_rng(0)
  centres = np.array([0.1, 0.3, 0.5, 0.7, 0.9])
  values = (rng.choice(centres, 5000) + 0.01 * rng.standard_normal(5000)).astype(np.float32)
  np.testing.assert_allclose(sorted(codebook.kmeans_codebook(values)), centres, atol=0.01)


def test_prepare_uses_a_given_codebook():
  config = tiny()
  config.data.codebook = disyre_configs.REFERENCE_T1_CODEBOOK
  assert codebook.prepare(config, "/nonexistent")["codebook"] == pytest.approx(
      list(disyre_configs.REFERENCE_T1_CODEBOOK))
  config.data.codebook = (0.1, 0.2)
  with pytest.raises(ConfigError):
    codebook.prepare(config, "/nonexistent")


# --- sliding window and maps -------------------------------------------------------------------

@pytest.mark.parametrize("size", [(24, 24), (21, 30), (16, 16)])
def test_sliding_window_identity_and_constant(size):
  layout = sw.window_layout(*size, 16, 4)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2,) + size + (1,)), jnp.float32)
  windows = sw.extract_windows(x, layout)
  np.testing.assert_allclose(sw.fold_windows(windows, layout), x, atol=1e-6)
  const = sw.fold_windows(jnp.full(windows.shape, 0.3), layout)
  np.testing.assert_allclose(const, 0.3, atol=1e-6)
  # every padded pixel is covered by a window
  assert np.all(layout.normaliser > 0)


def test_paper_window_layout():
  config = disyre_configs.get_config()
  layout = method.layout_of(config, 224, 224)
  assert layout.pad == ((0, 0), (0, 0)) and layout.num_windows == 16
  assert {r for r, _ in layout.origins} == {0, 32, 64, 96}
  assert method.network_evaluations(config) == 64
  w = sw.importance_map(128)
  assert w.max() == pytest.approx(0.99902, abs=1e-5) and w.min() == pytest.approx(1e-3)


def test_anomaly_maps_against_numpy():
  rng = np.random.default_rng(0)
  x = np.where(rng.uniform(size=(3, 8, 8, 1)) < 0.4, -1.0, rng.uniform(-1, 1, (3, 8, 8, 1)))
  x = x.astype(np.float32)
  restored = rng.uniform(-1, 1, (4,) + x.shape).astype(np.float32)
  expected = np.abs(x[None] - restored).mean(0)[..., 0]
  expected *= (x > -1).mean(axis=(1, 2, 3))[:, None, None]
  expected[x[..., 0] == -1] = 0
  np.testing.assert_allclose(method.anomaly_maps(jnp.asarray(x), jnp.asarray(restored)),
                             expected, rtol=1e-6, atol=1e-7)


# --- training and scoring ----------------------------------------------------------------------

def test_train_step_decreases_loss_and_updates_ema():
  config = tiny()
  config.optim.lr = 1e-3
  state = method.init(config, jax.random.key(0), contract.TrainContext())
  batch = method.batch_transform(config, CODEBOOK)({"image": brain_slices(4, 24)},
                                                   np.random.default_rng(0))
  step = fast_jit(lambda s, b, k: method.train_step(config, s, b, k))
  losses = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  assert int(state.step) == 8
  delta = jax.tree.map(lambda e, p: float(jnp.abs(e - p).max()), state.ema_params, state.params)
  assert max(jax.tree.leaves(delta)) > 0
  previews = method.preview(config, state, batch, jax.random.key(0))
  for tag in ("corrupted", "restored", "clean"):
    assert previews[tag].shape == (1, 16, 16)


def test_score_shape_background_and_chunking():
  config = tiny()
  state = method.init(config, jax.random.key(0), contract.TrainContext())
  # a non-zero output head so that the restorations differ from 0
  params = jax.tree.map(lambda a: a + 0.01, state.params)
  images = brain_slices(2, config.data.image_size)
  def score(config):
    return fast_jit(lambda p, im: method.score(config, p, im, jnp.ones(2, bool),
                                               jax.random.key(0)))(params, images)
  maps = np.asarray(score(config))
  assert maps.shape == (2, 24, 24)
  assert np.all(maps[images[..., 0] == 0] == 0) and maps.max() > 0
  config.eval.sw_batch_size = 7   # windows per network call does not change the result
  np.testing.assert_allclose(score(config), maps, rtol=1e-5, atol=1e-6)
