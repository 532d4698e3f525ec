"""Parity of IterMask (BatchNorm U-Net, condition, masks, scoring loop) with the PyTorch reference.

Every fixture of `$UAD_FIXTURES_DIR/itermask/` is checked by its `kind`; sizes come from its
config and arrays. Arrays in fixtures are NCHW; the port is NHWC. Weights go through the users'
converter (`uad_jax/convert/itermask.py`).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import itermask as itermask_configs
from reference_fixtures import load_area, run_check
from uad_jax.convert import ddpmpp as convert
from uad_jax.convert import itermask as itermask_convert
from uad_jax.methods.itermask import masks, method
from uad_jax.methods.itermask.condition import high_frequency_condition

FIXTURES = load_area("itermask")
BN_BUFFER = re.compile(r"\.(running_mean|running_var|num_batches_tracked)$")


def nhwc(a) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -3, -1)


def nchw(a) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -1, -3)


def fixture_config(fx):
  """The paper config with the fixture's `config` sections (model, data) applied."""
  c = itermask_configs.get_config()
  for section, values in fx.meta["config"].items():
    if section in ("model", "data") and isinstance(values, dict):
      for key, value in values.items():
        c[section][key] = tuple(value) if isinstance(value, list) else value
  return c


def stage_of(channels: int) -> str:
  return {1: "first", 2: "ae"}[channels]


def network(fx, state_dict, channels):
  """(model, variables) of one fixture network, converted as users convert checkpoints."""
  config = fixture_config(fx)
  model = method.build_model(config, stage_of(channels))
  return model, itermask_convert.variables_from_torch(state_dict, model, source=fx.name)


def output_meanings(fx) -> dict:
  return {name: meaning for name, _, _, meaning in fx.meta["outputs"]}


def check_unet_forward(fx, train: bool):
  x = next(iter(fx.inputs.values()))
  model, variables = network(fx, fx.state_dict, x.shape[1])
  y, state = jax.jit(lambda v, x: model.apply(
      v, x, None, train=train, capture_intermediates=True,
      mutable=["intermediates", "batch_stats"]))(variables, nhwc(x))
  inter = state["intermediates"]
  plan = model.plan()
  stats = {e.torch_name: e.flax_path for e in convert.batch_stats_table(model)}
  for name, meaning in output_meanings(fx).items():
    ref = fx.outputs[name]
    if meaning.startswith("network output"):
      ours = nchw(y)
    elif name.startswith("buffer_after/"):
      key = name[len("buffer_after/"):]
      if key.endswith("num_batches_tracked"):
        # The counter has no effect on values and is not kept (converter drops it); check that
        # the fixture's update is the one we assume: +1 per train-mode forward.
        assert int(ref) == int(fx.state_dict[key]) + 1, name
        continue
      assert train, f"{fx}: buffer output {name!r} in an eval-mode fixture"
      node = state["batch_stats"]
      for part in stats[key]:
        node = node[part]
      ours = node
    elif match := re.search(r"all_modules\.(\d+)", meaning):
      ours = nchw(inter[plan[int(match.group(1))].name]["__call__"][0])
    else:
      pytest.fail(f"{fx}: output {name!r} ({meaning}) is not understood by this test")
    np.testing.assert_allclose(ours, ref, err_msg=name, **fx.tolerance)


def check_condition(fx):
  config = itermask_configs.get_config()
  assert len(fx.inputs) == len(fx.outputs)
  for (name_in, x), (name_out, ref) in zip(fx.inputs.items(), fx.outputs.items()):
    ours = jax.jit(lambda x: high_frequency_condition(x, config.condition.radius))(nhwc(x))
    np.testing.assert_allclose(nchw(ours), ref, err_msg=f"{name_in} -> {name_out}",
                               **fx.tolerance)


def check_gen_mask(fx):
  """The deterministic core with the reference's draws injected: squares from the row/column
  brain-pixel indices and the counts (n4, n8, n16) -> the keep map, bit-exact."""
  brain = fx.inputs["brain"] > 0
  (name,) = fx.outputs
  assert brain.shape[0] == len({k.split("_")[0] for k in fx.inputs if k != "brain"})
  for s in range(brain.shape[0]):
    rows, cols = np.nonzero(brain[s])
    counts = tuple(int(n) for n in fx.inputs[f"s{s}_np_randint"][1:])
    keep = masks.keep_map(brain.shape[1:], rows[fx.inputs[f"s{s}_choice_rows"]],
                          cols[fx.inputs[f"s{s}_choice_cols"]], counts, masks.square_sides(1.0))
    np.testing.assert_array_equal(keep, fx.outputs[name][s], err_msg=f"slice {s}")


