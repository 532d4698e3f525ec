"""DISYRE (Naval Marimont et al., ISBI 2024; the ensembled v2 the benchmark runs): the method.

Training (spec `methods/disyre.md` §2): healthy slices are augmented to P×P patches on the host
(`augment.py`), a 'dag' synthetic anomaly of random severity α is inserted (`anomaly.py`), α is
mapped to an integer label (`severity.py`) and the shared DDPM++ U-Net, conditioned on the label
as its (float) time input, is trained to output the clean patch (x₀ MSE in [-1, 1]); AdamW, EMA.
Scoring (§3): each slice is restored in one step under each conditioning t of
arange(N, 0, -N/n_steps) - 1 (99, 74, 49, 24) with a P×P sliding window (`sliding_window.py`);
the map is the mean |x - x̂₀| over the conditionings (in [-1, 1] units), times the slice's brain
fraction, 0 on background.

Config keys read (ml_collections.ConfigDict):
  model.{nf, ch_mult, num_res_blocks, attn_resolutions, attn_emb_dim, dropout, dropout_at,
    rescale, embedding_type, nonlinearity, num_channels, conv_weight_grad}: the network
    (`networks/ddpmpp.py`), built for data.patch_size inputs; model.ema_rate: EMA cap;
  diffusion.{num_latents, beta_min, beta_max}: the severity schedule;
  data.{patch_size, anom_patch_size, codebook, codebook_voxels, shape_dataset, p_anomaly,
    no_anom_in_background, image_size}: feed, anomaly and codebook; data.image_size is the
    evaluation crop (224 in the paper), not the network input;
  augment.{p_elastic, p_rotation, p_scale, p_brightness, p_gamma, p_inverted_gamma, p_noise,
    p_blur}; optim (`engine/optim.py`);
  sampling.{n_steps, window_step}: scoring conditionings and window step fraction;
  eval.sw_batch_size: about this many windows per network call when scoring (`restorations`);
    training.{compute_dtype,
    preview_images}.
"""

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.engine import optim, train_state
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.methods.disyre import anomaly, augment, codebook, severity
from uad_jax.methods.disyre import sliding_window as sw
from uad_jax.networks.ddpmpp import DDPMpp, ddpmpp_from_config

STAGE = "disyre"


def build_model(config) -> DDPMpp:
  """The DDPM++ U-Net for data.patch_size inputs (compute dtype training.compute_dtype)."""
  dtype = jnp.dtype(config.get("training", {}).get("compute_dtype", "float32"))
  return ddpmpp_from_config(config.model, config.data.patch_size, dtype)


# -- training -----------------------------------------------------------------------------------

def init(config, rng: jax.Array, ctx: contract.TrainContext) -> train_state.TrainState:
  """Fresh state: the network's initialisation (output ≡ 0), AdamW, EMA = params."""
  model = build_model(config)
  p, c = model.image_size, model.in_channels
  params = jax.jit(lambda key: model.init({"params": key}, jnp.zeros((1, p, p, c)),
                                          jnp.zeros((1,)), train=False)["params"])(rng)
  tx, lr = optim.make_optimizer(config.optim, ctx.steps_per_epoch)
  return train_state.TrainState.create(params, tx, lr, ema=True)


def x0_loss(model: DDPMpp, params, clean, corrupted, labels, train: bool, dropout_rng=None):
  """mean over batch and pixels of (f(2·corrupted - 1, label) - (2·clean - 1))²; returns
  (loss, x̂₀). clean/corrupted (B, P, P, C) in [0, 1]; labels (B,) int (fed as float)."""
  x = 2.0 * clean.astype(jnp.float32) - 1.0
  x_c = 2.0 * corrupted.astype(jnp.float32) - 1.0
  rngs = {"dropout": dropout_rng} if train else {}
  x0 = model.apply({"params": params}, x_c, labels.astype(jnp.float32), train=train, rngs=rngs)
  return jnp.mean((x0 - x) ** 2), x0


