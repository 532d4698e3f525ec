"""ANDi (Aggregated Normative Diffusion; Frotscher et al. 2023): the method's pure functions.

A DDPM++ U-Net is trained as a continuous-time v-prediction diffusion model on healthy slices
(shifted cosine log-SNR, pyramid noise). A slice is scored by noising it independently at each of
the low-noise steps start..stop of a 1000-step grid and comparing, per pixel, the posterior mean
built from the network's x̂ with the one built from the real image; the squared gaps are
aggregated over the steps by a geometric mean. Spec: `methods/andi.md`.

Config keys read (ml_collections.ConfigDict):
  model.{nf, ch_mult, num_res_blocks, attn_resolutions, attn_emb_dim, dropout, dropout_at,
    rescale, embedding_type, nonlinearity, num_channels}: the network (`networks/ddpmpp.py`);
  model.pyramid, model.discount: training/prior noise (pyramid noise when True);
  model.vpred: must be True (the reference's only trained parameterisation);
  model.ema_rate: cap of the EMA decay min(rate, (1 + n) / (10 + n));
  diffusion.{num_latents, schedule, logsnr_min, logsnr_max, shift, noise_d}: λ(t);
  data.image_size: model input size (and image_d of the schedule shift);
  optim.{lr, beta1, beta2, eps, weight_decay}: AdamW (decay on all parameters, no mask);
  sampling.{start, stop, stride, aggregation}: scoring steps and 'gmean' | 'prob';
  sampling.{sampler, preview_steps}: previews, 'ancestral' | 'ddim' and the number of steps;
  training.compute_dtype: 'float32' | 'bfloat16', the network's computation (params stay f32).
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.diffusion import pyramid_noise as pyramid
from uad_jax.diffusion.losses import vpred_losses
from uad_jax.diffusion.samplers import SAMPLERS, posterior_coefficients, predict_x0
from uad_jax.diffusion.schedule import logsnr_schedule, reverse_time_grid
from uad_jax.engine import optim, train_state
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.networks.ddpmpp import DDPMpp, ddpmpp_from_config


def build_model(config) -> DDPMpp:
  """The DDPMpp network of `config` (compute dtype from config.training.compute_dtype)."""
  if not config.model.get("vpred", True):
    raise ConfigError("model.vpred=False: only the v-prediction parameterisation is implemented "
                      "(the reference trains and scores ANDi with vpred=True)")
  dtype = jnp.dtype(config.get("training", {}).get("compute_dtype", "float32"))
  return ddpmpp_from_config(config.model, config.data.image_size, dtype)


def _logsnr_fn(config) -> Callable[[jnp.ndarray], jnp.ndarray]:
  return logsnr_schedule(config.diffusion, config.data.image_size)


def _training_noise_fn(config) -> Callable[[jax.Array, tuple], jnp.ndarray]:
  """Pyramid noise when model.pyramid (the training config), else white Gaussian noise."""
  if config.model.pyramid:
    return lambda key, shape: pyramid.pyramid_noise(key, shape, config.model.discount)
  return lambda key, shape: jax.random.normal(key, shape, jnp.float32)


def init_state(config, rng: jax.Array,
               ctx: contract.TrainContext = contract.TrainContext()) -> train_state.TrainState:
  """Fresh train state: spec initialisation (network output ≡ 0), AdamW state, EMA = params.

  The network input is (data.image_size, data.image_size, model.num_channels).
  """
  model = build_model(config)
  shape = (1, model.image_size, model.image_size, model.in_channels)
  init = jax.jit(lambda key: model.init({"params": key}, jnp.zeros(shape), jnp.zeros((1,)),
                                        train=False)["params"])
  tx, lr = optim.make_optimizer(config.optim, ctx.steps_per_epoch)
  return train_state.TrainState.create(init(rng), tx, lr, ema=True)


def train_step(config, state: train_state.TrainState, batch: dict, rng: jax.Array):
  """One AdamW step on the mean v-prediction loss of the batch, then the EMA update.

  batch["image"]: float32 (B, H, W, C) in [0, 1]; mapped to x = 2·image - 1. `rng` (fresh for
  every step; the engine folds in the step number) is split into the draws of t ~ U[0, 1) (per
  sample), the noise (pyramid or white, model.pyramid) and dropout. Returns
  (new_state, {"loss": scalar}).
  """
  model = build_model(config)
  x = 2.0 * batch["image"].astype(jnp.float32) - 1.0
  t_key, noise_key, dropout_key = jax.random.split(rng, 3)
  t = jax.random.uniform(t_key, (x.shape[0],), jnp.float32)
  noise = _training_noise_fn(config)(noise_key, x.shape)

  def loss_fn(params):
    def model_fn(z, t):
      return model.apply({"params": params}, z, t, train=True, rngs={"dropout": dropout_key})
    return jnp.mean(vpred_losses(model_fn, x, t, noise, _logsnr_fn(config)))

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads, ema_rate=config.model.ema_rate), {"loss": loss}


def score_times(config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The scoring steps: (t, s, i) float32/float32/int32 arrays, one entry per network evaluation.

  Reference: grid = reverse_time_grid(N) (N = diffusion.num_latents) and steps i = 0 ..
  start - stop - 1 with t = grid[N - start + i], s = grid[N - start + i + 1] (t = 0.125 ->
  0.026 for start 125, stop 25). Beyond the reference, sampling.stride = k keeps every k-th i
  (i = 0, k, 2k, ...) with the same pair (t, s = next grid point after t): each kept step is the
  same per-step quantity as at k = 1, so the geometric mean stays on the same scale.
  """
  n, start, stop = config.diffusion.num_latents, config.sampling.start, config.sampling.stop
  stride = config.sampling.get("stride", 1)
  if not 0 <= stop < start <= n:
    raise ConfigError(f"sampling.start {start} / stop {stop}: need 0 <= stop < start <= "
                      f"diffusion.num_latents ({n})")
  if stride < 1:
    raise ConfigError(f"sampling.stride {stride}: must be >= 1")
  grid = reverse_time_grid(n)
  i = np.arange(0, start - stop, stride, dtype=np.int32)
  return grid[n - start + i], grid[n - start + i + 1], i


