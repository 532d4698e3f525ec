"""DDPM++ blocks, diffusion maths and the ANDi method functions beyond the reference fixtures.

Golden block numbers are the spec's (`methods/andi.md` §5, float32 column), computed by the
reference with a deterministic weight fill; the rest are properties checked against independent
computations (closed forms, jax.image.resize, the spec's constants).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from andi_config import tiny_config
from configs import andi as andi_configs
from uad_jax.convert import ddpmpp as convert
from uad_jax.diffusion import pyramid_noise, samplers, schedule
from uad_jax.engine import train_state
from uad_jax.errors import ConfigError, DataError
from uad_jax.methods import andi
from uad_jax.networks import ddpmpp_layers as layers
from uad_jax.networks.ddpmpp import DDPMpp, ddpmpp_from_config

# Functional tests of tiny networks: XLA's backend optimisations cost more compile time than
# they save (numerics-sensitive parity checks use the default jit).
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


# --- deterministic weight fill of spec §5 -------------------------------------------------------

def spec_fill(torch_shape, k, is_norm_scale):
  """base = sin(1.7 j + 0.3 k) over the torch-layout flat index j; see spec §5."""
  j = np.arange(int(np.prod(torch_shape)), dtype=np.float64)
  base = np.sin(1.7 * j + 0.3 * k).reshape(torch_shape)
  if len(torch_shape) >= 2:
    return (base / np.sqrt(base.size / torch_shape[0])).astype(np.float32)
  return (1.0 + 0.1 * base if is_norm_scale else 0.1 * base).astype(np.float32)


def fill_block(params):
  """Fills a block's Flax params in the reference's named_parameters order (k = 0, 1, ...)."""
  order = {"GN_0": 0, "Conv_0": 1, "Dense_emb": 2, "GN_1": 3, "Conv_1": 4, "Conv_2": 5,
           "GN": 0, "Dense_in": 1, "Dense_qkv": 2, "Dense_out": 3}
  leaf_order = {"kernel": 0, "scale": 0, "bias": 1}
  filled, k = {}, 0
  for mod in sorted(params, key=order.__getitem__):
    filled[mod] = {}
    for leaf in sorted(params[mod], key=leaf_order.__getitem__):
      shape = params[mod][leaf].shape
      if leaf == "kernel" and len(shape) == 4:  # (kh, kw, I, O) <- torch (O, I, kh, kw)
        value = spec_fill((shape[3], shape[2], shape[0], shape[1]), k, False).transpose(2, 3, 1, 0)
      elif leaf == "kernel":  # (I, O) <- torch (O, I)
        value = spec_fill((shape[1], shape[0]), k, False).T
      else:
        value = spec_fill(shape, k, leaf == "scale")
      filled[mod][leaf] = value
      k += 1
  return filled


def spec_block_input(batch, channels, size):
  """x[b,c,h,w] = sin(0.05h + 0.07w + 0.3c + b), returned NHWC."""
  b, c, h, w = np.meshgrid(np.arange(batch), np.arange(channels), np.arange(size),
                           np.arange(size), indexing="ij")
  return np.sin(0.05 * h + 0.07 * w + 0.3 * c + b).astype(np.float32).transpose(0, 2, 3, 1)


def check_summary(y_nhwc, total, mean_abs, element):
  """Compares sum, mean |y| and one NCHW element with the spec's float32 reference numbers."""
  index, value = element
  y = np.asarray(y_nhwc, np.float64)
  # The sums cancel heavily: fp32 and fp64 references differ by up to 3e-9 of sum |y|, a GPU's
  # reduction order by 5e-8.
  np.testing.assert_allclose(y.sum(), total, atol=1e-7 * np.abs(y).sum())
  np.testing.assert_allclose(np.abs(y).mean(), mean_abs, rtol=1e-6)
  b, c, h, w = index
  # The fp32 and fp64 references differ by up to 8e-7 in single elements.
  np.testing.assert_allclose(y[b, h, w, c], value, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("c_in,c_out,mode,size,expected", [
    (32, 64, "plain", 28, (7.55032349, 0.0932860747, ((1, 5, 3, 4), -0.139268786))),
    (32, 32, "down", 28, (-199.945740, 0.120694220, ((1, 5, 3, 4), -0.125981867))),
    (64, 64, "up", 14, (14.7344131, 0.110608876, ((1, 5, 3, 4), 0.0347045772))),
])
def test_resblock_golden(c_in, c_out, mode, size, expected):
  block = layers.ResBlock(c_out, mode, dropout=0.1, rescale=True)
  x = spec_block_input(2, c_in, size)
  temb = np.cos(0.1 * np.arange(128)[None] + np.arange(2)[:, None]).astype(np.float32)
  params = block.init(jax.random.key(0), x, temb, False)["params"]
  with jax.default_matmul_precision("highest"):
    y = jax.jit(functools.partial(block.apply, train=False))({"params": fill_block(params)}, x,
                                                            temb)
  check_summary(y, *expected)


def test_attention_golden_and_causal():
  attn = layers.CausalSelfAttention(head_dim=32, dropout=0.1, rescale=True)
  x = spec_block_input(2, 96, 14)
  params = fill_block(attn.init(jax.random.key(0), x, False)["params"])
  with jax.default_matmul_precision("highest"):
    y = jax.jit(functools.partial(attn.apply, train=False))({"params": params}, x)
  check_summary(y, 416.768951, 0.455718696, ((1, 5, 3, 4), 0.143180534))
  # Attention branch √2·y - x at [0,7,0,0] (spec fp64 0.145110698; non-causal would be 0.1499).
  branch = np.sqrt(2.0) * np.asarray(y, np.float64) - x
  np.testing.assert_allclose(branch[0, 0, 0, 7], 0.145110698, rtol=1e-4)
  # Causality: after swapping the first two raster tokens, token 0 attends to the old token 1
  # alone; without the mask the outputs would merely be permuted. Later tokens see both.
  x = np.random.default_rng(0).normal(size=(2, 14, 14, 96)).astype(np.float32)
  y = attn.apply({"params": params}, x, False)
  tokens = x.reshape(2, -1, 96).copy()
  tokens[:, [0, 1]] = tokens[:, [1, 0]]
  y_swapped = np.asarray(attn.apply({"params": params}, tokens.reshape(x.shape), False))
  y_swapped, y_tokens = y_swapped.reshape(2, -1, 96), np.asarray(y).reshape(2, -1, 96)
  assert np.abs(y_swapped[:, 0] - y_tokens[:, 1]).max() > 1e-3  # rounding is ~1e-7
  np.testing.assert_allclose(y_swapped[:, 2:], y_tokens[:, 2:], rtol=1e-5, atol=1e-5)


def test_row_chunked_weight_grad_matches_xla(monkeypatch):
  monkeypatch.setattr(layers, "_ROW_CHUNK_BYTES", 600_000)  # 5-row blocks: 32 of them
  monkeypatch.setattr(layers, "_ROW_CHUNK_MIN_SIZE", 160)
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (1, 160, 160, 16))
  kernel = jax.random.normal(keys[1], (3, 3, 16, 16))
  g = jax.random.normal(keys[2], (1, 160, 160, 16))
  grads = lambda x, k, g: jax.vjp(layers.conv3x3_row_chunked_wgrad, x, k)[1](g)
  assert "scan" in str(jax.make_jaxpr(grads)(x, kernel, g))  # the row-block path is taken
  ours = fast_jit(grads)(x, kernel, g)
  ref = fast_jit(lambda x, k, g: jax.vjp(layers.conv3x3, x, k)[1](g))(x, kernel, g)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-5, atol=1e-5 * np.abs(ref[1]).max())
  np.testing.assert_array_equal(layers.conv3x3_row_chunked_wgrad(x, kernel),
                                layers.conv3x3(x, kernel))