def train_step(config, state: train_state.TrainState, batch: dict, rng: jax.Array):
  """One AdamW step on the x₀ MSE (dropout on), then the EMA update.

  batch: 'image' (clean) and 'corrupted' (B, P, P, 1) float32 in [0, 1], 'label' (B,) int32
  (`batch_transform`). Returns (state, {'loss', 'mean_label'}).
  """
  model = build_model(config)

  def loss_fn(params):
    return x0_loss(model, params, batch["image"], batch["corrupted"], batch["label"], True,
                   rng)[0]

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  state = state.apply_gradients(grads, ema_rate=config.model.ema_rate)
  return state, {"loss": loss, "mean_label": jnp.mean(batch["label"].astype(jnp.float32))}


def batch_transform(config, artifacts: dict):
  """The host-side training feed: stored slices -> augmented clean P×P patches + 'dag' anomaly.

  Returns f({'image': (B, H, W, 1) float32 in [0, 1], uncropped}, Generator) ->
  {'image': clean (B, P, P, 1), 'corrupted': (B, P, P, 1) float32, 'label': (B,) int32}.
  """
  if "codebook" not in artifacts:
    raise ConfigError("DISYRE's batch transform needs the prepared 'codebook' artefact "
                      "(WORKDIR/artifacts.json, written by Method.prepare)")
  aug_cfg = augment.AugmentConfig.from_config(config.augment)
  shape_masks = (anomaly.load_shape_masks(config.data.shape_dataset)
                 if config.data.shape_dataset else None)
  anom_cfg = anomaly.AnomalyConfig(
      patch=config.data.anom_patch_size, codebook=np.asarray(artifacts["codebook"], np.float64),
      p_anomaly=config.data.p_anomaly, shape_masks=shape_masks,
      no_anom_in_background=config.data.no_anom_in_background)
  schedule = severity.schedule_of(config)
  patch = config.data.patch_size

  def transform(batch: dict, rng: np.random.Generator) -> dict:
    clean = augment.augment_batch(list(batch["image"][..., 0]), patch, rng, aug_cfg)
    corrupted, alpha_tex, alpha_bias = anomaly.dag_anomalies(clean, anom_cfg, rng)
    return {"image": clean[..., None], "corrupted": corrupted[..., None],
            "label": severity.severity_labels(alpha_tex, alpha_bias, schedule)}

  return transform


def preview(config, state: train_state.TrainState, batch: dict, rng: jax.Array) -> dict:
  """Corrupted inputs, their one-step restorations by the EMA network at their own label, and
  the clean targets: {tag: (N, P, P) in [0, 1]}. Replaces the reference's monitoring sampler,
  which crashes right after the first checkpoint (spec §4.3)."""
  del rng
  n = config.training.preview_images
  model = build_model(config)
  _, x0 = x0_loss(model, state.ema_params, batch["image"][:n], batch["corrupted"][:n],
                  batch["label"][:n], False)
  return {"corrupted": batch["corrupted"][:n, ..., 0],
          "restored": jnp.clip((x0[..., 0] + 1.0) / 2.0, 0.0, 1.0),
          "clean": batch["image"][:n, ..., 0]}


# -- scoring ------------------------------------------------------------------------------------

def timesteps(config) -> np.ndarray:
  """The scoring conditionings (int32), from diffusion.num_latents and sampling.n_steps."""
  return severity.scoring_timesteps(config.diffusion.num_latents, config.sampling.n_steps)


def layout_of(config, height: int, width: int) -> sw.WindowLayout:
  patch = config.data.patch_size
  return sw.window_layout(height, width, patch, sw.window_step(patch, config.sampling.window_step))