def _step_gap(config, model, params, x, t, s, eps):
  """One scoring step: returns (d, log d), each (B, H, W, C) float32.

  z = α_t x + σ_t ε (always from the clean x); x̂ = clip(α_t z - σ_t v̂, -1, 1); μ_true =
  a z + b x, μ_pred = a z + b x̂. Both means are formed in float32 and subtracted, as in the
  reference: the common term a z cancels only up to rounding, which quantises small gaps and
  makes some exactly 0 (spec §4 item 6); (b (x̂ - x))² would not reproduce that.
  gmean: d = (μ_pred - μ_true)²; prob: d = exp(-(μ_pred - μ_true)² / (2 (1 - r) σ_t²)).
  """
  logsnr = _logsnr_fn(config)
  a, b, var, alpha_t, sigma_t = posterior_coefficients(logsnr(t), logsnr(s))
  z = alpha_t * x + sigma_t * eps
  v_pred = model.apply({"params": params}, z, jnp.full((x.shape[0],), t), train=False)
  x0 = predict_x0(z, v_pred, alpha_t, sigma_t)
  gap = (a * z + b * x0) - (a * z + b * x)
  if config.sampling.aggregation == "gmean":
    d = gap ** 2
    return d, jnp.log(d)
  log_d = -gap ** 2 / (2.0 * var)
  return jnp.exp(log_d), log_d


def _score_loop(config, params, images, noise_of_step, step_inputs, keep_steps: bool):
  """Runs the scoring steps in one lax.scan with a running sum of log d (never all maps).

  step_inputs: dict of arrays with a leading step axis (at least 't', 's'); noise_of_step maps
  one step's slice of it to ε (B, H, W, C). Returns (maps (B, H, W), per-step d or None).
  """
  aggregation = config.sampling.aggregation
  if aggregation not in ("gmean", "prob"):
    raise ConfigError(f"sampling.aggregation {aggregation!r}: expected 'gmean' or 'prob'")
  model = build_model(config)
  x = 2.0 * images.astype(jnp.float32) - 1.0

  def body(total_log_d, step):
    d, log_d = _step_gap(config, model, params, x, step["t"], step["s"], noise_of_step(step))
    return total_log_d + log_d, (d[..., 0] if keep_steps else None)

  total, per_step = jax.lax.scan(body, jnp.zeros_like(x), step_inputs)
  num_steps = step_inputs["t"].shape[0]
  if aggregation == "gmean":
    maps = jnp.exp(total / num_steps)  # any d_i = 0 gives log = -inf, hence a 0 map
  else:
    maps = 1.0 - jnp.exp(total)  # 1 - prod_i d_i
  # Background (x == -1 exactly, i.e. normalised intensity 0 in float32) scores 0 (spec §3.5).
  maps = jnp.where(x == -1.0, 0.0, maps)[..., 0]
  return maps, per_step


