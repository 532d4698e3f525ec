"""The shared frozen feature extractor (`uad_jax/networks/feature_extractor.py`)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from uad_jax.errors import ConfigError
from uad_jax.networks import feature_extractor as fe
from uad_jax.ops.resize import resize_bilinear


def _model(**overrides):
  m = ml_collections.ConfigDict(dict(
      backbone="resnet18", layers=("maxpool", "layer1", "layer2"), backbone_weights="",
      allow_random_backbone=True, backbone_precision="highest", normalize=True))
  m.update(overrides)
  return m


def test_backbone_input_grey_to_rgb_and_imagenet_normalisation():
  images = np.random.default_rng(0).uniform(size=(2, 8, 8, 1)).astype(np.float32)
  raw = fe.backbone_input(images, normalize=False)
  np.testing.assert_array_equal(raw, np.repeat(images, 3, axis=-1))
  norm = fe.backbone_input(images, normalize=True)
  np.testing.assert_allclose(norm, (np.repeat(images, 3, axis=-1) - fe.IMAGENET_MEAN)
                             / fe.IMAGENET_STD, rtol=1e-6, atol=1e-6)


def test_extract_taps_in_config_order_without_gradient():
  model = _model(layers=("layer2", "maxpool"))
  _, variables, info = fe.load_frozen_backbone(model, jax.random.key(0))
  assert info["random_weights"]
  images = np.random.default_rng(0).uniform(size=(1, 32, 32, 1)).astype(np.float32)
  taps = fe.extract(model, variables, images)
  assert [t.shape for t in taps] == [(1, 4, 4, 128), (1, 8, 8, 64)]
  grad = jax.grad(lambda x: sum(jnp.sum(t) for t in fe.extract(model, variables, x)))(images)
  assert not np.asarray(grad).any()


def test_random_backbone_refused_without_permission_and_bad_precision():
  with pytest.raises(ConfigError):
    fe.load_frozen_backbone(_model(allow_random_backbone=False), jax.random.key(0))
  with pytest.raises(ConfigError, match="backbone_precision"):
    fe.backbone_module(_model(backbone_precision="tf32"))


def test_resize_and_concat():
  rng = np.random.default_rng(0)
  taps = [rng.normal(size=(1, 8, 8, 2)).astype(np.float32),
          rng.normal(size=(1, 4, 4, 3)).astype(np.float32)]
  out = fe.resize_and_concat(taps, 8, 8, align_corners=True)
  assert out.shape == (1, 8, 8, 5)
  np.testing.assert_array_equal(out[..., :2], taps[0])
  np.testing.assert_array_equal(out[..., 2:], resize_bilinear(taps[1], 8, 8, align_corners=True))
