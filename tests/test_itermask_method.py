"""IterMask's functions beyond the reference fixtures: condition vs an independent float64 FFT,
masks (distribution pieces vs scipy/naive painting, crop geometry), thresholds vs full sorts, the
scoring loop vs a plain transcription of the reference's loop, training steps, the converter's
import path, and the whole method through the engine on a tiny cohort."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from engine_helpers import cohort_config, tiny_cohort
from uad_jax.convert import ddpmpp as convert
from uad_jax.convert import itermask as itermask_convert
from uad_jax.engine import evaluate, trainer
from uad_jax.errors import ConfigError, DataError
from uad_jax.methods import contract, get_method
from uad_jax.methods.itermask import masks, method, scoring
from uad_jax.methods.itermask.condition import high_frequency_condition
from configs import itermask as itermask_configs

fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def tiny_config():
  return itermask_configs.get_config("tiny")


# --- condition ----------------------------------------------------------------------------------

def test_condition_matches_float64_fft_with_full_shifts():
  rng = np.random.default_rng(0)
  x = rng.uniform(-3, 3, (3, 24, 20, 1)).astype(np.float32)
  radius = 5.0
  # The reference's formula, with fftshift/ifftshift over ALL axes (batch and channel rolled too).
  xc = np.moveaxis(x, -1, 1).astype(np.float64)
  f = np.fft.fftshift(np.fft.fft2(xc))
  u, v = np.meshgrid(np.arange(24) - 12, np.arange(20) - 10, indexing="ij")
  amplitude = np.where(np.sqrt(u ** 2 + v ** 2) >= radius, np.abs(f), 1.0)
  ref = np.real(np.fft.ifft2(np.fft.ifftshift(amplitude * np.exp(1j * np.angle(f)))))
  ours = high_frequency_condition(jnp.asarray(x), radius)
  np.testing.assert_allclose(np.moveaxis(np.asarray(ours), -1, 1), ref, atol=2e-5)


# --- masks --------------------------------------------------------------------------------------

def test_keep_map_equals_naive_painting():
  rng = np.random.default_rng(1)
  shape = (30, 26)
  counts = (7, 3, 2)
  rows, cols = rng.integers(0, 30, 12), rng.integers(0, 26, 12)
  keep = masks.keep_map(shape, rows, cols, counts, (2, 4, 8))
  naive = np.ones(shape, np.float32)
  sides = [2] * 7 + [4] * 3 + [8] * 2
  for r, c, s in zip(rows, cols, sides):
    naive[r:r + s, c:c + s] = 0
  np.testing.assert_array_equal(keep, naive)


def test_sampling_weights_equal_scipy_pdf():
  rng = np.random.default_rng(2)
  brain = rng.uniform(size=(40, 40)) > 0.3
  r, c = np.nonzero(brain)
  cov = np.array([[4.0, -1.5], [-1.5, 2.0]])
  p = masks.sampling_weights(r, c, 17, cov, 0.1)
  grid = np.stack([0.1 * r - 2.0, 0.1 * c - 2.0], -1)
  pdf = scipy.stats.multivariate_normal(grid[17], cov).pdf(grid)
  np.testing.assert_allclose(p, pdf / pdf.sum(), rtol=1e-10)


def test_gen_mask_is_seeded_binary_and_anchored_in_the_brain():
  brain = np.zeros((60, 60), bool)
  brain[10:50, 15:45] = True
  a = masks.gen_mask(brain, np.random.default_rng(3), 0.25)
  b = masks.gen_mask(brain, np.random.default_rng(3), 0.25)
  np.testing.assert_array_equal(a, b)
  assert set(np.unique(a)) <= {0.0, 1.0} and (a == 0).any()
  # Corners take rows and columns of brain pixels: nothing is hidden above/left of the brain.
  assert a[:10].all() and a[:, :15].all()
  assert masks.gen_mask(np.zeros((8, 8), bool), np.random.default_rng(0)).all()


def test_square_sides_scale():
  assert masks.square_sides(1.0) == (4, 8, 16)
  assert masks.square_sides(0.5) == (2, 4, 8)
  assert masks.square_sides(0.01) == (1, 1, 1)


def test_corrupt_batch_masks_at_stored_size_then_crops():
  config = tiny_config()
  rng = np.random.default_rng(4)
  x01 = np.zeros((3, 20, 20, 1), np.float32)
  x01[:, 3:17, 4:18] = rng.uniform(0.1, 1.0, (3, 14, 14, 1))
  images = x01 * np.float32(6) + np.float32(-3)
  out = method.corrupt_batch(config, images, np.random.default_rng(5))
  assert out["image"].shape == out["mask"].shape == (3, 16, 16, 1)
  np.testing.assert_array_equal(out["image"], images[:, 2:18, 2:18])
  brain = out["image"] > -3
  assert set(np.unique(out["mask"])) <= {0.0, 1.0} and out["mask"].any()
  assert not (out["mask"] * ~brain).any()
  again = method.corrupt_batch(config, images, np.random.default_rng(5))
  np.testing.assert_array_equal(out["mask"], again["mask"])
  # Padding (stored size < image size) is background and never hidden.
  config.data.image_size = 24
  padded = method.corrupt_batch(config, images, np.random.default_rng(5))
  assert (padded["image"][:, :2] == -3).all() and not padded["mask"][:, :2].any()


# --- thresholds ---------------------------------------------------------------------------------

def test_kth_value_threshold_equals_full_sort():
  rng = np.random.default_rng(6)
  for trial in range(5):
    e = rng.exponential(size=(7, 9, 9)).astype(np.float32)
    m = rng.uniform(size=e.shape) < (0.05 if trial == 0 else 0.4)
    z = np.sort((e * m).ravel())
    k = int(z.size - 0.2 * m.sum())   # exact here: T < 2^24
    assert method.kth_value_threshold(e[m], z.size) == z[k - 1]


def test_kth_smallest_threshold_per_slice():
  rng = np.random.default_rng(7)
  e = rng.uniform(size=(4, 8, 8)).astype(np.float32)
  brain = (rng.uniform(size=(4, 8, 8)) < 0.7).astype(np.float32)
  thr = scoring.kth_smallest_threshold(jnp.asarray(e), jnp.asarray(brain), 0.6)
  for s in range(4):
    k = int(np.float32(64) - np.float32(0.6) * np.float32(brain[s].sum()))
    assert thr[s] == np.sort(e[s].ravel())[k - 1]


# --- scoring loop -------------------------------------------------------------------------------

def reference_loop(x, first_fn, ae_fn, validation_thr, noises):
  """`eval_iter.py`'s loop in numpy (spec §3), with injected noise; returns (maps, passes)."""
  s, h, w = x.shape
  brain = (x > -3).astype(np.float32)
  e = (x - first_fn(x)) ** 2 * brain
  active = np.ones(s, bool)
  final, pred = np.zeros_like(x), np.zeros_like(x)
  prev, j = brain, 0
  while True:
    if j == 0:
      thr = np.array([np.sort(e[i].ravel())[int(np.float32(h * w) - np.float32(0.6)
                                                  * brain[i].sum()) - 1] for i in range(s)])
      thr = thr[:, None, None]
    else:
      thr = validation_thr
    new = (e > thr) * brain
    with np.errstate(invalid="ignore", divide="ignore"):
      ratio = (prev.sum((1, 2)) - new.sum((1, 2))) / prev.sum((1, 2))
    ratio[np.isnan(ratio)] = -1
    stop = (ratio < 0.1) & active
    active &= ~stop
    if j > 0:
      final[stop] = pred[stop]
    if not active.any():
      break
    prev = new
    pred = ae_fn((1 - prev) * x + prev * noises[j])
    e = (x - (prev * pred + (1 - prev) * x)) ** 2
    j += 1
  return (x - final) ** 2 * brain, j


