"""Parity of RIAD (network, masks, losses, scoring loop) with the PyTorch reference.

Every fixture of `$UAD_FIXTURES_DIR/riad/` is checked by its `kind`; sizes come from its config
and arrays. Arrays in fixtures are NCHW; the port is NHWC. Weights go through the converter that
`import_torch` runs (`uad_jax/convert/riad.py`).
"""

import re

import jax
import numpy as np
import pytest

import ops_checks
from configs import riad as riad_configs
from reference_fixtures import load_area, run_check
from uad_jax.convert import ddpmpp as ddpmpp_convert
from uad_jax.convert import riad as convert
from uad_jax.methods.riad import masks as riad_masks
from uad_jax.methods.riad import method as riad

FIXTURES = load_area("riad")


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -3, -1)


def nchw(a) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -1, -3)


def fixture_config(fx):
  """The paper config with the fixture's `config` sections applied (extra keys ignored)."""
  c = riad_configs.get_config()
  for section, values in fx.meta["config"].items():
    if section in c and isinstance(values, dict):
      for key, value in values.items():
        c[section][key] = tuple(value) if isinstance(value, list) else value
  return c


def model_and_params(fx):
  config = fixture_config(fx)
  return config, riad.build_model(config), convert.torch_to_flax(fx.state_dict, config, fx.name)


def outputs_by_meaning(fx):
  return [(name, meaning) for name, _, _, meaning in fx.meta["outputs"]]


def check_ddpmpp_forward(fx):
  _, model, params = model_and_params(fx)
  (x,) = (fx.inputs[name] for name, *_ in fx.meta["inputs"])
  y, state = jax.jit(lambda p, x: model.apply(
      {"params": p}, x, None, capture_intermediates=True, mutable=["intermediates"]))(
          params, nhwc(x))
  inter, plan = state["intermediates"], model.plan()
  for name, meaning in outputs_by_meaning(fx):
    if meaning.startswith("network output"):
      ours = y
    elif match := re.search(r"all_modules\.(\d+)", meaning):
      ours = inter[plan[int(match.group(1))].name]["__call__"][0]
    else:
      pytest.fail(f"{fx}: output {name!r} ({meaning}) is not understood by this test")
    np.testing.assert_allclose(nchw(ours), fx.outputs[name], err_msg=name, **fx.tolerance)


def fixture_perms(fx):
  """The injected permutation draws in their recorded order."""
  return [fx.inputs[name] for name, *_ in fx.meta["inputs"] if name.startswith("perm")]


def check_gen_mask(fx):
  cfg = fx.meta["config"]["masks"]
  size, ks, n = cfg["im_size"], cfg["k"], cfg["n"]
  perms = fixture_perms(fx)
  assert [len(p) for p in perms] == [(size // k) ** 2 for k in ks], "one draw per k, in order"
  ours = np.concatenate([riad_masks.partition_masks(p, size, k, n) for p, k in zip(perms, ks)])
  ((name, _),) = outputs_by_meaning(fx)
  np.testing.assert_array_equal(ours, fx.outputs[name])
  # The masks of a cell size partition the image: each pixel is hidden exactly once.
  np.testing.assert_array_equal((1 - ours).reshape(len(ks), n, size, size).sum(1), 1)


def fixture_score_masks(fx, config):
  """The fixture's masks of one chunk as (len(eval.k), n, S, S)."""
  size, ks = config.data.image_size, config.eval.k
  perms = fixture_perms(fx)
  if len(perms) != len(ks):
    pytest.fail(f"{fx}: {len(perms)} permutation draws for {len(ks)} cell sizes: this test "
                "handles one chunk (the whole volume)")
  return np.stack([riad_masks.partition_masks(p, size, k, config.eval.n)
                   for p, k in zip(perms, ks)])


def check_riad_score(fx):
  config, _, params = model_and_params(fx)
  images = nhwc(fx.inputs["image"])
  masks = fixture_score_masks(fx, config)
  score = jax.jit(lambda p, im, v, m: riad.score_with_masks(config, p, im, v, m,
                                                            keep_per_k=True))
  maps, per_k = score(params, images, np.ones(len(images), bool), masks)
  ks = list(config.eval.k)
  for name, meaning in outputs_by_meaning(fx):
    k_match = re.search(r"(?:k=|_k)(\d+)", meaning)  # "k=4", "recon_k4"
    if meaning.startswith("per-chunk"):
      ours = np.asarray(maps)[:, None]
    elif meaning.startswith("stitched reconstruction") and k_match:
      ours = nchw(per_k["recon"][ks.index(int(k_match.group(1)))])
    elif meaning.startswith("MSGMS_Score") and k_match:
      ours = np.asarray(per_k["msgms"][ks.index(int(k_match.group(1)))])[:, None]
    else:
      pytest.fail(f"{fx}: output {name!r} ({meaning}) is not understood by this test")
    np.testing.assert_allclose(ours, fx.outputs[name], err_msg=name, **fx.tolerance)

  # Padding rows the engine adds to fill a chunk (valid False) change nothing: a NaN row would
  # turn the chunk minimum into NaN if it were included (to float32 rounding: another batch size
  # may sum the convolutions in another order).
  padding = np.stack([np.zeros_like(images[0]), np.full_like(images[0], np.nan)])
  padded = np.concatenate([images, padding])
  valid = np.arange(len(padded)) < len(images)
  padded_maps, _ = score(params, padded, valid, masks)
  np.testing.assert_allclose(np.asarray(padded_maps)[:len(images)], maps, **fx.tolerance)
  np.testing.assert_array_equal(np.asarray(padded_maps)[len(images):], 0.0)


CHECKS = {
    "ddpmpp_forward": check_ddpmpp_forward,
    "gen_mask": check_gen_mask,
    "gms_ssim": ops_checks.check_gms_ssim,
    "riad_score": check_riad_score,
}


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx.name)
def test_reference_fixture(fx):
  run_check(fx, CHECKS)


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.meta.get("state_dict")],
                         ids=lambda fx: fx.name)
def test_parameter_order_matches_reference(fx):
  """The converter's parameter table = the reference state_dict order; the mapping inverts."""
  _, model, params = model_and_params(fx)
  reference_order = [k for k, _, _ in fx.meta["state_dict"] if k != "step"]
  assert ddpmpp_convert.named_parameters(model) == reference_order
  back = ddpmpp_convert.flax_to_torch(params, model)
  for k in reference_order:
    np.testing.assert_array_equal(back[k], fx.state_dict[k])