def test_timestep_embedding_and_schedule_constants():
  e = np.asarray(layers.timestep_embedding(jnp.array([0.125]), 32))[0]
  np.testing.assert_allclose(e[:4], [.12467473, .06759461, .03659988, .01980987], rtol=1e-6)
  np.testing.assert_allclose(e[16:20], [.99219769, .99771285, .99932998, .99980378], rtol=1e-7)
  lam = schedule.logsnr_cosine_shifted(jnp.array([0, 0.025, 0.124, 0.125, 0.5, 1.0]))
  np.testing.assert_allclose(lam, [12.227411, 3.674366, 0.469298, 0.452862, -2.772589,
                                   -17.772577], rtol=2e-6, atol=2e-6)
  alpha, sigma = schedule.alpha_sigma(lam)
  np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, rtol=1e-6)
  grid = schedule.reverse_time_grid(1000)
  assert grid.shape == (1001,) and grid.dtype == np.float32 and grid[-1] == 0.0
  np.testing.assert_allclose(grid[:-1], (1000 - np.arange(1000)) / 1000, atol=6e-8)


# --- network structure -------------------------------------------------------------------------

def paper_model():
  config = andi_configs.get_config()
  return ddpmpp_from_config(config.model, config.data.image_size)


def test_paper_parameter_count_and_converter_table():
  model = paper_model()
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 1)),
                                             jnp.zeros((1,)))["params"])
  sizes = [int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)]
  assert sum(sizes) == 7_537_025
  table = convert.parameter_table(model)
  assert len(table) == 533 == len(sizes)
  for entry in table:  # the converter's table describes exactly the network's parameters
    leaf = functools.reduce(lambda node, key: node[key], entry.flax_path, shapes)
    torch_shape = {"conv": lambda s: (s[3], s[2], s[0], s[1]), "dense": lambda s: s[::-1],
                   "vector": lambda s: s}[entry.layout](leaf.shape)
    assert tuple(torch_shape) == entry.torch_shape, entry.torch_name
  plan = model.plan()
  assert len(plan) == 54 and plan[31].kind == "attn" and plan[52].name == "out_norm"
  assert [m.dropout for m in plan if m.kind == "resblock"][:3] == [0.0, 0.0, 0.0]
  assert plan[20].mode == "down" and plan[20].dropout == 0.1  # 14 -> 7 down block


