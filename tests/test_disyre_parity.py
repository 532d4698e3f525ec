"""Parity of DISYRE's network, feed cores, sliding window and scoring with the PyTorch reference.

Every fixture of `$UAD_FIXTURES_DIR/disyre/` is checked by its `kind`; sizes come from its
config and arrays. Arrays in fixtures are NCHW; the port is NHWC. A fixture's
`data.image_size` is the reference's network input (our data.patch_size) and its
`data.load_size` the slice size (our data.image_size).
"""

import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import disyre as disyre_configs
from reference_fixtures import load_area, run_check
from uad_jax.convert import ddpmpp as convert
from uad_jax.methods.disyre import anomaly, method, severity
from uad_jax.methods.disyre import sliding_window as sw

FIXTURES = load_area("disyre")


def nhwc(a: np.ndarray) -> np.ndarray:
  """NCHW (with any leading axes) -> NHWC."""
  return np.moveaxis(a, -3, -1)


def nchw(a) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -1, -3)


def fixture_config(fx) -> ml_collections.ConfigDict:
  """The paper config with the fixture's model/eval values and its sizes mapped to our keys."""
  c = disyre_configs.get_config()
  for section, values in fx.meta["config"].items():
    if section in ("model", "eval", "diffusion") and isinstance(values, dict):
      for key, value in values.items():
        c[section][key] = tuple(value) if isinstance(value, list) else value
  data = fx.meta["config"].get("data", {})
  c.data.patch_size = data.get("image_size", fx.meta["config"].get("image_size"))
  c.data.image_size = data.get("load_size", c.data.patch_size)
  return c


def model_and_params(fx):
  config = fixture_config(fx)
  model = method.build_model(config)
  return config, model, convert.torch_to_flax(fx.state_dict, model, source=fx.name)


def check_ddpmpp_forward(fx):
  _, model, params = model_and_params(fx)
  x = next(v for v in fx.inputs.values() if v.ndim == 4)
  t = next(v for v in fx.inputs.values() if v.ndim == 1)
  y, state = jax.jit(lambda p, x, t: model.apply(
      {"params": p}, x, t, capture_intermediates=True, mutable=["intermediates"]))(
          params, nhwc(x), t)
  inter = state["intermediates"]
  plan = model.plan()
  for name, _, _, meaning in fx.meta["outputs"]:
    if meaning.startswith("network output"):
      ours = nchw(y)
    elif "get_timestep_embedding" in meaning:
      ours = inter["temb_sinusoidal"][0]
    elif match := re.search(r"all_modules\.(\d+)", meaning):
      ours = np.asarray(inter[plan[int(match.group(1))].name]["__call__"][0])
      ours = nchw(ours) if ours.ndim == 4 else ours
    else:
      pytest.fail(f"{fx}: output {name!r} ({meaning}) is not understood by this test")
    np.testing.assert_allclose(ours, fx.outputs[name], err_msg=name, **fx.tolerance)


def check_train_loss(fx):
  config, model, params = model_and_params(fx)
  schedule = severity.schedule_of(config)
  labels = severity.severity_labels(fx.inputs["alpha_texture"], fx.inputs["alpha_bias"],
                                    schedule)
  loss, x0 = jax.jit(lambda p, a, b, l: method.x0_loss(model, p, a, b, l, False))(
      params, nhwc(fx.inputs["data"]), nhwc(fx.inputs["data_c"]), labels)
  ours = {"loss": loss, "labels": labels, "x0_pred": nchw(x0), "sqrt_alphas_cumprod": schedule}
  # The network output (an intermediate) differs from torch's by up to 4e-6; each differs by
  # about 3e-6 from an evaluation with float64 convolutions and dense layers (float32 summation
  # order through the U-Net). It is held to the network fixture's tolerance (ddpmpp_forward);
  # loss, labels and schedule to this fixture's.
  tolerances = {"x0_pred": dict(rtol=1e-4, atol=1e-5)}
  for name, ref in fx.outputs.items():
    if name not in ours:
      pytest.fail(f"{fx}: output {name!r} is not understood by this test")
    if name == "labels":
      np.testing.assert_array_equal(ours[name], ref, err_msg=name)
    else:
      np.testing.assert_allclose(ours[name], ref, err_msg=name,
                                 **tolerances.get(name, fx.tolerance))


def check_disyre_score(fx):
  config, model, params = model_and_params(fx)
  images = nhwc(fx.inputs["image"])
  x = 2.0 * images - 1.0
  ts = method.timesteps(config)
  layout = method.layout_of(config, *images.shape[1:3])
  restored = jax.jit(lambda p, x: method.restorations(model, p, x, ts, layout,
                                                      config.eval.sw_batch_size))(params, x)
  maps = jax.jit(lambda p, im: method.score(config, p, im, jnp.ones(im.shape[0], bool),
                                            jax.random.key(0)))(params, images)
  ours = {"timesteps": ts, "x0_pred": nchw(restored), "score": np.asarray(maps)[:, None]}
  for name, ref in fx.outputs.items():
    if name not in ours:
      pytest.fail(f"{fx}: output {name!r} is not understood by this test")
    if name == "timesteps":
      np.testing.assert_array_equal(ours[name], ref, err_msg=name)
    else:
      np.testing.assert_allclose(ours[name], ref, err_msg=name, **fx.tolerance)


