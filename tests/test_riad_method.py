"""RIAD's functions beyond the reference fixtures: masks, batch transform, losses, train step,
scoring determinism and background, the per-epoch learning rate, checkpoint import. Tiny shapes
(32²)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import riad as riad_configs
from reference_fixtures import load_area
from uad_jax.convert import riad as convert
from uad_jax.engine import evaluate
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.methods.riad import masks as riad_masks
from uad_jax.methods.riad import method as riad
from uad_jax.tools import import_torch


@pytest.fixture(scope="module")
def config():
  return riad_configs.get_config("tiny")


def toy_slices(count: int, size: int, seed: int = 0) -> np.ndarray:
  """(count, size, size, 1) float32: a bright disc with smooth texture on a zero background."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size - 0.5
  disc = (xx ** 2 + yy ** 2 < 0.16).astype(np.float32)
  texture = 0.6 + 0.2 * np.sin(8 * xx[None] + rng.uniform(0, 6, (count, 1, 1)))
  return (disc * texture)[..., None].astype(np.float32)


@pytest.mark.parametrize("k, sizes", [(8, (157, 157, 157, 157, 156)), (16, (40, 40, 40, 40, 36)),
                                      (28, (13, 13, 13, 13, 12)), (32, (10, 10, 10, 10, 9))])