@pytest.fixture(scope="module")
def tiny():
  """(config, fresh train state, non-degenerate params) of a tiny 16×16 ANDi network."""
  config = tiny_config()
  # An 'rbg' key compiles the initialisers about 3x faster than threefry on XLA:CPU.
  state = andi.init_state(config, jax.random.key(0, impl="rbg"))
  # The spec init zeroes the output convs; add noise so every path contributes.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda l: l + 0.1 * rng.normal(size=l.shape).astype(np.float32),
                        state.params)
  return config, state, params


def test_init_gives_zero_output_and_spec_init(tiny):
  config, state, _ = tiny
  model = andi.build_model(config)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 1))
  y = fast_jit(model.apply)({"params": state.params}, x, jnp.array([0.1, 0.9]))
  np.testing.assert_array_equal(y, 0.0)
  p = state.params
  assert not np.any(p["down_0_res_0"]["Conv_1"]["kernel"])
  assert not np.any(p["conv_out"]["kernel"])
  kernel = np.asarray(p["down_0_res_0"]["Conv_0"]["kernel"])  # Glorot-uniform bound
  assert 0 < np.abs(kernel).max() <= np.sqrt(6.0 / (9 * 8 + 9 * 8))
  bias = np.asarray(p["down_1_attn_0"]["Dense_in"]["bias"])  # torch Linear: U(±1/sqrt(C))
  assert 0 < np.abs(bias).max() <= 1 / np.sqrt(16)
  jax.tree.map(np.testing.assert_array_equal, state.ema_params, state.params)


def test_wrong_input_size_is_a_config_error():
  model = DDPMpp(image_size=16, nf=8, ch_mult=(1, 2), num_res_blocks=(1, 1),
                 attn_resolutions=(8,), attn_emb_dim=8)
  with pytest.raises(ConfigError, match="16x16x1"):
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), jnp.zeros((1,)))


def test_converter_errors_name_the_key():
  model = DDPMpp(image_size=16, nf=8, ch_mult=(1, 2), num_res_blocks=(1, 1),
                 attn_resolutions=(8,), attn_emb_dim=8)
  table = convert.parameter_table(model)
  state = {"module." + e.torch_name: np.zeros(e.torch_shape, np.float32) for e in table}
  state["module.step"] = np.zeros((1,), np.float32)
  params = convert.torch_to_flax(state, model)  # DDP prefix stripped, `step` ignored
  assert params["conv_in"]["kernel"].shape == (3, 3, 1, 8)
  missing = dict(state)
  del missing["module.all_modules.2.bias"]
  with pytest.raises(DataError, match=r"ckpt.*all_modules\.2\.bias"):
    convert.torch_to_flax(missing, model, source="ckpt")
  wrong = dict(state, **{"module.all_modules.2.weight": np.zeros((8, 1, 1, 1), np.float32)})
  with pytest.raises(DataError, match=r"all_modules\.2\.weight.*shape"):
    convert.torch_to_flax(wrong, model)
  with pytest.raises(DataError, match="extra"):
    convert.torch_to_flax(dict(state, extra=np.zeros(1)), model)
  with pytest.raises(DataError, match="tensors"):
    convert.shadow_params_to_state_dict([np.zeros(1)] * 3, model)


