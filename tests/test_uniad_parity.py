"""Parity of UniAD's feature alignment, transformer, jitter, loss and anomaly map with the
PyTorch reference.

Every fixture of `$UAD_FIXTURES_DIR/uniad/` is checked by its `kind`; sizes come from its config
and arrays, weights go through the users' converter (`uad_jax/convert/uniad.py`). Fixture arrays
are NCHW and tokens sequence-first (T, B, ·); the port is NHWC and batch-first.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference_fixtures import load_area, run_check
from uniad_config import fixture_config
from uad_jax.convert import uniad as convert
from uad_jax.methods import uniad
from uad_jax.networks.uniad_transformer import neighbour_mask

FIXTURES = load_area("uniad")


def nhwc(a) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -3, -1)


def nchw(a) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -1, -3)


def batch_first(a) -> np.ndarray:
  """(T, B, C) sequence-first -> (B, T, C)."""
  return np.swapaxes(np.asarray(a), 0, 1)


def assert_close(fx, name, ours, expected):
  np.testing.assert_allclose(np.asarray(ours), expected, err_msg=f"{fx!r} output {name}",
                             **fx.tolerance)


def split_inputs(fx) -> tuple[list[np.ndarray], np.ndarray | None]:
  """(backbone taps NHWC in tap order, jitter noise (B, T, C) or None) from the inputs list."""
  taps, noise = [], None
  for name, shape, _, _ in fx.meta["inputs"]:
    if len(shape) == 4:
      taps.append(nhwc(fx.inputs[name]))
    elif len(shape) == 3 and noise is None:
      noise = batch_first(fx.inputs[name])
    else:
      pytest.fail(f"{fx}: input {name!r} {shape} is not understood by this test")
  assert len(taps) == len(fx.meta["config"]["model"]["layers"]), "one input per backbone tap"
  return taps, noise


def converted_model(fx):
  config = fixture_config(fx.meta["config"])
  model = uniad.build_model(config)
  channels = fx.meta["config"]["feature_channels"]
  params = convert.torch_to_flax(fx.state_dict, model, channels, fx.name)
  return config, model, params


def check_transformer(fx, train: bool):
  """Eval mode (kind 'transformer') or train mode with given jitter noise and dropout 0."""
  config, model, params = converted_model(fx)
  taps, noise = split_inputs(fx)
  if train and noise is None:
    pytest.fail(f"{fx}: a train-mode fixture without a jitter noise input")
  features = uniad.align_taps(config, taps)
  recon, inter = jax.jit(lambda p, f, n: model.apply(
      {"params": p}, f, n, train=train, return_intermediates=True,
      rngs={"dropout": jax.random.key(0)}))(params, features, noise)
  fs = config.model.feature_size
  for name, shape, _, meaning in fx.meta["outputs"]:
    expected = fx.outputs[name]
    if name == "features":
      assert_close(fx, name, nchw(features), expected)
    elif name == "reconstruction":
      assert_close(fx, name, nchw(recon), expected)
    elif name in ("encoder_memory", "decoder_output", "jittered_tokens"):
      assert_close(fx, name, np.swapaxes(np.asarray(inter[name]), 0, 1), expected)
    elif name == "pos_embed":
      np.testing.assert_array_equal(np.asarray(inter[name]), expected, err_msg=name)
    elif name == "attn_mask":
      blocked = np.isneginf(expected)
      assert np.all(expected[~blocked] == 0.0), "the reference mask is 0 or -inf"
      allowed = neighbour_mask(fs, tuple(config.model.neighbor_size))
      np.testing.assert_array_equal(allowed, ~blocked, err_msg=name)
    elif name == "loss":
      assert_close(fx, name, uniad.reconstruction_loss(features, recon), expected)
    else:
      pytest.fail(f"{fx}: output {name!r} {shape} ({meaning}) is not understood by this test")


def check_anomaly_map(fx):
  """Scoring from given F, R: L2 map, align_corners upsampling, background zeroing."""
  images = np.asarray(fx.inputs["image"])
  images = nhwc(images.reshape((-1,) + images.shape[-3:]))   # (S, H, W, 1)
  features, recon = (nhwc(fx.inputs[name]) for name, shape, _, _ in fx.meta["inputs"]
                     if len(shape) == 4)
  maps = np.asarray(uniad.anomaly_maps(features, recon, images))   # (S, H, W)
  for name, shape, _, meaning in fx.meta["outputs"]:
    expected = fx.outputs[name]
    if name == "l2_map":
      assert_close(fx, name, nchw(uniad.residual_norm(features, recon)), expected)
    elif name == "anomaly_map":
      assert_close(fx, name, maps[:, None], expected)
    elif name == "anomaly_volume":   # (1, 1, H, W, S): slices stacked last, as evaluated
      assert_close(fx, name, np.moveaxis(maps, 0, -1).reshape(expected.shape), expected)
    else:
      pytest.fail(f"{fx}: output {name!r} {shape} ({meaning}) is not understood by this test")


CHECKS = {
    "transformer": lambda fx: check_transformer(fx, train=False),
    "transformer_train_jitter": lambda fx: check_transformer(fx, train=True),
    "anomaly_map": check_anomaly_map,
}


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx.name)
def test_reference_fixture(fx):
  run_check(fx, CHECKS)


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.meta.get("state_dict")],
                         ids=lambda fx: fx.name)
def test_converter_covers_the_reference_state_dict(fx):
  """The converter's table = the reference's trainable keys (+ `step`), shapes included, and
  the converted tree = the model's own parameter tree."""
  config, model, params = converted_model(fx)
  table = {e.torch_name: e.torch_shape
           for e in convert.parameter_table(model, fx.meta["config"]["feature_channels"])}
  recorded = {k: tuple(s) for k, s, _ in fx.meta["state_dict"] if k != "step"}
  assert table == recorded
  fs = config.model.feature_size
  probe = jnp.zeros((1, fs, fs, fx.meta["config"]["feature_channels"]))
  expected = jax.eval_shape(model.init, jax.random.key(0), probe)["params"]
  assert (jax.tree.map(lambda a: a.shape, params)
          == jax.tree.map(lambda a: a.shape, expected))
