"""UniAD's functions beyond the reference fixtures: mask, jitter, schedule, optimiser step, train
step, scoring, converter errors, checkpoint import, paper-preset refusal. Tiny shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import uniad as uniad_configs
from uad_jax.convert import uniad as convert
from uad_jax.engine import optim
from uad_jax.errors import ConfigError, DataError
from uad_jax.methods import contract, uniad
from uad_jax.networks.uniad_transformer import feature_jitter, neighbour_mask


@functools.lru_cache(maxsize=None)
def tiny_config():
  return uniad_configs.get_config("tiny")


@functools.lru_cache(maxsize=None)
def tiny_state():
  return uniad.init_state(tiny_config(), jax.random.key(0))


def toy_images(n=4, size=32, seed=1):
  """Brain-like slices: a bright disc with texture on an exact-zero background."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]
  disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
  images = rng.uniform(0.2, 1.0, (n, size, size)) * disc
  return jnp.asarray(images[..., None], jnp.float32)


def test_neighbour_mask_blocks_the_window_including_self():
  allowed = neighbour_mask(14, (7, 7))
  sums = allowed.sum(axis=1).reshape(14, 14)
  assert sums[0, 0] == sums[13, 13] == 180 and sums[7, 7] == 147
  assert not allowed.diagonal().any()
  np.testing.assert_array_equal(allowed, allowed.T)
  t = np.arange(196)
  h, w = t // 14, t % 14
  blocked = (np.abs(h[:, None] - h[None]) <= 3) & (np.abs(w[:, None] - w[None]) <= 3)
  np.testing.assert_array_equal(allowed, ~blocked)
  assert neighbour_mask(14, (7, 7)) is allowed   # built once per geometry


def test_jitter_noise_std_is_scale_over_channels():
  """(X_jit − X) / ‖X_t‖ has std 5 / C over many draws (spec §7.6), the clean X unchanged."""
  x = jax.random.normal(jax.random.key(0), (8, 196, 224)) * 3.0 + 1.0
  noise = jax.random.normal(jax.random.key(1), x.shape)
  jittered = feature_jitter(x, noise, 5.0)
  ratio = (jittered - x) / jnp.linalg.norm(x, axis=-1, keepdims=True)
  assert abs(float(jnp.std(ratio)) / (5.0 / 224) - 1.0) < 0.01


def test_jitter_noise_from_key_and_switches():
  config = tiny_config()
  a = uniad.jitter_noise(config, jax.random.key(3), (2, 36, 8))
  np.testing.assert_array_equal(a, uniad.jitter_noise(config, jax.random.key(3), (2, 36, 8)))
  assert not np.array_equal(a, uniad.jitter_noise(config, jax.random.key(4), (2, 36, 8)))
  off = uniad_configs.get_config("tiny")
  off.model.feature_jitter_prob = 0.0
  assert not np.any(uniad.jitter_noise(off, jax.random.key(3), (2, 36, 8)))
  off.model.feature_jitter = False
  assert uniad.jitter_noise(off, jax.random.key(3), (2, 36, 8)) is None


def test_step_lr_by_epoch():
  """lr at epochs 1, 9, 10, 19, 20 = 1e-4, 1e-4, 1e-5, 1e-5, 1e-6 (spec §7.7)."""
  steps_per_epoch = 7
  _, lr = optim.make_optimizer(uniad_configs.get_config().optim, steps_per_epoch)
  for epoch, expected in ((1, 1e-4), (9, 1e-4), (10, 1e-5), (19, 1e-5), (20, 1e-6)):
    for count in ((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch - 1):
      np.testing.assert_allclose(float(lr(count)), expected, rtol=1e-6)


def test_optimiser_step_is_torch_clip_then_adamw():
  """One update = torch clip_grad_norm_(0.1) then AdamW(lr 1e-4, wd 0.01), in numpy."""
  tx, _ = optim.make_optimizer(uniad_configs.get_config().optim, 10)
  rng = np.random.default_rng(0)
  params = {"a": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(5).astype(np.float32)}
  grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
  updates, _ = tx.update(grads, tx.init(params), params)
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values()))
  scale = min(1.0, 0.1 / (norm + 1e-6))
  for k, p in params.items():
    g = grads[k] * scale
    m_hat, v_hat = g, g * g   # first step: bias-corrected moments are g and g²
    expected = -1e-4 * (m_hat / (np.sqrt(v_hat) + 1e-8)) - 1e-4 * 0.01 * p
    np.testing.assert_allclose(np.asarray(updates[k]), expected, rtol=1e-4, atol=1e-10)


def test_state_layout_frozen_backbone_and_no_ema():
  config = uniad_configs.get_config("tiny")
  config.model.num_encoder_layers = config.model.num_decoder_layers = 2
  state = uniad.init_state(config, jax.random.key(0))
  assert state.ema_params is None
  assert set(state.frozen) == {"params", "batch_stats"}
  n_opt = sum(a.size for a in jax.tree.leaves(state.opt_state))
  n_params = sum(a.size for a in jax.tree.leaves(state.params))
  assert n_opt < 2 * n_params + 100   # Adam moments of the transformer only
  enc = [state.params[f"encoder_{l}"]["self_attn"]["query"]["kernel"] for l in range(2)]
  assert np.array_equal(enc[0], enc[1])   # reference deep-copy init
  # ... in separate buffers: the engine donates the state to its jitted step.
  jax.block_until_ready(jax.jit(lambda s: s, donate_argnums=0)(state))