def restorations(model: DDPMpp, params, x: jnp.ndarray, ts: np.ndarray, layout: sw.WindowLayout,
                 windows_per_call: int) -> jnp.ndarray:
  """One-step sliding-window restorations of x (B, H, W, 1) in [-1, 1] under every t in ts.

  The T·n_windows network inputs of each slice (every window under every conditioning) are
  evaluated k = ceil(windows_per_call / B) per slice at a time, i.e. about windows_per_call
  windows per network call (the reference's sw_batch_size: 155 slices, 310 windows -> 32
  calls), in a lax.map (bounded memory). The slice axis stays the leading axis of every call,
  so a batch sharded over devices stays sharded. Returns (T, B, H, W, 1) float32.
  """
  windows = sw.extract_windows(x, layout)                        # (B, n, P, P, C)
  b, n = windows.shape[:2]
  m = len(ts) * n
  inputs = jnp.broadcast_to(windows[:, None], (b, len(ts)) + windows.shape[1:])
  inputs = inputs.reshape((b, m) + windows.shape[2:])            # per slice: (t, window) pairs
  t = jnp.broadcast_to(jnp.repeat(jnp.asarray(ts, jnp.float32), n)[None], (b, m))
  k = min(m, max(1, -(-windows_per_call // b)))
  calls = -(-m // k)
  pad = calls * k - m
  inputs = jnp.pad(inputs, ((0, 0), (0, pad)) + ((0, 0),) * 3)
  t = jnp.pad(t, ((0, 0), (0, pad)))
  inputs = jnp.moveaxis(inputs.reshape((b, calls, k) + inputs.shape[2:]), 1, 0)
  t = jnp.moveaxis(t.reshape(b, calls, k), 1, 0)

  def call(a):
    w, tt = a                                                    # (B, k, P, P, C), (B, k)
    y = model.apply({"params": params}, w.reshape((-1,) + w.shape[2:]), tt.reshape(-1),
                    train=False)
    return y.reshape(w.shape)

  out = jnp.moveaxis(jax.lax.map(call, (inputs, t)), 0, 1)       # (B, calls, k, P, P, C)
  out = out.reshape((b, calls * k) + out.shape[3:])[:, :m]
  out = jnp.moveaxis(out.reshape((b, len(ts), n) + out.shape[2:]), 1, 0)   # (T, B, n, ...)
  return sw.fold_windows(out, layout)


def anomaly_maps(x: jnp.ndarray, restored: jnp.ndarray) -> jnp.ndarray:
  """mean_t |x - x̂₀,t| times the slice's brain fraction w = mean(x > -1), 0 where x == -1.

  x: (B, H, W, 1) in [-1, 1]; restored: (T, B, H, W, 1). Returns (B, H, W) float32.
  """
  residual = jnp.mean(jnp.abs(x[None] - restored), axis=0)
  brain_fraction = jnp.mean((x > -1.0).astype(jnp.float32), axis=(1, 2, 3), keepdims=True)
  return jnp.where(x == -1.0, 0.0, residual * brain_fraction)[..., 0]


def score(config, params, images: jnp.ndarray, valid: jnp.ndarray, rng: jax.Array):
  """DISYRE maps of slices (B, H, W, 1) in [0, 1] with the EMA params -> (B, H, W) float32.

  Deterministic (rng unused); padding slices (valid False) are scored like any other.
  """
  del valid, rng
  x = 2.0 * images.astype(jnp.float32) - 1.0
  layout = layout_of(config, x.shape[1], x.shape[2])
  restored = restorations(build_model(config), params, x, timesteps(config), layout,
                          config.eval.sw_batch_size)
  return anomaly_maps(x, restored)


def scoring_params(config, states: dict, artifacts: dict):
  """The EMA weights (the reference scores its EMA)."""
  del config, artifacts
  return states[STAGE].ema_params


def network_evaluations(config) -> float:
  """Window forwards per scored slice: windows of a data.image_size slice × conditionings."""
  size = config.data.image_size
  return float(layout_of(config, size, size).num_windows * len(timesteps(config)))


def warnings(config) -> list:
  if config.data.shape_dataset:
    return []
  return ["DISYRE: no shape dataset (data.shape_dataset) — synthetic anomalies use squares and "
          "spheres only (1:1); the reference also draws masks of an unshipped shape dataset"]


METHOD = contract.Method(
    name="disyre", score=score, scoring_params=scoring_params,
    stages=(contract.Stage(name=STAGE, init=init, train_step=train_step,
                           batch_transform=batch_transform, train_crop=lambda config: None,
                           preview=preview),),
    prepare=codebook.prepare, network_evaluations=network_evaluations, warnings=warnings)
