"""FAE beyond the fixtures: paper sizes, initialisation, train-mode pieces, the train step, the
anomaly map's rules, the converter's errors and reference import, configs, and the kernel
gradient of the shared ConvTranspose. (The run through the engine: test_methods_end_to_end.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from configs import fae as fae_config
from reference_fixtures import load_area
from test_fae_parity import fixture_config
from uad_jax.convert import fae as convert
from uad_jax.errors import ConfigError, DataError
from uad_jax.methods import contract, fae
from uad_jax.networks.feature_autoencoder import Encoder, FeatureAutoencoder
from uad_jax.ops import conv_transpose as ct


def _tiny():
  return fae_config.get_config("tiny")


def _images(n, size, seed=0):
  """Slices in [0, 1] with an exact-zero border (background)."""
  x = np.random.default_rng(seed).uniform(0.05, 1.0, (n, size, size, 1)).astype(np.float32)
  x[:, : size // 6] = 0.0
  return jnp.asarray(x)


@pytest.fixture(scope="module")
def tiny_state():
  return fae.init(_tiny(), jax.random.key(0), contract.TrainContext())


def test_paper_autoencoder_size_and_shapes():
  config = fae_config.get_config()
  assert fae.feature_channels(config) == 256
  variables = convert.autoencoder_variables_shape(fae.autoencoder(config), 56, 256)
  count = lambda tree: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
  assert count(variables["params"]) == 12_501_648     # spec §5
  assert count(variables["batch_stats"]) == 2_912
  assert len(jax.tree.leaves(variables)) == 42        # 50 ae.* keys minus 8 num_batches_tracked
  model = FeatureAutoencoder((100, 150, 200, 300))
  with pytest.raises(ConfigError, match="featmap_size"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 8), jnp.float32))


@pytest.mark.parametrize("size,latent", [(56, 3), (24, 1), (40, 2)])
def test_round_trip_sizes(size, latent):
  model = FeatureAutoencoder((4, 6, 8, 10))
  x = jax.ShapeDtypeStruct((2, size, size, 8), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  assert jax.eval_shape(model.apply, variables, x).shape == x.shape
  encoder = Encoder((4, 6, 8, 10), 0.0)
  z = jax.eval_shape(lambda v, x: encoder.apply(v, x, False),
                     {k: v["enc"] for k, v in variables.items()}, x)
  assert z.shape == (2, latent, latent, 10)


def test_torch_default_initialisation(tiny_state):
  flat = traverse_util.flatten_dict(tiny_state.params)
  for path, value in flat.items():
    v = np.asarray(value)
    if path[-1] == "scale":
      np.testing.assert_array_equal(v, 1.0)
    elif path[-1] == "bias":
      np.testing.assert_array_equal(v, 0.0)
    else:
      kh, kw, i, o = v.shape
      fan_in = kh * kw * (o if "tconv" in path[-2] else i)   # torch: transposed conv dim 1
      bound = 1.0 / np.sqrt(fan_in)
      assert np.abs(v).max() <= bound and np.abs(v).max() > 0.8 * bound, path
  for path, value in traverse_util.flatten_dict(tiny_state.batch_stats).items():
    np.testing.assert_array_equal(value, 0.0 if path[-1] == "mean" else 1.0)


def test_frozen_backbone_has_no_optimiser_state(tiny_state):
  size = lambda tree: sum(int(np.size(a)) for a in jax.tree.leaves(tree))
  # Adam's mu and nu over the autoencoder only (plus step counters).
  assert 0 <= size(tiny_state.opt_state) - 2 * size(tiny_state.params) < 4
  assert set(tiny_state.frozen) == {"params", "batch_stats"}
  assert tiny_state.ema_params is None


def test_dropout2d_zeroes_whole_channels_from_the_key(tiny_state):
  config = _tiny()
  # The tiny autoencoder's variables with a high dropout rate (dropout has no parameters).
  model = FeatureAutoencoder(tuple(config.model.channels), dropout=0.5)
  variables = {"params": tiny_state.params, "batch_stats": tiny_state.batch_stats}
  size, channels = config.model.featmap_size, fae.feature_channels(config)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, channels)), jnp.float32)

  @jax.jit
  def run(key):
    _, state = model.apply(variables, x, train=True, rngs={"dropout": key},
                           mutable=["batch_stats", "intermediates"], capture_intermediates=True)
    return state["intermediates"]["enc"]["encoder_layer_0"]["__call__"][0]

  a, b, c = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  zero = np.all(np.asarray(a) == 0, axis=(1, 2))           # (B, C): whole channels
  assert zero.any() and not zero.all()
  partly = np.any(np.asarray(a) == 0, axis=(1, 2)) & ~zero
  assert not partly.any()


def test_train_step_decreases_loss_and_keeps_the_backbone(tiny_state):
  config = _tiny()
  batch = {"image": _images(4, config.data.image_size)}
  step = jax.jit(lambda s, b, k: fae.train_step(config, s, b, k))
  state, losses = tiny_state, []
  for i in range(5):
    state, metrics = step(state, batch, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  assert int(state.step) == 5
  jax.tree.map(np.testing.assert_array_equal, state.frozen, tiny_state.frozen)
  # BatchNorm running statistics move in train mode.
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), state.batch_stats,
                       tiny_state.batch_stats)
  assert all(jax.tree.leaves(moved))
  feats = fae.features(config, state.frozen, batch["image"])
  assert feats.shape == (4, 24, 24, fae.feature_channels(config))
  assert 0.0 < float(fae.reconstruction_loss(config, feats, 0.5 * feats)) < 1.0
  np.testing.assert_allclose(fae.reconstruction_loss(config, feats, feats), 0.0, atol=1e-6)
  # Same key, same state -> same step.
  a, _ = step(tiny_state, batch, jax.random.key(3))
  b, _ = step(tiny_state, batch, jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)


def test_anomaly_map_rules(tiny_state):
  config = _tiny()
  images = _images(3, config.data.image_size)
  feats = fae.features(config, tiny_state.frozen, images)
  # R = F: SSIM 1 everywhere, so the map is 0 (up to rounding) inside the brain too.
  same = fae.anomaly_maps(config, feats, feats, images)
  assert same.shape == (3, 48, 48)
  np.testing.assert_allclose(same, 0.0, atol=1e-5)
  params = fae.scoring_params(config, {fae.STAGE: tiny_state}, {})
  maps = np.asarray(fae.score(config, params, images, None, None))
  background = np.asarray(images[..., 0]) == 0
  assert (maps[background] == 0).all() and (maps[~background] > 0).all()
  assert maps.max() <= 2.0
  # An all-zero slice scores all zero.
  empty = fae.score(config, params, jnp.zeros((1, 48, 48, 1)), None, None)
  assert not np.asarray(empty).any()


def test_configs():
  paper = fae_config.get_config()
  assert paper.eval.step == 4 * paper.training.snapshot_freq == paper.training.n_iters == 20_000
  assert (paper.model.loss_window_size, paper.model.score_window_size) == (5, 11)
  assert paper.model.normalize and not paper.model.allow_random_backbone
  t2w = fae_config.get_config("t2w")
  assert t2w.data.modality == "T2w" and t2w.eval.step == 8 * t2w.training.snapshot_freq
  demo = fae_config.get_config("demo")
  assert demo.data.train_lmdb.endswith("train_T1w") and demo.model.allow_random_backbone
  with pytest.raises(ValueError, match="unknown preset"):
    fae_config.get_config("big")


def test_paper_preset_refuses_without_weights_and_names_the_file():
  with pytest.raises(ConfigError, match="resnet18-f37072fd.pth"):
    fae.init(fae_config.get_config(), jax.random.key(0), contract.TrainContext())
  assert fae.warnings(fae_config.get_config()) == []
  assert any("RANDOM BACKBONE WEIGHTS" in w for w in fae.warnings(_tiny()))


@pytest.fixture(scope="module")
def reconstructor_fixture():
  return next(f for f in load_area("fae") if f.kind == "feature_reconstructor")


def test_converter_errors_name_the_key(reconstructor_fixture):
  fx = reconstructor_fixture
  config = fixture_config(fx.meta)
  args = (fae.autoencoder(config), config.model.featmap_size, fae.feature_channels(config))
  sd = dict(fx.state_dict)
  key = "ae.dec.decoder_conv_final.weight"
  with pytest.raises(DataError, match="lacks 1 autoencoder"):
    convert.autoencoder_to_flax({k: v for k, v in sd.items() if k != key}, *args)
  with pytest.raises(DataError, match=key.replace(".", r"\.")):
    convert.autoencoder_to_flax({**sd, key: sd[key][:, :3]}, *args)
  with pytest.raises(DataError, match="not a variable"):
    convert.autoencoder_to_flax({**sd, "ae.enc.extra.weight": sd[key]}, *args)
  with pytest.raises(DataError, match="no backbone weights"):
    convert.backbone_to_flax({k: v for k, v in sd.items() if k.startswith("ae.")},
                             fae.backbone_module(config))


def test_reference_states_from_a_checkpoint_folder(tmp_path, reconstructor_fixture):
  fx = reconstructor_fixture
  config = fixture_config(fx.meta)
  save_file({k: np.ascontiguousarray(v) for k, v in fx.state_dict.items()},
            str(tmp_path / "model.safetensors"))
  states, warnings = convert.reference_states(config, tmp_path, ema_from_model=False)
  assert warnings == [] and set(states) == {fae.STAGE}
  fields = states[fae.STAGE]
  assert set(fields) == {"params", "batch_stats", "frozen"}
  ae = convert.autoencoder_to_flax(fx.state_dict, fae.autoencoder(config),
                                   config.model.featmap_size, fae.feature_channels(config))
  jax.tree.map(np.testing.assert_array_equal, fields["params"], ae["params"])
  conv1 = fields["frozen"]["params"]["conv1"]["kernel"]
  np.testing.assert_array_equal(conv1, fx.state_dict["extractor.backbone.conv1.weight"]
                                .transpose(2, 3, 1, 0))


@pytest.mark.parametrize("kernel,strides,padding,output_padding", [
    ((6, 6), (2, 2), (2, 2), (0, 0)), ((7, 7), (2, 2), (2, 2), (0, 0)),
    ((2, 2), (2, 2), (0, 0), (0, 0)), ((3, 4), (2, 3), (1, 0), (1, 2)),
    ((3, 3), (1, 1), (1, 1), (0, 0))])
def test_conv_transpose_kernel_gradient_equals_autodiff(kernel, strides, padding, output_padding):
  """The hand-written kernel gradient of the shared ConvTranspose (FAE's decoder) = XLA's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 4, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(*kernel, 3, 4)), jnp.float32)
  args = (strides, padding, output_padding, "highest")
  y = ct.conv_transpose(x, k, *args)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  ours = jax.vjp(lambda x, k: ct.conv_transpose(x, k, *args), x, k)[1](g)
  dilated = ct._dilated_correlation   # pylint: disable=protected-access  (XLA's own gradient)
  xla = jax.vjp(lambda x, k: dilated(x, k, *args), x, k)[1](g)
  for a, b in zip(ours, xla):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
