"""FAE (Structural Feature-Autoencoder; Meissen et al. 2022): the method's pure functions.

A frozen ImageNet CNN maps each slice to multi-scale features F (taps `model.layers`, each
resized to featmap_size² with bilinear align_corners=True and concatenated); a convolutional
autoencoder (`networks/feature_autoencoder.py`) is trained on healthy slices to reconstruct F
under 1 − SSIM (Gaussian window 5, 'valid'). A slice's anomaly map is 1 − mean over channels of
SSIM(R, F) (window 11, zero-padded 'same'), resized to the slice with align_corners=True and
0 wherever the input is exactly 0. Spec: `methods/fae.md`.

The backbone lives in `TrainState.frozen` (no optimiser state, no weight decay, no gradients);
the autoencoder's BatchNorm statistics in `TrainState.batch_stats`. No EMA: scoring uses the
trained weights and running statistics, as the reference.

Config keys read (ml_collections.ConfigDict):
  model.{backbone, layers, backbone_weights, allow_random_backbone, backbone_precision,
    normalize}: the frozen feature extractor (`networks/feature_extractor.py`);
  model.{featmap_size, channels, dropout}: the autoencoder;
  model.loss_window_size, model.score_window_size: SSIM windows of the loss and of the map;
  optim.*: `engine/optim.py` (AdamW, constant lr); training.compute_dtype: the autoencoder's
  computation (parameters, BatchNorm statistics and SSIM stay float32);
  training.preview_images: training slices and maps written to TensorBoard at snapshots.
"""

import jax
import jax.numpy as jnp

from uad_jax.engine.optim import make_optimizer
from uad_jax.engine.train_state import TrainState
from uad_jax.methods import contract
from uad_jax.networks import feature_extractor
from uad_jax.networks.feature_autoencoder import FeatureAutoencoder, check_featmap_size
from uad_jax.ops.resize import resize_bilinear
from uad_jax.ops.ssim import ssim_loss, ssim_map

STAGE = "autoencoder"
_PROBE_SIZE = 64   # any size: only the tap channel counts are read


def autoencoder(config) -> FeatureAutoencoder:
  m = config.model
  dtype = jnp.dtype(config.get("training", {}).get("compute_dtype", "float32"))
  return FeatureAutoencoder(tuple(m.channels), m.dropout, dtype=dtype)


def backbone_module(config):
  """The frozen backbone of `config.model` without variables (converters, shapes)."""
  return feature_extractor.backbone_module(config.model)


def feature_channels(config) -> int:
  """C, the channel count of F: the sum of the tap channels (256 for resnet18's taps)."""
  module = backbone_module(config)
  probe = jax.ShapeDtypeStruct((1, _PROBE_SIZE, _PROBE_SIZE, 3), jnp.float32)
  taps = jax.eval_shape(lambda x: module.init_with_output(jax.random.key(0), x)[0], probe)
  return sum(taps[name].shape[-1] for name in config.model.layers)


def features(config, backbone_variables, images: jax.Array) -> jax.Array:
  """F of grey slices: float32 (B, H, W, 1) in [0, 1] -> (B, s, s, C), s = model.featmap_size.

  One backbone evaluation (inference-mode BatchNorm, gradients stopped); every tap resized with
  bilinear align_corners=True (the identity for taps already s x s) and concatenated in
  `model.layers` order.
  """
  s = config.model.featmap_size
  taps = feature_extractor.extract(config.model, backbone_variables, images)
  return feature_extractor.resize_and_concat(taps, s, s, align_corners=True)


def reconstruction_loss(config, feats: jax.Array, recon: jax.Array) -> jax.Array:
  """Training loss 1 − mean SSIM(F, R), window model.loss_window_size, 'valid' (scalar)."""
  return ssim_loss(feats, jnp.asarray(recon, jnp.float32), window=config.model.loss_window_size,
                   padding="valid")


def neg_ssim_channel_mean(config, feats: jax.Array, recon: jax.Array) -> jax.Array:
  """−SSIM(R, F) per pixel (window model.score_window_size, zero padding 'same'), averaged over
  channels: (B, s, s) float32. The zero padding lowers the border values; the reference keeps
  it."""
  neg = -ssim_map(jnp.asarray(recon, jnp.float32), feats, window=config.model.score_window_size,
                  padding="same")
  return jnp.mean(neg, axis=-1)