def toy_networks(seed):
  """Deterministic, slice-independent stand-ins for the two networks (numpy and jax forms)."""
  rng = np.random.default_rng(seed)
  a, b = rng.uniform(0.5, 1.5, 2).astype(np.float32)

  def first(v, xp):
    return xp.tanh(v) * a

  def ae(masked, condition, xp):
    # Inpaints the condition (here the image itself) with a noise-driven error, so that a
    # random share of the mask leaves it at each pass and the loop runs several passes.
    return condition + 0.3 * xp.sin(b * masked)

  return first, ae


def test_loop_equals_reference_transcription_and_ignores_padding():
  rng = np.random.default_rng(8)
  s, h = 6, 12
  x = np.full((s, h, h), -3.0, np.float32)
  x[0, 2:10, 2:10] = rng.uniform(-2.5, 3, (8, 8))
  x[1, 1:11, 3:9] = rng.uniform(-2.5, 3, (10, 6))
  x[2, 5, 5:7] = 1.3                       # a 2-pixel brain: stops at j = 0 with map x²
  x[4, 0:12, 0:12] = rng.uniform(-2.9, 3, (12, 12))
  # slice 3 is empty; slice 5 is padding (ignored whatever it holds)
  x[5] = rng.uniform(-2.5, 3, (h, h))
  noises = rng.standard_normal((300, s, h, h)).astype(np.float32)
  first, ae = toy_networks(9)
  valid = np.arange(s) < 5
  settings = scoring.LoopSettings(max_passes=300)

  out = fast_jit(lambda x, n, valid: scoring.iterative_maps(
      lambda c: first(c, jnp), lambda inp: ae(inp[..., :1], inp[..., 1:], jnp), x[..., None],
      valid, x[..., None], 0.02, lambda j: n[j][..., None], settings))(x, noises, valid)
  ref_maps, ref_passes = reference_loop(x[:5], lambda v: first(v, np),
                                        lambda v: ae(v, x[:5], np), 0.02, noises[:, :5])
  assert int(out["passes"]) == ref_passes >= 3
  np.testing.assert_allclose(np.asarray(out["maps"])[:5], ref_maps, rtol=1e-5, atol=1e-6)
  assert not np.asarray(out["maps"])[5].any() and not np.asarray(out["maps"])[3].any()
  np.testing.assert_allclose(np.asarray(out["maps"])[2], np.where(x[2] > -3, x[2] ** 2, 0))