def synthetic_predictor(windows, t):
  """The fixture's network stand-in: tanh(w)·(1 + 0.01 t) + 0.01 i - 0.02 j (i/j: row/col
  inside the window)."""
  p = windows.shape[1]
  i = jnp.arange(p, dtype=jnp.float32)
  ramp = 0.01 * i[:, None] - 0.02 * i[None, :]
  return jnp.tanh(windows) * (1.0 + 0.01 * t[:, None, None, None]) + ramp[None, :, :, None]


def check_sliding_window_synthetic(fx):
  cfg = fx.meta["config"]["sliding_window"]
  patch, t = cfg["patch"], float(cfg["timestep"])
  step = sw.window_step(patch, 0.25)
  ours = {"importance_map": sw.importance_map(patch), "importance_map_128": sw.importance_map(128)}
  for name, x in fx.inputs.items():
    layout = sw.window_layout(x.shape[-2], x.shape[-1], patch, step)
    windows = sw.extract_windows(jnp.asarray(nhwc(x)), layout)
    flat = windows.reshape((-1,) + windows.shape[2:])
    pred = synthetic_predictor(flat, jnp.full((flat.shape[0],), t)).reshape(windows.shape)
    ours["y" + name[1:]] = nchw(sw.fold_windows(pred, layout))
  for name, ref in fx.outputs.items():
    if name not in ours:
      pytest.fail(f"{fx}: output {name!r} is not understood by this test")
    np.testing.assert_allclose(ours[name], ref, err_msg=name, **fx.tolerance)


def check_fpi_blend(fx):
  i = fx.inputs
  results = [anomaly.fpi_blend(i["data"][b, 0], i["shape"][b, 0], i["anom_center"][b],
                               i["fp"][b, 0], float(i["alpha"][b]))
             for b in range(len(i["data"]))]
  ours = {"data_c": np.stack([r[0] for r in results])[:, None],
          "fp_big": np.stack([r[1] for r in results])[:, None],
          "alpha_texture": np.array([r[2] for r in results])}
  assert ours["fp_big"].dtype == np.float32
  for name, ref in fx.outputs.items():
    if name not in ours:
      pytest.fail(f"{fx}: output {name!r} is not understood by this test")
    np.testing.assert_allclose(ours[name], ref, err_msg=name, **fx.tolerance)


def check_bias_corruption(fx):
  i = fx.inputs
  codebook = np.asarray(fx.meta["config"]["data"]["codebook"])
  results = []
  for b in range(len(i["data_c"])):
    _, alpha, sign_u = i["py_draws"][b]
    results.append(anomaly.bias_corruption(i["data_c"][b, 0], i["shape"][b, 0], codebook,
                                           float(alpha), 1.0 if sign_u < 0.5 else -1.0,
                                           i["u_classes"][b]))
  ours = {"data_c": np.stack([r[0] for r in results])[:, None],
          "shape_bias": np.stack([r[1] for r in results])[:, None],
          "alpha_bias": np.array([r[2] for r in results])}
  for name, ref in fx.outputs.items():
    if name not in ours:
      pytest.fail(f"{fx}: output {name!r} is not understood by this test")
    np.testing.assert_allclose(ours[name], ref, err_msg=name, **fx.tolerance)


CHECKS = {
    "ddpmpp_forward": check_ddpmpp_forward,
    "train_loss": check_train_loss,
    "disyre_score": check_disyre_score,
    "sliding_window_synthetic": check_sliding_window_synthetic,
    "fpi_blend": check_fpi_blend,
    "bias_corruption": check_bias_corruption,
}


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda fx: fx.name)
def test_reference_fixture(fx):
  run_check(fx, CHECKS)


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.meta.get("state_dict")],
                         ids=lambda fx: fx.name)
def test_parameter_order_matches_reference(fx):
  """named_parameters order from the architecture = the reference state_dict order; the EMA
  shadow list converts to the same params."""
  _, model, params = model_and_params(fx)
  reference_order = [k for k, _, _ in fx.meta["state_dict"] if k != "step"]
  assert convert.named_parameters(model) == reference_order
  shadow = [fx.state_dict[k] for k in reference_order]
  from_shadow = convert.torch_to_flax(convert.shadow_params_to_state_dict(shadow, model), model)
  jax.tree.map(np.testing.assert_array_equal, from_shadow, params)


@pytest.mark.parametrize("fx", [f for f in FIXTURES if f.kind == "ddpmpp_forward"],
                         ids=lambda fx: fx.name)
def test_reference_states_of_a_checkpoint_folder(fx, tmp_path):
  """`convert/disyre.py` (what `import_torch --method disyre` runs) on an accelerate folder."""
  from safetensors.numpy import save_file
  from uad_jax.convert import disyre as disyre_convert
  from uad_jax.errors import DataError
  config, _, params = model_and_params(fx)
  src = tmp_path / "checkpoint_20"
  src.mkdir()
  save_file({f"module.{k}": np.ascontiguousarray(v) for k, v in fx.state_dict.items()},
            str(src / "model.safetensors"))
  states, warnings = disyre_convert.reference_states(config, src, ema_from_model=True)
  assert list(states) == [method.STAGE] and any("--ema-from-model" in w for w in warnings)
  for field in ("params", "ema_params"):
    jax.tree.map(np.testing.assert_array_equal, states[method.STAGE][field], params)
  with pytest.raises(DataError, match="--ema-from-model"):
    disyre_convert.reference_states(config, src, ema_from_model=False)