def check_iterative_inference(fx):
  config = fixture_config(fx)
  state_dicts = {p: {k[len(p) + 1:]: v for k, v in fx.state_dict.items() if k.startswith(p + ".")}
                 for p in ("first", "ae")}
  params = {}
  for stage, sd in state_dicts.items():
    model = method.build_model(config, stage)
    params[stage] = itermask_convert.variables_from_torch(sd, model, source=f"{fx.name}:{stage}")
  params["validation_thr"] = np.float32(fx.meta["config"]["eval"]["validation_thr"])
  images = nhwc(fx.inputs["image"])
  noise_names = sorted(k for k in fx.inputs if k.startswith("noise_"))
  noise = jnp.stack([nhwc(fx.inputs[k]) for k in noise_names])
  in_names = sorted(k for k in fx.outputs if k.startswith("ae_input_"))
  out_names = sorted(k for k in fx.outputs if k.startswith("ae_output_"))
  passes = len(noise_names)
  assert len(in_names) == len(out_names) == passes

  def run(p, images, noise):
    valid = jnp.ones(images.shape[:1], bool)
    return method.score_chunk(config, p, images, valid,
                              lambda j: noise[jnp.minimum(j, noise.shape[0] - 1)], trace=passes)

  out = jax.jit(run)(params, images, noise)
  assert int(out["passes"]) == passes, "AE passes (the reference made one per noise draw)"
  x = 6.0 * images - 3.0   # the reference's X (numpy rounds like torch: no fused multiply-add)
  for j in range(passes):
    ref_in = nhwc(fx.outputs[in_names[j]])
    # The reference's mask (= where its input is not X) must match ours exactly.
    np.testing.assert_array_equal(np.asarray(out["trace_masks"][j]) > 0,
                                  ref_in[..., 0] != x[..., 0], err_msg=f"mask of {in_names[j]}")
    np.testing.assert_allclose(out["trace_inputs"][j], ref_in, err_msg=in_names[j],
                               **fx.tolerance)
    np.testing.assert_allclose(out["trace_outputs"][j], nhwc(fx.outputs[out_names[j]]),
                               err_msg=out_names[j], **fx.tolerance)
  np.testing.assert_allclose(out["first_output"], nhwc(fx.outputs["first_output"]),
                             **fx.tolerance)
  np.testing.assert_allclose(np.asarray(out["maps"])[:, None], fx.outputs["anomaly_map"],
                             err_msg="anomaly_map", **fx.tolerance)


CHECKS = {
    "condition": check_condition,
    "gen_mask": check_gen_mask,
    "unet_first_forward": lambda fx: check_unet_forward(fx, train=False),
    "unet_ae_forward": lambda fx: check_unet_forward(fx, train=False),
    "unet_first_forward_trainmode": lambda fx: check_unet_forward(fx, train=True),
    "iterative_inference": check_iterative_inference,
}


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx.name)
def test_reference_fixture(fx):
  run_check(fx, CHECKS)


def networks_of(fx):
  """(prefix, state_dict) of every network in a fixture's state_dict (keys 'ae.'/'first.' for
  fixtures with two networks)."""
  prefixes = sorted({k.split(".")[0] for k in fx.state_dict if k.split(".")[0] in ("ae", "first")})
  if not prefixes:
    return [("", fx.state_dict)]
  return [(p, {k[len(p) + 1:]: v for k, v in fx.state_dict.items() if k.startswith(p + ".")})
          for p in prefixes]


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.meta.get("state_dict")],
                         ids=lambda fx: fx.name)
def test_parameter_order_matches_reference(fx):
  """named_parameters order and BN buffer order built from the architecture = the reference's;
  the EMA shadow list converts like the named weights; params round-trip."""
  config = fixture_config(fx)
  for prefix, sd in networks_of(fx):
    channels = sd["all_modules.0.weight"].shape[1]
    model = method.build_model(config, stage_of(channels))
    reference_params = [k for k in sd if k != "step" and not BN_BUFFER.search(k)]
    assert convert.named_parameters(model) == reference_params, prefix
    reference_stats = [k for k in sd if k.endswith(("running_mean", "running_var"))]
    assert [e.torch_name for e in convert.batch_stats_table(model)] == reference_stats, prefix
    variables = itermask_convert.variables_from_torch(sd, model)
    shadow = [sd[k] for k in reference_params]
    ema = convert.torch_to_flax(convert.shadow_params_to_state_dict(shadow, model), model)
    jax.tree.map(np.testing.assert_array_equal, ema, variables["params"])
    back = convert.flax_to_torch(variables["params"], model)
    for k in reference_params:
      np.testing.assert_array_equal(back[k], sd[k])