def test_loop_cap_uses_last_reconstruction():
  x = np.full((1, 8, 8, 1), -3.0, np.float32)
  x[0, 1:7, 1:7] = 2.0
  settings = scoring.LoopSettings(max_passes=1)
  out = scoring.iterative_maps(lambda c: jnp.zeros_like(c), lambda inp: jnp.zeros_like(inp[..., :1]),
                               x, np.ones(1, bool), x, -1.0, lambda j: jnp.zeros_like(x),
                               settings)
  # thr -1: no pixel ever leaves the mask (ratio 0 < 0.1 stops it) — with cap 1 the single pass
  # is both the last and the accepted one.
  assert int(out["passes"]) == 1
  np.testing.assert_allclose(out["maps"], np.where(x[..., 0] > -3, 4.0, 0.0))


# --- training, parameters, conversion -----------------------------------------------------------

@pytest.mark.parametrize("stage_index", [0, 1])
def test_train_steps_decrease_loss_and_update_batch_stats(stage_index):
  config = tiny_config()
  config.model.dropout = 0.0
  config.optim.lr = 3e-3
  stage = method.METHOD.stages[stage_index]
  state = stage.init(config, jax.random.key(0), contract.TrainContext(1))
  rng = np.random.default_rng(10)
  x01 = np.zeros((4, 20, 20, 1), np.float32)
  x01[:, 4:16, 4:16] = rng.uniform(0.2, 1.0, (4, 12, 12, 1))
  images = x01 * np.float32(6) + np.float32(-3)
  if stage.batch_transform is not None:
    assert stage.train_crop(config) is None
    batch = stage.batch_transform(config, {})({"image": images}, np.random.default_rng(0))
  else:
    batch = {"image": images[:, 2:18, 2:18]}
  assert stage.value_range(config) == (-3.0, 3.0)
  step = fast_jit(functools.partial(stage.train_step, config))
  losses = []
  for i in range(8):
    new_state, metrics = step(state, batch, jax.random.key(1))
    if i == 0:
      stats_before = jax.tree.leaves(state.batch_stats)
      stats_after = jax.tree.leaves(new_state.batch_stats)
      assert any(not np.allclose(a, b) for a, b in zip(stats_before, stats_after))
    state = new_state
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0]
  # EMA covers the parameters only.
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(state.params)
  images = stage.preview(config, state, batch, jax.random.key(2))
  for v in images.values():
    assert v.shape == (1, 16, 16) and float(v.min()) >= 0 and float(v.max()) <= 1