def score_slices(config, params, images: jnp.ndarray, valid: jnp.ndarray,
                 rng: jax.Array) -> jnp.ndarray:
  """ANDi anomaly maps of a batch of slices with the EMA `params` (dropout off).

  images: float32 (B, H, W, 1) in [0, 1]; valid (B,) bool is unused (slices are independent).
  The white Gaussian noise of scoring step i (its index
  in start..stop, so strides share the draws of k = 1) is jax.random.normal(fold_in(rng, i)) of
  the batch shape; the reference scores with white noise (its eval config has pyramid=False)
  whatever model.pyramid says. Returns float32 (B, H, W), 0 where 2·image - 1 == -1.
  """
  del valid
  t, s, i = score_times(config)

  def noise_of_step(step):
    return jax.random.normal(jax.random.fold_in(rng, step["i"]), images.shape, jnp.float32)

  maps, _ = _score_loop(config, params, images, noise_of_step,
                        {"t": jnp.asarray(t), "s": jnp.asarray(s), "i": jnp.asarray(i)},
                        keep_steps=False)
  return maps


def score_slices_with_noise(config, params, images: jnp.ndarray, noise: jnp.ndarray):
  """`score_slices` with injected ε: noise (steps, B, H, W, 1), one slice per scoring step.

  Returns (maps (B, H, W), per_step_d (steps, B, H, W)) for parity tests.
  """
  t, s, _ = score_times(config)
  if noise.shape[0] != t.shape[0] or noise.shape[1:] != images.shape:
    raise ValueError(f"noise shape {noise.shape}: expected ({t.shape[0]},) + {images.shape}")
  return _score_loop(config, params, images, lambda step: step["noise"],
                     {"t": jnp.asarray(t), "s": jnp.asarray(s), "noise": noise}, keep_steps=True)


def sample(config, params, rng: jax.Array, num_images: int) -> jnp.ndarray:
  """Monitoring previews from the EMA `params`: (num_images, H, W, C) float32 in [0, 1].

  config.sampling.sampler 'ancestral' (the reference's) or 'ddim'; preview_steps network
  evaluations (default N = 1000, as the reference). Prior and ancestral noise follow
  model.pyramid, as in the reference's sampler.
  """
  model = build_model(config)
  name = config.sampling.get("sampler", "ancestral").lower()
  if name not in SAMPLERS:
    raise ConfigError(f"sampling.sampler {name!r}: expected one of {sorted(SAMPLERS)}")
  steps = config.sampling.get("preview_steps", config.diffusion.num_latents)
  shape = (num_images, model.image_size, model.image_size, model.in_channels)

  def model_fn(z, t):
    return model.apply({"params": params}, z, t, train=False)

  x = SAMPLERS[name](model_fn, _logsnr_fn(config), _training_noise_fn(config), rng, shape, steps)
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


def preview(config, state: train_state.TrainState, batch: dict, rng: jax.Array) -> dict:
  """TensorBoard images at a snapshot: training.preview_images samples of the EMA model."""
  del batch
  return {"samples": sample(config, state.ema_params, rng, config.training.preview_images)}


def scoring_params(config, states: dict, artifacts: dict):
  """ANDi scores with the EMA weights of its one stage."""
  del config, artifacts
  return states["model"].ema_params


def network_evaluations(config) -> float:
  """Network evaluations per scored slice: one per kept scoring step."""
  return float(score_times(config)[0].size)


METHOD = contract.Method(
    name="andi", score=score_slices, scoring_params=scoring_params,
    stages=(contract.Stage(name="model", init=init_state, train_step=train_step,
                           preview=preview),),
    network_evaluations=network_evaluations)