def anomaly_maps(config, feats: jax.Array, recon: jax.Array, images: jax.Array) -> jax.Array:
  """Maps (B, H, W) of slices (B, H, W, 1) from their F and R (B, s, s, C).

  a = mean_c −SSIM(R, F), resized to (H, W) (bilinear, align_corners=True), set to −1 where
  the input is exactly 0, plus 1: values in [0, 2], exactly 0 on background (also brain voxels
  at the volume minimum, as the reference).
  """
  a = neg_ssim_channel_mean(config, feats, recon)[..., None]
  a = resize_bilinear(a, images.shape[1], images.shape[2], align_corners=True)[..., 0]
  return jnp.where(images[..., 0] == 0.0, -1.0, a) + 1.0


def init(config, rng: jax.Array, ctx: contract.TrainContext) -> TrainState:
  """Frozen backbone (ImageNet weights of model.backbone_weights, or random when allowed) and a
  torch-default-initialised autoencoder with AdamW (`config.optim`)."""
  check_featmap_size(config.model.featmap_size)
  backbone_key, ae_key = jax.random.split(rng)
  _, backbone_variables, _ = feature_extractor.load_frozen_backbone(config.model, backbone_key)
  s = config.model.featmap_size
  probe = jnp.zeros((1, s, s, feature_channels(config)), jnp.float32)
  variables = jax.jit(lambda key: autoencoder(config).init(key, probe, train=False))(ae_key)
  tx, lr = make_optimizer(config.optim, ctx.steps_per_epoch)
  return TrainState.create(variables["params"], tx, lr, ema=False,
                           batch_stats=variables["batch_stats"], frozen=backbone_variables)


def train_step(config, state: TrainState, batch: dict, rng: jax.Array):
  """One AdamW step on 1 − SSIM_5(F, R) of batch["image"] (B, H, W, 1) in [0, 1].

  The autoencoder runs in train mode: BatchNorm batch statistics (running statistics updated
  with torch's rule) and Dropout2d drawn from `rng`. Returns (state, {"loss"}).
  """
  feats = features(config, state.frozen, batch["image"])
  model = autoencoder(config)

  def loss_fn(params):
    recon, updates = model.apply({"params": params, "batch_stats": state.batch_stats}, feats,
                                 train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
    return reconstruction_loss(config, feats, recon), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads, batch_stats=batch_stats), {"loss": loss}


def _score_variables(state: TrainState) -> dict:
  return {"ae": state.params, "batch_stats": state.batch_stats, "backbone": state.frozen}


def score(config, params: dict, images: jax.Array, valid: jax.Array, rng: jax.Array):
  """FAE maps (B, H, W) float32 of slices (B, H, W, 1) in [0, 1] (deterministic: one backbone
  and one eval-mode autoencoder pass per slice; `valid` and `rng` are unused)."""
  del valid, rng
  feats = features(config, params["backbone"], images)
  recon = autoencoder(config).apply({"params": params["ae"], "batch_stats": params["batch_stats"]},
                                    feats, train=False)
  return anomaly_maps(config, feats, recon, images)


def scoring_params(config, states: dict, artifacts: dict) -> dict:
  """{'ae', 'batch_stats', 'backbone'} of the trained stage (no EMA in FAE)."""
  del config, artifacts
  return _score_variables(states[STAGE])


def preview(config, state: TrainState, batch: dict, rng: jax.Array) -> dict:
  """The first training.preview_images slices of the batch beside their current maps / 2."""
  n = config.training.preview_images
  images = batch["image"][:n]
  maps = score(config, _score_variables(state), images, None, rng)
  return {"input": images[..., 0], "anomaly_map": jnp.clip(maps / 2.0, 0.0, 1.0)}


def warnings(config) -> list[str]:
  """The random-backbone warning of a run without ImageNet weights (else none)."""
  return feature_extractor.random_weights_warnings(config.model)


METHOD = contract.Method(
    name="fae",
    score=score,
    scoring_params=scoring_params,
    stages=(contract.Stage(name=STAGE, init=init, train_step=train_step, preview=preview),),
    scoring_mode="slice",
    network_evaluations=lambda config: 1.0,
    warnings=warnings,
)
