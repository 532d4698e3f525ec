"""Parity of FAE (feature extractor, feature autoencoder, anomaly maps, SSIM, resize) with the
PyTorch reference.

Every fixture of `$UAD_FIXTURES_DIR/fae/` is checked by its `kind`; sizes come from its config
and arrays, weights go through the users' converter (`uad_jax/convert/fae.py`). The op kinds
(SSIM, resize) are checked by `ops_checks.py`. Arrays in fixtures are NCHW; the port is NHWC.
"""

import jax
import ml_collections
import numpy as np
import pytest

import ops_checks
from configs import fae as fae_config
from reference_fixtures import load_area, run_check
from uad_jax.convert import fae as convert
from uad_jax.methods import fae
from uad_jax.networks import backbones, feature_extractor
from uad_jax.networks.feature_autoencoder import Encoder
from uad_jax.networks.resnet import ResNetConfig

FIXTURES = load_area("fae")
nhwc, nchw = ops_checks.nhwc, ops_checks.nchw


def fixture_config(meta: dict):
  """The paper config with the fixture's model/data values (backbone: the torchvision
  `ResNet(BasicBlock, layers)` it names, when it names one)."""
  config = fae_config.get_config()
  fixture = meta["config"]
  for key in ("channels", "featmap_size", "layers", "dropout", "normalize"):
    if key in fixture.get("model", {}):
      value = fixture["model"][key]
      config.model[key] = tuple(value) if isinstance(value, list) else value
  if "image_size" in fixture.get("data", {}):
    config.data.image_size = fixture["data"]["image_size"]
  if "backbone" in fixture:
    layers = tuple(fixture["backbone"]["layers"])
    model = config.model.to_dict()   # the typed field holds a name; a Backbone passes through
    model["backbone"] = backbones.Backbone(
        f"resnet_basic_{'_'.join(map(str, layers))}", ResNetConfig("basic", layers), "layer2", ())
    config.model = ml_collections.ConfigDict(model)
  return config


def _assert_outputs(fx, ours: dict):
  for name, *_ in fx.meta["outputs"]:
    if name not in ours:
      pytest.fail(f"{fx}: output {name!r} is not understood by this test")
    np.testing.assert_allclose(np.asarray(ours[name]), fx.outputs[name], err_msg=name,
                               **fx.tolerance)


def _autoencoder_outputs(config, ae_variables, feats) -> dict:
  model = fae.autoencoder(config)
  recon = jax.jit(lambda v, f: model.apply(v, f, train=False))(ae_variables, feats)
  encoder = Encoder(tuple(config.model.channels), config.model.dropout)
  latent = encoder.apply({k: v["enc"] for k, v in ae_variables.items()}, feats, False)
  return {"features": nchw(feats), "reconstruction": nchw(recon), "latent": nchw(latent)}


def check_feature_autoencoder(fx):
  """Given taps -> align_corners resize + concat -> autoencoder (eval mode)."""
  config = fixture_config(fx.meta)
  taps = [nhwc(fx.inputs[name]) for name, *_ in fx.meta["inputs"]]
  s = config.model.featmap_size
  feats = feature_extractor.resize_and_concat(taps, s, s, align_corners=True)
  assert feats.shape[-1] == fx.meta["config"]["ae_in_channels"]
  ae = convert.autoencoder_to_flax(fx.state_dict, fae.autoencoder(config), s, feats.shape[-1],
                                   source=fx.name)
  _assert_outputs(fx, _autoencoder_outputs(config, ae, feats))


def check_feature_reconstructor(fx):
  """Grey slice -> backbone taps -> F -> autoencoder, every weight from the checkpoint."""
  config = fixture_config(fx.meta)
  assert fae.feature_channels(config) == fx.meta["config"]["ae_in_channels"]
  backbone = convert.backbone_to_flax(fx.state_dict, fae.backbone_module(config), source=fx.name)
  ae = convert.autoencoder_to_flax(fx.state_dict, fae.autoencoder(config),
                                   config.model.featmap_size, fae.feature_channels(config),
                                   source=fx.name)
  (x,) = (nhwc(fx.inputs[name]) for name, *_ in fx.meta["inputs"])
  feats = jax.jit(lambda v, x: fae.features(config, v, x))(backbone, x)
  _assert_outputs(fx, _autoencoder_outputs(config, ae, feats))


def check_anomaly_map(fx):
  """Maps from given F and R: −SSIM_11 channel mean, align_corners resize, masking, + 1."""
  meta = fx.meta
  config = fae_config.get_config()
  config.model.score_window_size = meta["config"]["model"]["window_size"]
  image, feats, recon = (fx.inputs[name] for name, *_ in meta["inputs"])
  v, s = image.shape[:2]
  images = nhwc(image.reshape(v * s, *image.shape[2:]))   # slice order v * S + s
  feats, recon = nhwc(feats), nhwc(recon)
  neg = fae.neg_ssim_channel_mean(config, feats, recon)
  maps = np.asarray(fae.anomaly_maps(config, feats, recon, images))
  volume = np.moveaxis(maps.reshape(v, s, *maps.shape[1:]), 1, -1)[:, None]   # (V,1,H,W,S)
  _assert_outputs(fx, {"neg_ssim_channel_mean": np.asarray(neg)[:, None],
                       "anomaly_map": maps[:, None], "anomaly_volume": volume})


CHECKS = {
    "feature_autoencoder": check_feature_autoencoder,
    "feature_reconstructor": check_feature_reconstructor,
    "anomaly_map": check_anomaly_map,
    "ssim_train_loss": ops_checks.check_ssim_train_loss,
    "ssim_eval_map": ops_checks.check_ssim_eval_map,
    "resize_align_corners": ops_checks.check_resize_align_corners,
}


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx.name)
def test_reference_fixture(fx):
  run_check(fx, CHECKS)


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.meta.get("state_dict")],
                         ids=lambda fx: fx.name)
def test_converter_consumes_every_reference_key(fx):
  """Every `ae.*` tensor (and `extractor.backbone.*` one) lands in exactly one Flax variable."""
  config = fixture_config(fx.meta)
  channels = fx.meta["config"]["ae_in_channels"]
  ae = convert.autoencoder_to_flax(fx.state_dict, fae.autoencoder(config),
                                   config.model.featmap_size, channels, source=fx.name)
  keys = [k for k, _, _ in fx.meta["state_dict"]]
  ae_tensors = [k for k in keys if k.startswith(convert.AE_PREFIX)
                and not k.endswith("num_batches_tracked")]
  assert len(jax.tree.leaves(ae)) == len(ae_tensors)
  backbone_tensors = [k for k in keys if k.startswith(convert.BACKBONE_PREFIX)
                      and not k.endswith("num_batches_tracked")]
  if backbone_tensors:
    backbone = convert.backbone_to_flax(fx.state_dict, fae.backbone_module(config))
    assert len(jax.tree.leaves(backbone)) == len(backbone_tensors)
  # Transposed-conv kernels keep torch's (I, O) order: (k, k, I, O), no flip.
  key = next(k for k in keys if "decoder_tconv" in k)
  level = key.split(".")[2]
  kernel = ae["params"]["dec"][level][key.split(".")[3]]["kernel"]
  np.testing.assert_array_equal(kernel, fx.state_dict[key].transpose(2, 3, 0, 1))