def test_scoring_params_threshold_sources():
  config = tiny_config()
  states = {s.name: s.init(config, jax.random.key(0), contract.TrainContext(1))
            for s in method.METHOD.stages}
  assert np.isnan(method.scoring_params(config, states, {})["validation_thr"])
  assert method.scoring_params(config, states, {"validation_thr": 0.5})["validation_thr"] == 0.5
  config.scoring.validation_thr = 0.0022
  assert method.scoring_params(config, states, {})["validation_thr"] == np.float32(0.0022)
  with pytest.raises(ConfigError):
    method.scoring_params(config, {"ae": states["ae"]}, {})
  config.model.norm = "group"
  with pytest.raises(ConfigError):
    method.build_model(config, "ae")


def _torch_state_dict(model, seed):
  """A reference-style state_dict of `model` (random), buffers included."""
  rng = np.random.default_rng(seed)
  sd = {}
  for e in convert.parameter_table(model):
    sd[e.torch_name] = rng.standard_normal(e.torch_shape).astype(np.float32)
  for e in convert.batch_stats_table(model):
    sd[e.torch_name] = rng.uniform(0.5, 1.5, e.torch_shape).astype(np.float32)
    sd[e.torch_name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(7)
  sd["step"] = np.array([100.0], np.float32)
  return sd


def test_reference_states_from_safetensors(tmp_path):
  from safetensors.numpy import save_file
  config = tiny_config()
  for stage, run in itermask_convert.RUN_NAMES.items():
    folder = tmp_path / run / ("checkpoint_3" if stage == "first" else "checkpoint_19")
    folder.mkdir(parents=True)
    (tmp_path / run / "checkpoint_1").mkdir()
    save_file({"module." + k: v for k, v in
               _torch_state_dict(method.build_model(config, stage), len(stage)).items()},
              str(folder / "model.safetensors"))
  with pytest.raises(DataError, match="custom_checkpoint_0.pkl"):
    itermask_convert.reference_states(config, tmp_path, ema_from_model=False)
  states, warnings = itermask_convert.reference_states(config, tmp_path, ema_from_model=True)
  assert any("checkpoint_19" in w for w in warnings)
  for stage in method.METHOD.stages:
    fields = states[stage.name]
    target = stage.init(config, jax.random.key(0), contract.TrainContext(1))
    for name in ("params", "ema_params", "batch_stats"):
      assert jax.tree.structure(fields[name]) == jax.tree.structure(getattr(target, name))
  with pytest.raises(DataError, match="IterMaskAE"):
    itermask_convert.reference_states(config, tmp_path / "IterMaskFirst", ema_from_model=True)


# --- through the engine -------------------------------------------------------------------------

def test_registered_and_trains_calibrates_evaluates(tmp_path):
  assert get_method("itermask") is method.METHOD
  cohort = tiny_cohort(tmp_path / "cohort")
  config = cohort_config("itermask", cohort)
  workdir = tmp_path / "run"
  trainer.train(config, workdir)
  assert (workdir / "stages" / "first" / "checkpoints" / "4").is_dir()
  assert (workdir / "checkpoints" / "4").is_dir()
  path = evaluate.calibrate(config, workdir)
  values = json.loads((path.parent / evaluate.METHOD_CALIBRATION).read_text())
  assert np.isfinite(values["validation_thr"]) and values["validation_thr"] >= 0
  evaluate.evaluate(config, workdir, out=str(tmp_path / "eval"))
  results = json.loads((tmp_path / "eval" / "lesion" / "results.json").read_text())
  assert results