def test_ema_decay_rule():
  d = [float(train_state.ema_decay(n, 0.9999)) for n in (1, 10, 2500, 15000, 50000, 100000)]
  np.testing.assert_allclose(d, [2 / 11, 0.55, 2501 / 2510, 15001 / 15010, 50001 / 50010, 0.9999],
                             rtol=1e-7)
  np.testing.assert_allclose(d[:3], [0.1818, 0.55, 0.99641], atol=5e-5)


# --- pyramid noise -----------------------------------------------------------------------------

@pytest.mark.parametrize("width,size", [(1, 8), (3, 32), (5, 20), (28, 224), (16, 16)])
def test_bilinear_matrix_matches_jax_image_resize(width, size):
  low = np.random.default_rng(0).normal(size=(width, width)).astype(np.float32)
  padded = np.zeros((width + 3, width + 3), np.float32)
  padded[:width, :width] = low  # columns beyond `width` must not contribute
  m = pyramid_noise.bilinear_upsample_matrix(jnp.asarray(width), size, width + 3)
  ours = np.asarray(jnp.matmul(jnp.matmul(m, padded, precision="highest"), m.T,
                              precision="highest"))  # GPUs default to TF32
  expected = jax.image.resize(low, (size, size), "bilinear")
  np.testing.assert_allclose(ours, expected, atol=2e-6)


def test_pyramid_noise_statistics():
  r = jax.random.uniform(jax.random.key(0), (2000, 4), minval=2.0, maxval=4.0)
  widths = np.asarray(fast_jit(jax.vmap(lambda r: pyramid_noise.level_widths(224, r)))(r))
  levels = 2 + np.argmax(widths == 1, axis=1)  # level 0 + levels 1.. up to the first w == 1
  assert set(np.unique(levels)) == {4, 5}  # spec §2.4: 4-5 levels at 224
  assert widths[:, 0].min() >= 56 and widths[:, 0].max() <= 112
  assert pyramid_noise.level_max_sizes(224) == [112, 28, 3, 1]

  noise = fast_jit(pyramid_noise.pyramid_noise, static_argnums=1)(jax.random.key(1),
                                                                  (4, 64, 64, 1))
  noise = np.asarray(noise, np.float64)
  np.testing.assert_allclose(noise.std(ddof=1), 1.0, rtol=1e-5)  # one global unbiased std
  # Low-resolution levels make neighbouring pixels correlated, unlike white noise.
  corr = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
  assert 0.2 < corr < 0.9
  other = pyramid_noise.pyramid_noise(jax.random.key(2), (4, 64, 64, 1))
  assert not np.allclose(noise, other)


# --- samplers, training and scoring ------------------------------------------------------------

def exact_v_model(logsnr_fn, x0):
  """The exact v-prediction when all data equal x0: v = α ε - σ x0 with ε = (z - α x0) / σ."""
  def model_fn(z, t):
    alpha, sigma = schedule.alpha_sigma(logsnr_fn(t))
    alpha, sigma = alpha[:, None, None, None], sigma[:, None, None, None]
    return alpha * (z - alpha * x0) / sigma - sigma * x0
  return model_fn


@pytest.mark.parametrize("name", ["ancestral", "ddim"])
def test_samplers_recover_a_point_mass(name):
  logsnr = functools.partial(schedule.logsnr_cosine_shifted, image_d=16)
  x0 = jnp.linspace(-0.8, 0.8, 16 * 16).reshape(1, 16, 16, 1)
  noise_fn = lambda key, shape: jax.random.normal(key, shape)
  out = jax.jit(lambda key: samplers.SAMPLERS[name](exact_v_model(logsnr, x0), logsnr, noise_fn,
                                                    key, (2, 16, 16, 1), 8))(jax.random.key(0))
  # The last step ends at t = 0 where σ_0 ≈ 1.6e-4 (λ(0) = 17.5 at image_d = 16).
  np.testing.assert_allclose(out, jnp.broadcast_to(x0, out.shape), atol=1e-3)


def test_sample_previews(tiny):
  config, _, params = tiny
  config = config.copy_and_resolve_references()
  config.sampling.preview_steps = 4
  images = fast_jit(functools.partial(andi.sample, config), static_argnames="num_images")(
      params, jax.random.key(0), num_images=3)
  assert images.shape == (3, 16, 16, 1) and images.dtype == jnp.float32
  assert np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1
  assert np.asarray(images).std() > 0
  config.sampling.sampler = "euler"
  with pytest.raises(ConfigError, match="sampler"):
    andi.sample(config, params, jax.random.key(0), 1)