def test_train_step_decreases_loss_and_keeps_backbone():
  config, state = tiny_config(), tiny_state()
  images = toy_images()
  step = jax.jit(functools.partial(uniad.train_step, config))
  losses = []
  new = state
  for i in range(6):
    new, metrics = step(new, {"image": images}, jax.random.key(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  assert int(new.step) == 6
  jax.tree.map(np.testing.assert_array_equal, new.frozen, state.frozen)


def test_loss_matches_numpy_and_dropout_only_in_training():
  config, state = tiny_config(), tiny_state()
  images = toy_images()
  feats = uniad.features(config, state.frozen, images)
  model = uniad.build_model(config)
  apply = lambda train, key: model.apply({"params": state.params}, feats, train=train,
                                         rngs={"dropout": key})
  np.testing.assert_array_equal(apply(False, jax.random.key(0)), apply(False, jax.random.key(1)))
  assert not np.array_equal(apply(True, jax.random.key(0)), apply(True, jax.random.key(1)))
  recon = np.asarray(apply(False, jax.random.key(0)), np.float64)
  expected = np.mean((recon - np.asarray(feats, np.float64)) ** 2)
  np.testing.assert_allclose(float(uniad.reconstruction_loss(feats, recon)), expected, rtol=1e-6)


def test_scoring_maps_are_l2_residuals_zero_on_background():
  config, state = tiny_config(), tiny_state()
  images = toy_images()
  params = uniad.scoring_params(config, {uniad.STAGE_NAME: state}, {})
  maps = np.asarray(jax.jit(functools.partial(uniad.score_slices, config))(
      params, images, jnp.ones(4, bool), jax.random.key(0)))
  assert maps.shape == images.shape[:3]
  assert np.all(maps[np.asarray(images[..., 0]) == 0] == 0)
  assert np.all(maps[np.asarray(images[..., 0]) > 0] > 0)
  # Slices are scored independently: batch composition does not matter.
  one = uniad.score_slices(config, params, images[1:2], None, None)
  np.testing.assert_allclose(np.asarray(one)[0], maps[1], rtol=1e-5, atol=1e-6)


def test_paper_preset_refuses_without_weights_and_demo_is_flagged():
  with pytest.raises(ConfigError, match="efficientnet_b4_rwightman-23ab8bcd.pth"):
    uniad.init_state(uniad_configs.get_config(), jax.random.key(0))
  assert uniad.warnings(uniad_configs.get_config()) == []
  assert "RANDOM" in uniad.warnings(tiny_config())[0]
  assert uniad.feature_channels(tiny_config()) == 64 + 128
  assert uniad.feature_channels(uniad_configs.get_config()) == 224


def _random_reference_state_dict(config, seed=0) -> dict:
  model = uniad.build_model(config)
  rng = np.random.default_rng(seed)
  table = convert.parameter_table(model, uniad.feature_channels(config))
  return {e.torch_name: rng.standard_normal(e.torch_shape).astype(np.float32) for e in table}


def test_converter_layouts_and_errors():
  config = tiny_config()
  model = uniad.build_model(config)
  channels = uniad.feature_channels(config)
  sd = _random_reference_state_dict(config)
  params = convert.torch_to_flax(sd, model, channels)
  e, heads = config.model.hidden_dim, config.model.nhead
  w = sd["transformer.encoder.layers.0.self_attn.in_proj_weight"]
  np.testing.assert_array_equal(params["encoder_0"]["self_attn"]["key"]["kernel"],
                                w[e:2 * e].T.reshape(e, heads, e // heads))
  out = sd["transformer.decoder.layers.0.multihead_attn.out_proj.weight"]
  np.testing.assert_array_equal(params["decoder_0"]["multihead_attn"]["out"]["kernel"],
                                out.T.reshape(heads, e // heads, e))
  # DDP prefix, the step buffer and the backbone are skipped.
  wrapped = {"module." + k: v for k, v in sd.items()}
  wrapped.update({"module.step": np.ones(1, np.float32),
                  "module.extractor.features.0.0.weight": np.ones((48, 3, 3, 3), np.float32)})
  jax.tree.map(np.testing.assert_array_equal, convert.torch_to_flax(wrapped, model, channels),
               params)
  missing = dict(sd)
  del missing["input_proj.bias"]
  with pytest.raises(DataError, match="missing 'input_proj.bias'"):
    convert.torch_to_flax(missing, model, channels)
  with pytest.raises(DataError, match="output_proj.weight.*shape"):
    convert.torch_to_flax({**sd, "output_proj.weight": np.zeros((3, 3), np.float32)}, model,
                          channels)
  with pytest.raises(DataError, match="unexpected keys.*transformer.encoder.layers.9"):
    convert.torch_to_flax({**sd, "transformer.encoder.layers.9.norm1.weight": np.zeros(1)},
                          model, channels)


def test_reference_states_reads_an_accelerate_folder(tmp_path):
  config = tiny_config()
  sd = _random_reference_state_dict(config, seed=1)
  save_file({**sd, "step": np.array([25000.0], np.float32)}, str(tmp_path / "model.safetensors"))
  fields, warnings = convert.reference_states(config, tmp_path, ema_from_model=False)
  assert warnings == [] and set(fields) == {uniad.STAGE_NAME}
  expected = convert.torch_to_flax(sd, uniad.build_model(config), uniad.feature_channels(config))
  jax.tree.map(np.testing.assert_array_equal, fields[uniad.STAGE_NAME]["params"], expected)
  # The converted tree replaces the params of a fresh state (what import_torch does).
  state = uniad.init_state(config, jax.random.key(0), contract.TrainContext())
  assert (jax.tree.map(np.shape, state.params)
          == jax.tree.map(np.shape, fields[uniad.STAGE_NAME]["params"]))