def test_masks_partition_with_the_reference_subset_sizes(k, sizes):
  perm = np.random.default_rng(k).permutation((224 // k) ** 2)
  masks = riad_masks.partition_masks(perm, 224, k, 5)
  assert masks.shape == (5, 224, 224) and masks.dtype == np.float32
  np.testing.assert_array_equal((1 - masks).sum(0), 1.0)
  assert tuple(int(s) for s in (1 - masks).sum((1, 2)) / k ** 2) == sizes
  # Host (numpy) and device (jax.numpy) masks of one permutation are identical.
  np.testing.assert_array_equal(riad_masks.partition_masks(jnp.asarray(perm), 224, k, 5,
                                                           xp=jnp), masks)


def test_a_subset_of_dummies_only_hides_nothing():
  masks = riad_masks.partition_masks(np.array([2, 0, 3, 1]), 32, 16, 5)
  np.testing.assert_array_equal(masks[4], 1.0)
  np.testing.assert_array_equal((1 - masks).sum(0), 1.0)


def test_cell_size_must_divide_the_image():
  with pytest.raises(ConfigError, match="does not divide"):
    riad_masks.cells_per_side(96, 7)


def test_key_masks_are_deterministic_partitions():
  a = riad_masks.key_masks(jax.random.key(1), 32, (8, 16), 3)
  assert a.shape == (2, 3, 32, 32)
  np.testing.assert_array_equal(a, riad_masks.key_masks(jax.random.key(1), 32, (8, 16), 3))
  assert not np.array_equal(a, riad_masks.key_masks(jax.random.key(2), 32, (8, 16), 3))
  np.testing.assert_array_equal((1 - a).sum(1), 1.0)


def test_batch_transform_one_cell_size_per_batch(config):
  transform = riad.batch_transform(config, {})
  batch = {"image": toy_slices(4, 32)}
  out = transform(batch, np.random.default_rng(3))
  assert out["masks"].shape == (4, config.training.n, 32, 32) and out["masks"].dtype == np.uint8
  assert set(out["cell_size"]) <= set(config.training.k) and len(set(out["cell_size"])) == 1
  np.testing.assert_array_equal(out["masks"], out["masks"][:1].repeat(4, 0))
  np.testing.assert_array_equal((1 - out["masks"][0].astype(int)).sum(0), 1)
  again = transform(batch, np.random.default_rng(3))
  np.testing.assert_array_equal(out["masks"], again["masks"])
  drawn = {int(transform(batch, np.random.default_rng(s))["cell_size"][0]) for s in range(20)}
  assert drawn == set(config.training.k)


def test_stitching_takes_each_pixel_from_the_pass_that_hid_it():
  images = jnp.asarray(toy_slices(2, 32))
  visible = riad_masks.key_masks(jax.random.key(0), 32, (8,), 5)[0][:, None, :, :, None]
  # A network that ignores its input and outputs the pass index: recon = index of the hiding pass.
  recon = riad.stitched_reconstruction(
      lambda z, i: jnp.full_like(z, i.astype(jnp.float32)), images, visible)
  hidden_by = np.argmin(np.asarray(visible[:, 0, ..., 0]), axis=0)
  np.testing.assert_array_equal(recon[..., 0], np.broadcast_to(hidden_by, (2, 32, 32)))


def test_losses_against_numpy(config):
  rng = np.random.default_rng(0)
  u = rng.uniform(size=(2, 32, 32, 1)).astype(np.float32)
  v = np.clip(u + 0.1 * rng.normal(size=u.shape), 0, 1).astype(np.float32)
  terms = riad.reconstruction_losses(jnp.asarray(u), jnp.asarray(v))
  np.testing.assert_allclose(terms["l2"], np.mean((u.astype(np.float64) - v) ** 2), rtol=1e-5)

  def gms(a, b):  # valid Prewitt magnitude similarity, float64
    def mag(x):
      win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
      gx = (win[..., :, 2] - win[..., :, 0]).sum(-1) / 3
      gy = (win[..., 0, :] - win[..., 2, :]).sum(-1) / 3
      return np.sqrt(gx ** 2 + gy ** 2 + 1e-12)
    ga, gb = mag(a), mag(b)
    return (2 * ga * gb + 0.0026) / (ga ** 2 + gb ** 2 + 0.0026)

  def pool(x):
    return x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2).mean((2, 4))

  a, b, msgms = u[..., 0].astype(np.float64), v[..., 0].astype(np.float64), []
  for s in range(4):
    msgms.append(np.mean(1 - gms(a, b)))
    a, b = pool(a), pool(b)
  np.testing.assert_allclose(terms["msgms"], np.mean(msgms), rtol=1e-5)
  assert 0 < float(terms["ssim"]) < 1
  expected = (config.training.gamma * terms["l2"] + config.training.alpha * terms["msgms"]
              + config.training.beta * terms["ssim"])
  np.testing.assert_allclose(riad.total_loss(config, terms), expected, rtol=1e-7)


def test_train_step_decreases_the_loss(config):
  cfg = config.copy_and_resolve_references()
  cfg.optim.lr = 2e-3
  state = riad.init(cfg, jax.random.key(0), contract.TrainContext(steps_per_epoch=10))
  batch = riad.batch_transform(cfg, {})({"image": toy_slices(4, 32)}, np.random.default_rng(0))
  batch = jax.tree.map(jnp.asarray, batch)
  step = jax.jit(lambda s, b, r: riad.train_step(cfg, s, b, r))
  losses = []
  for i in range(4):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert int(state.step) == 4 and state.ema_params is None
  assert float(metrics["cell_size"]) in cfg.training.k
  assert losses[-1] < losses[0], losses
  previews = riad.preview(cfg, state, batch, jax.random.key(0))
  assert {k: v.shape for k, v in previews.items()} == {
      t: (1, 32, 32) for t in ("input", "masked_input", "reconstruction")}


def test_score_background_zero_and_key_determinism(config):
  state = riad.init(config, jax.random.key(0), contract.TrainContext())
  # Non-zero head so that reconstructions differ from 0.
  params = jax.tree.map(lambda p: p + 0.01, state.params)
  images = jnp.asarray(toy_slices(3, 32))
  valid = jnp.array([True, True, False])
  score = jax.jit(lambda p, im, v, r: riad.score(config, p, im, v, r))
  maps = np.asarray(score(params, images, valid, jax.random.key(1)))
  assert maps.shape == (3, 32, 32) and maps.dtype == np.float32
  assert np.all(maps[:2][np.asarray(images[:2, ..., 0]) == 0] == 0) and maps[:2].min() == 0
  assert maps[:2].max() > 0 and np.all(maps[2] == 0)
  np.testing.assert_array_equal(maps, score(params, images, valid, jax.random.key(1)))
  assert not np.array_equal(maps, score(params, images, valid, jax.random.key(2)))
  assert riad.METHOD.network_evaluations(config) == len(config.eval.k) * config.eval.n


def test_learning_rate_steps_once_per_epoch(config):
  assert (config.optim.schedule, config.optim.lr) == ("step_epochs", 5e-6)  # the paper's
  state = riad.init(config, jax.random.key(0), contract.TrainContext(steps_per_epoch=3))
  steps = np.arange(1, 61)                     # epochs 1..20 of 3 steps
  expected = 5e-6 * 0.1 ** (((steps - 1) // 3 + 1) // 7)
  np.testing.assert_allclose(jax.jit(state.learning_rate)(steps), expected, rtol=1e-6)


def test_import_torch_checkpoint(tmp_path):
  """A reference checkpoint folder (model.safetensors, folder checkpoint_<k>) imports through
  `import_torch` with the step k·snapshot_freq and scores with exactly the converted weights."""
  fx = next(f for f in load_area("riad") if f.kind == "ddpmpp_forward")
  config = riad_configs.get_config()
  for section, values in fx.meta["config"].items():
    for key, value in values.items() if section in config else ():
      config[section][key] = tuple(value) if isinstance(value, list) else value
  src = tmp_path / "checkpoint_20"
  src.mkdir()
  save_file({f"module.{k}": v for k, v in fx.state_dict.items()}, str(src / "model.safetensors"))
  import_torch.import_checkpoint("riad", src, tmp_path / "run", config)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  states, step, _, _ = evaluate.restore_states(config, riad.METHOD, tmp_path / "run", None, mesh)
  assert step == 100_000 == 20 * config.training.snapshot_freq
  expected = convert.torch_to_flax(fx.state_dict, config)
  jax.tree.map(np.testing.assert_array_equal, riad.scoring_params(config, states, {}), expected)