def test_train_step_updates_params_and_ema(tiny):
  config, state, _ = tiny
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1))}
  step = fast_jit(functools.partial(andi.train_step, config))
  new_state, metrics = step(state, batch, jax.random.key(2))
  assert int(new_state.step) == 1 and np.isfinite(metrics["loss"])
  # At init v̂ = 0, so the loss is mean(α_t² ε²) > 0; the zero-init output conv gets a gradient.
  assert metrics["loss"] > 0
  assert np.any(new_state.params["conv_out"]["kernel"])
  d = 2.0 / 11.0  # EMA decay at n = 1
  expected = jax.tree.map(lambda e, p: e - (1 - d) * (e - p), state.params, new_state.params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7),
               new_state.ema_params, expected)
  again, _ = step(new_state, batch, jax.random.key(3))
  assert int(again.step) == 2


def scoring_config(aggregation="gmean", stride=1):
  config = tiny_config()
  assert config.data.image_size == 16
  config.sampling.update(start=125, stop=119, aggregation=aggregation, stride=stride)
  return config


def scoring_inputs():
  images = np.array(jax.random.uniform(jax.random.key(5), (2, 16, 16, 1)))
  images[:, :3] = 0.0  # background rows
  return jnp.asarray(images)


def test_score_slices_streaming_noise_contract_and_stride(tiny):
  config, params = scoring_config(), tiny[2]
  images, rng = scoring_inputs(), jax.random.key(7)
  maps = fast_jit(functools.partial(andi.score_slices, config))(params, images, None, rng)
  assert maps.shape == (2, 16, 16) and maps.dtype == jnp.float32
  assert np.all(np.asarray(maps)[:, :3] == 0) and np.all(np.asarray(maps)[:, 3:] > 0)
  # Step i's noise is normal(fold_in(rng, i)): replaying it through the injected-noise path
  # gives the same maps and the per-step gaps d_i.
  noise = jnp.stack([jax.random.normal(jax.random.fold_in(rng, i), images.shape)
                     for i in range(6)])
  maps_noise, d = fast_jit(functools.partial(andi.score_slices_with_noise, config))(
      params, images, noise)
  # Different fusions round the float32 cancellation differently (spec §4 item 6).
  np.testing.assert_allclose(maps_noise, maps, rtol=2e-2)
  log_d = np.log(np.asarray(d, np.float64)[:, :, 3:])  # brain rows (background d may be 0)
  np.testing.assert_allclose(np.asarray(maps)[:, 3:], np.exp(log_d.mean(axis=0)), rtol=2e-2)
  # Stride 2 keeps steps 0, 2, 4 with the same (t, s) pairs and the same noise.
  strided = scoring_config(stride=2)
  t1, s1, _ = andi.score_times(config)
  t2, s2, i2 = andi.score_times(strided)
  np.testing.assert_array_equal(i2, [0, 2, 4])
  np.testing.assert_array_equal(t2, t1[::2])
  np.testing.assert_array_equal(s2, s1[::2])
  maps2 = fast_jit(functools.partial(andi.score_slices, strided))(params, images, None,
                                                                   rng)
  np.testing.assert_allclose(np.asarray(maps2)[:, 3:], np.exp(log_d[::2].mean(axis=0)),
                             rtol=2e-2)


def test_score_prob_aggregation(tiny):
  config, params, images = scoring_config("prob"), tiny[2], scoring_inputs()
  noise = jax.random.normal(jax.random.key(3), (6,) + images.shape)
  maps, d = fast_jit(functools.partial(andi.score_slices_with_noise, config))(params, images,
                                                                            noise)
  d = np.asarray(d, np.float64)
  assert np.all((d > 0) & (d <= 1))
  np.testing.assert_allclose(np.asarray(maps)[:, 3:], (1 - d.prod(axis=0))[:, 3:], rtol=1e-4,
                             atol=1e-6)
  np.testing.assert_array_equal(np.asarray(maps)[:, :3], 0.0)


def test_bad_scoring_config(tiny):
  config = scoring_config("median")
  with pytest.raises(ConfigError, match="aggregation"):
    andi.score_slices(config, tiny[2], scoring_inputs(), None, jax.random.key(0))
  config = scoring_config()
  config.sampling.stop = 130
  with pytest.raises(ConfigError, match="start"):
    andi.score_times(config)
