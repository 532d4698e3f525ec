"""IterMask (Liang et al. 2024): the method's functions and its `METHOD` (spec `methods/itermask.md`).

Two BatchNorm DDPM++ U-Nets are trained on healthy slices in the ±3 intensity scale (6x − 3):
stage 'first' reconstructs a slice from its high-frequency condition, stage 'ae' inpaints
randomly hidden brain regions (masked pixels replaced by N(0, 1) noise) given the masked slice
and the condition. Calibration estimates `validation_thr` (the 80th percentile of the AE's
error on hidden healthy pixels); scoring runs the iterative mask shrinking (`scoring.py`).

Config keys read (ml_collections.ConfigDict):
  model.{nf, ch_mult, num_res_blocks, attn_resolutions, attn_emb_dim, dropout, dropout_at,
    rescale, embedding_type, nonlinearity, num_channels, norm, conv_weight_grad}: both networks
    (`networks/ddpmpp.py`; the AE gets one more input channel);
  model.ema_rate: cap of the EMA decay min(rate, (1 + n) / (10 + n)) (parameters only: BatchNorm
    statistics are not averaged, as in the reference);
  condition.radius: low-frequency disk radius in pixels (15);
  masks.scale: pixels per reference (1 mm) pixel of the training masks (`masks.py`);
  scoring.{initial_fraction, stop_ratio, max_ae_passes}: the scoring loop (`scoring.py`);
  scoring.validation_thr: a fixed threshold (e.g. the reference's printed 0.0022 for T1 with an
    imported reference checkpoint) used when no calibrated one is stored; None: calibrate;
  data.image_size: network input (centre crop of the stored slices); data.batch_size;
  optim.*: `engine/optim.py`; training.{n_iters, ae_n_iters}: steps of stage 'first' / 'ae';
  training.compute_dtype: 'float32' | 'bfloat16' (parameters and BatchNorm stay float32).
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.data.splits import read_split
from uad_jax.data.volume_loader import iterate_volumes
from uad_jax.data.volumes import center_crop_pad
from uad_jax.engine import sharding
from uad_jax.engine.optim import make_optimizer
from uad_jax.engine.train_state import TrainState
from uad_jax.errors import ConfigError, DataError
from uad_jax.methods import contract
from uad_jax.methods.itermask.condition import high_frequency_condition
from uad_jax.methods.itermask.masks import gen_mask
from uad_jax.methods.itermask.scoring import LoopSettings, iterative_maps
from uad_jax.networks.ddpmpp import DDPMpp, ddpmpp_from_config

log = logging.getLogger(__name__)

VALUE_RANGE = (-3.0, 3.0)   # the reference's x = 6·x01 − 3: brain in (−3, 3], background −3
STAGES = ("first", "ae")
INPUT_CHANNELS = {"first": 1, "ae": 2}   # condition | [masked image, condition]


def build_model(config, stage: str) -> DDPMpp:
  """The U-Net of `stage` ('first' or 'ae'): BatchNorm DDPM++, 1 output channel."""
  if stage not in STAGES:
    raise ConfigError(f"IterMask stage {stage!r}: expected one of {STAGES}")
  if config.model.get("norm", "group") != "batch":
    raise ConfigError("model.norm must be 'batch' for IterMask (its U-Net uses BatchNorm)")
  dtype = jnp.dtype(config.training.get("compute_dtype", "float32"))
  return ddpmpp_from_config(config.model, config.data.image_size, dtype,
                            in_channels=INPUT_CHANNELS[stage])


def _condition(config, x):
  return high_frequency_condition(x, config.condition.radius)


def network_input(config, stage: str, x, mask=None, noise=None):
  """The network input of `stage` for slices x (B, H, W, 1) in the ±3 scale: the condition
  ('first'), or [(1 − m)·x + m·noise, condition] ('ae'; m = hidden mask (B, H, W, 1))."""
  condition = _condition(config, x)
  if stage == "first":
    return condition
  return jnp.concatenate([(1.0 - mask) * x + mask * noise, condition], axis=-1)


# ------------------------------------------------------------------------------------ training


def _init(stage, config, rng, ctx: contract.TrainContext) -> TrainState:
  """Spec initialisation (output ≡ 0), BatchNorm statistics 0/1, AdamW, EMA = params."""
  model = build_model(config, stage)
  size = config.data.image_size
  shape = (1, size, size, INPUT_CHANNELS[stage])
  variables = jax.jit(lambda key: model.init({"params": key}, jnp.zeros(shape), None,
                                             train=False))(rng)
  tx, lr = make_optimizer(config.optim, ctx.steps_per_epoch)
  return TrainState.create(variables["params"], tx, lr, ema=True,
                           batch_stats=variables["batch_stats"])


def _train_step(stage, config, state: TrainState, batch: dict, rng):
  """One AdamW step on mean((x − G(input))²) over all pixels, then EMA and BatchNorm stats.

  batch: 'image' (B, H, W, 1) in the ±3 scale; stage 'ae' also 'mask' (B, H, W, 1) float32,
  1 = hidden brain pixel (`ae_batch_transform`). `rng` draws the AE's mask noise and dropout.
  BatchNorm normalises with the batch statistics and updates its running statistics (torch rule).
  """
  model = build_model(config, stage)
  x = batch["image"].astype(jnp.float32)
  noise_key, dropout_key = jax.random.split(rng)
  noise = jax.random.normal(noise_key, x.shape, jnp.float32) if stage == "ae" else None
  inputs = network_input(config, stage, x, batch.get("mask"), noise)

  def loss_fn(params):
    y, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, inputs, None,
                             train=True, rngs={"dropout": dropout_key}, mutable=["batch_stats"])
    return jnp.mean(jnp.square(x - y)), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads, ema_rate=config.model.ema_rate, batch_stats=batch_stats)
  return state, {"loss": loss}


def corrupt_batch(config, images: np.ndarray, rng: np.random.Generator) -> dict:
  """Training masks of stage 'ae', on the host: images (B, H0, W0, 1) float32 in the ±3 scale
  at the stored size -> {'image': (B, S, S, 1), 'mask': (B, S, S, 1) float32}, S =
  data.image_size, mask = 1 on hidden brain pixels.

  As the reference (§2.4, §2.6), the keep map is drawn at the stored size (brain = x > −3, i.e.
  x01 > 0) and image, keep map and brain are centre-cropped afterwards; hidden = (1 − K)·brain.
  Where the crop pads (stored size < S) the image is background (−3) and nothing is hidden.
  """
  size = config.data.image_size
  brain = images[..., 0] > VALUE_RANGE[0]
  keep = np.stack([gen_mask(b, rng, config.masks.scale) for b in brain])
  hidden = (1.0 - keep) * brain
  inside = center_crop_pad(np.ones(images.shape[1:3], bool), size)
  image = np.where(inside[None, :, :, None], center_crop_pad(images, size, axes=(1, 2)),
                   np.float32(VALUE_RANGE[0]))
  mask = center_crop_pad(hidden, size)[..., None]
  return {"image": image.astype(np.float32), "mask": mask.astype(np.float32)}


def ae_batch_transform(config, artifacts):
  """Stage 'ae' `batch_transform`: `corrupt_batch` on each batch of stored-size slices."""
  del artifacts
  return lambda batch, rng: corrupt_batch(config, batch["image"], rng)


def _preview(stage, config, state: TrainState, batch: dict, rng):
  """Network input(s) beside the EMA reconstruction, eval mode, mapped to [0, 1]."""
  n = config.training.preview_images
  model = build_model(config, stage)
  x = batch["image"][:n].astype(jnp.float32)
  mask = batch["mask"][:n] if stage == "ae" else None
  noise = jax.random.normal(rng, x.shape, jnp.float32) if stage == "ae" else None
  inputs = network_input(config, stage, x, mask, noise)
  y = model.apply({"params": state.ema_params, "batch_stats": state.batch_stats}, inputs, None,
                  train=False)
  to01 = lambda v: jnp.clip((v[..., 0] - VALUE_RANGE[0]) / (VALUE_RANGE[1] - VALUE_RANGE[0]),
                            0.0, 1.0)
  images = {"image": to01(x), "reconstruction": to01(y)}
  if stage == "ae":
    images["masked_input"] = to01(inputs[..., :1])
  else:
    # The condition is not in the ±3 range: min-max per image for display.
    c = inputs[..., 0]
    lo, hi = c.min(axis=(1, 2), keepdims=True), c.max(axis=(1, 2), keepdims=True)
    images["condition"] = (c - lo) / jnp.maximum(hi - lo, 1e-12)
  return images


# ------------------------------------------------------------------------------------- scoring


def loop_settings(config, trace: int = 0) -> LoopSettings:
  s = config.scoring
  return LoopSettings(initial_fraction=s.initial_fraction, stop_ratio=s.stop_ratio,
                      max_passes=s.max_ae_passes, trace=trace)


def _network_fn(config, stage, variables):
  model = build_model(config, stage)
  return lambda inputs: model.apply(variables, inputs, None, train=False)


def scoring_params(config, states: dict, artifacts: dict) -> dict:
  """{'first', 'ae': {'params': EMA parameters, 'batch_stats': the raw model's running
  statistics (the reference's EMA never covers buffers)}, 'validation_thr': float32}.

  validation_thr: the calibrated one (`artifacts`), else `scoring.validation_thr`, else NaN
  (before calibration: `calibrate` does not use it; scoring with NaN would stop every slice
  after its first AE pass)."""
  missing = [s for s in STAGES if s not in states]
  if missing:
    raise ConfigError(f"IterMask scoring needs the trained stages {STAGES}; missing {missing}")
  thr = artifacts.get("validation_thr", config.scoring.validation_thr)
  params = {s: {"params": states[s].ema_params, "batch_stats": states[s].batch_stats}
            for s in STAGES}
  params["validation_thr"] = np.float32(np.nan if thr is None else thr)
  return params


def score_chunk(config, params, images, valid, noise_of_pass, trace: int = 0) -> dict:
  """`iterative_maps` of one chunk: images (S, H, W, 1) in [0, 1], valid (S,) bool;
  noise_of_pass(j) -> (S, H, W, 1). Returns its dict (maps, passes = AE passes made,
  first_output, traces). x = 6·image − 3 as the reference; XLA:CPU fuses it into one fused
  multiply-add, which can round 1 ulp away from the reference's two roundings (the fixture
  tolerance covers it; masks only change at exact ties)."""
  x = images.astype(jnp.float32) * jnp.float32(VALUE_RANGE[1] - VALUE_RANGE[0]) + jnp.float32(
      VALUE_RANGE[0])
  return iterative_maps(_network_fn(config, "first", params["first"]),
                        _network_fn(config, "ae", params["ae"]), x, valid,
                        _condition(config, x), params["validation_thr"], noise_of_pass,
                        loop_settings(config, trace))


def _log_passes(passes, slices):
  log.info("itermask: %d AE passes on a chunk of %d slices with brain", passes, slices)


def score(config, params, images, valid, rng):
  """Anomaly maps (S, H, W) of one chunk (all slices of a volume in order): the squared error of
  the last accepted AE reconstruction on the brain. The noise of AE pass j is
  normal(fold_in(rng, j)) of the chunk's shape. The chunk's AE pass count (data-dependent) is
  logged."""
  noise = lambda j: jax.random.normal(jax.random.fold_in(rng, j), images.shape, jnp.float32)
  out = score_chunk(config, params, images, valid, noise)
  jax.debug.callback(_log_passes, out["passes"], jnp.sum(jnp.any(images > 0, axis=(1, 2, 3))))
  return out["maps"]


# --------------------------------------------------------------------------------- calibration


def kth_value_threshold(masked_errors: np.ndarray, total: int) -> float:
  """The reference's `validation_thr` (spec §2.8): the k-th smallest (1-based) of the T = `total`
  values E·m over all validation pixels, k = int(T − 0.2·Σm), in exact integer arithmetic
  ([OURS]: the reference's float32 k loses precision once T > 2²⁴). masked_errors: the E values
  of the M = Σm hidden pixels (>= 0). The other T − M values are 0 and sort first."""
  m = masked_errors.size
  k = (5 * total - m) // 5
  rank = k - (total - m)
  if rank <= 0:
    return 0.0
  return float(np.partition(masked_errors, rank - 1)[rank - 1])


def _ae_errors(config, params, images, masks, key):
  """(B, H, W) squared AE errors of corrupted slices (eval mode): (x − G(input))²."""
  noise = jax.random.normal(key, images.shape, jnp.float32)
  inputs = network_input(config, "ae", images, masks, noise)
  return jnp.square(images - _network_fn(config, "ae", params["ae"])(inputs))[..., 0]


def calibrate(config, params, mesh, rng) -> dict:
  """`validation_thr` from the healthy validation volumes (eval.val_healthy_csv), spec §2.8.

  Every slice with brain is corrupted exactly as in training (`corrupt_batch`: masks drawn at
  the stored size, then cropped; host generator seeded by (seed, volume index)), the EMA AE
  reconstructs it (eval mode; noise fold_in(rng, chunk)), and the threshold is the k-th value of
  the errors on hidden pixels over the whole set (`kth_value_threshold`). Chunks of
  eval.split_size slices are sharded over the mesh; every process computes the same threshold.
  """
  csv = config.eval.val_healthy_csv
  if not csv:
    raise ConfigError("eval.val_healthy_csv is empty: IterMask's validation_thr is calibrated "
                      "on the healthy validation volumes")
  size = config.data.image_size
  split = -(-config.eval.split_size // mesh.size) * mesh.size
  batch_sharding = sharding.batch_sharded(mesh)
  share = split // jax.process_count()
  part = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
  errors_fn = jax.jit(functools.partial(_ae_errors, config),
                      out_shardings=sharding.replicated(mesh))
  masked, total, chunk = [], 0, 0
  volumes = iterate_volumes(read_split(csv), image_size=None, require_masks=False,
                            clip_percentiles=config.data.clip_percentiles,
                            data_type=config.data.modality)
  for v, volume in enumerate(volumes):
    slices = volume.image[volume.image.reshape(volume.image.shape[0], -1).max(axis=1) > 0]
    x = slices[..., None] * np.float32(VALUE_RANGE[1] - VALUE_RANGE[0]) + np.float32(
        VALUE_RANGE[0])
    corrupted = corrupt_batch(config, x, np.random.default_rng([config.seed, v]))
    for start in range(0, x.shape[0], split):
      n = min(split, x.shape[0] - start)
      padded = {k: np.zeros((split, size, size, 1), np.float32) for k in corrupted}
      for k in corrupted:
        padded[k][:n] = corrupted[k][start:start + n]
      images, masks = (jax.make_array_from_process_local_data(batch_sharding, padded[k][part],
                                                              padded[k].shape)
                       for k in ("image", "mask"))
      e = np.asarray(jax.device_get(errors_fn(params, images, masks,
                                              jax.random.fold_in(rng, chunk))))[:n]
      hidden = padded["mask"][:n, ..., 0] > 0
      masked.append(e[hidden])
      total += e.size
      chunk += 1
  if total == 0:
    raise DataError(f"{csv}: no slice with brain in the healthy validation volumes")
  masked = np.concatenate(masked)
  return {"validation_thr": kth_value_threshold(masked, total),
          "validation_pixels": int(total), "validation_hidden_pixels": int(masked.size)}


def network_evaluations(config) -> float:
  """1 first-model + J AE evaluations per slice; J is data-dependent (chunk-wide pass count,
  `score_chunk`'s 'passes'); this is the minimum (J = 1) of a chunk with brain."""
  del config
  return 2.0


def _stage(name, **kw) -> contract.Stage:
  return contract.Stage(name=name, init=functools.partial(_init, name),
                        train_step=functools.partial(_train_step, name),
                        preview=functools.partial(_preview, name),
                        value_range=lambda config: VALUE_RANGE, **kw)


METHOD = contract.Method(
    name="itermask",
    stages=(
        _stage("first"),
        # Masks are drawn at the stored size and cropped afterwards (spec §2.1 PITFALL): the feed
        # does not crop, `ae_batch_transform` does.
        # Reference bug (spec §4.1): stage 2 runs steps 0..99999, never saves checkpoint_20, and
        # evaluation loads checkpoint_20. As the spec recommends, stage 'ae' runs steps 1..n like
        # stage 'first', so its final checkpoint (step n = 100000) is the one scored.
        _stage("ae", batch_transform=ae_batch_transform, train_crop=lambda config: None,
               n_iters=lambda config: config.training.ae_n_iters),
    ),
    score=score,
    scoring_params=scoring_params,
    scoring_mode="chunk",
    calibrate=calibrate,
    network_evaluations=network_evaluations,
)
