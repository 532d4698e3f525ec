"""UniAD (You et al., NeurIPS 2022) as the reference runs it: the method's pure functions.

A frozen ImageNet CNN (EfficientNet-B4, stages 1-4) turns a slice into feature maps; they are
resized to a `feature_size`² grid (bilinear, align_corners=True) and concatenated on channels,
giving F (B, fs, fs, C). A neighbour-masked transformer (`networks/uniad_transformer.py`)
reconstructs F from jittered tokens during training (MSE to the clean F); the anomaly map is the
per-position L2 norm of R − F, upsampled to the slice (bilinear, align_corners=True) and zeroed
where the slice is exactly 0. Spec: `methods/uniad.md`.

One training stage ('model'): the backbone variables are `TrainState.frozen` (no gradient, no
optimiser state, no weight decay), the transformer the optimised `params`; AdamW with torch's
StepLR by epoch and grad-norm clipping (`engine/optim.py`); no EMA.

Config keys read (ml_collections.ConfigDict):
  model.{backbone, layers, backbone_weights, allow_random_backbone, backbone_precision,
    normalize}: the frozen feature extractor;
  model.{feature_size, hidden_dim, nhead, num_encoder_layers, num_decoder_layers,
    dim_feedforward, dropout, neighbor_size, neighbor_mask, precision}: the transformer;
  model.{feature_jitter, feature_jitter_scale, feature_jitter_prob}: training noise;
  optim.*: `engine/optim.py`; data.image_size.
Only the reference's transformer variant exists here: learned position embedding, ReLU, post-norm.
"""

import jax
import jax.numpy as jnp

from uad_jax.engine import optim, train_state
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.networks import backbones, feature_extractor
from uad_jax.networks.uniad_transformer import UniADTransformer, tie_initial_clones
from uad_jax.ops.resize import resize_bilinear

STAGE_NAME = "model"


def _transformer_precision(m):
  if m.precision not in feature_extractor.PRECISIONS:
    raise ConfigError(f"model.precision={m.precision!r}: expected one of "
                      f"{sorted(feature_extractor.PRECISIONS)}")
  return feature_extractor.PRECISIONS[m.precision]


def build_model(config) -> UniADTransformer:
  """The transformer of `config.model` (feature channels come from its input)."""
  m = config.model
  if len(m.neighbor_mask) != 3:
    raise ConfigError(f"model.neighbor_mask={m.neighbor_mask}: expected 3 switches (encoder, "
                      "decoder first attention, decoder second attention)")
  if m.hidden_dim % m.nhead or m.hidden_dim % 2:
    raise ConfigError(f"model.hidden_dim={m.hidden_dim}: must be even and divisible by "
                      f"model.nhead={m.nhead}")
  return UniADTransformer(
      feature_size=m.feature_size, hidden_dim=m.hidden_dim, num_heads=m.nhead,
      num_encoder_layers=m.num_encoder_layers, num_decoder_layers=m.num_decoder_layers,
      dim_feedforward=m.dim_feedforward, dropout=m.dropout,
      neighbor_size=tuple(m.neighbor_size), neighbor_mask=tuple(bool(b) for b in m.neighbor_mask),
      jitter_scale=m.feature_jitter_scale, precision=_transformer_precision(m))


def feature_channels(config) -> int:
  """C of F: the summed channels of the backbone taps model.layers (224 for B4 stages 1-4)."""
  module = feature_extractor.backbone_module(config.model)
  probe = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  taps = jax.eval_shape(module.apply, backbones.abstract_variables(module), probe)
  return int(sum(taps[name].shape[-1] for name in config.model.layers))


def align_taps(config, taps) -> jnp.ndarray:
  """Backbone taps [(B, h_l, w_l, C_l)] in model.layers order -> F (B, fs, fs, ΣC_l): each
  resized bilinearly with align_corners=True (no antialiasing: sparse sampling when shrinking,
  the identity at fs), concatenated on channels."""
  fs = config.model.feature_size
  return feature_extractor.resize_and_concat(taps, fs, fs, align_corners=True)


def features(config, backbone_variables, images: jnp.ndarray) -> jnp.ndarray:
  """F of grey slices (B, H, W, 1) in [0, 1]: (B, fs, fs, C) float32, no gradient."""
  return align_taps(config, feature_extractor.extract(config.model, backbone_variables, images))


def reconstruction_loss(features: jnp.ndarray, reconstruction: jnp.ndarray) -> jnp.ndarray:
  """nn.MSELoss: mean over every element of (R − F)²."""
  return jnp.mean((reconstruction - features) ** 2)


def residual_norm(features: jnp.ndarray, reconstruction: jnp.ndarray) -> jnp.ndarray:
  """(B, fs, fs, 1) sqrt(Σ_c (R − F)²): the un-squared L2 norm over channels. The paper's
  thresholds (100-150) are on this scale."""
  return jnp.sqrt(jnp.sum((reconstruction - features) ** 2, axis=-1, keepdims=True))


def anomaly_maps(features: jnp.ndarray, reconstruction: jnp.ndarray,
                 images: jnp.ndarray) -> jnp.ndarray:
  """(B, H, W) maps: `residual_norm` upsampled to the slice (B, H, W, 1) with
  align_corners=True (no smoothing), 0 where the slice is exactly 0."""
  h, w = images.shape[1:3]
  maps = resize_bilinear(residual_norm(features, reconstruction), h, w, align_corners=True)
  return jnp.where(images[..., 0] == 0.0, 0.0, maps[..., 0])


def jitter_noise(config, rng: jax.Array, shape: tuple) -> jnp.ndarray | None:
  """ε (B, T, C) of one training step, or None when model.feature_jitter is off.

  The reference draws a host-side uniform per step and jitters when it is <= prob (always at
  prob 1.0); here that draw comes from `rng` too, and a skipped step gets ε = 0 (no jitter).
  """
  m = config.model
  if not m.feature_jitter:
    return None
  apply_key, noise_key = jax.random.split(rng)
  apply = jax.random.uniform(apply_key) <= m.feature_jitter_prob
  return jnp.where(apply, jax.random.normal(noise_key, shape, jnp.float32), 0.0)


def init_state(config, rng: jax.Array,
               ctx: contract.TrainContext = contract.TrainContext()) -> train_state.TrainState:
  """Fresh train state: the transformer (reference init, deep-copied layers tied) as `params`,
  the frozen backbone variables (model.backbone_weights; random only where the preset allows)
  as `frozen`, AdamW + StepLR by epoch + clipping from config.optim, no EMA."""
  backbone_key, model_key = jax.random.split(rng)
  _, backbone_variables, _ = feature_extractor.load_frozen_backbone(config.model, backbone_key)
  fs = config.model.feature_size
  probe = jnp.zeros((1, fs, fs, feature_channels(config)), jnp.float32)
  params = jax.jit(lambda key: build_model(config).init(key, probe)["params"])(model_key)
  tx, lr = optim.make_optimizer(config.optim, ctx.steps_per_epoch)
  return train_state.TrainState.create(tie_initial_clones(params), tx, lr, ema=False,
                                       frozen=backbone_variables)


def train_step(config, state: train_state.TrainState, batch: dict, rng: jax.Array):
  """One AdamW step on the MSE between the reconstruction of jittered tokens and the clean F.

  batch["image"]: float32 (B, H, W, 1) in [0, 1]. `rng` (fresh every step) gives the jitter
  draws and the dropout masks. Returns (new_state, {"loss": scalar}).
  """
  model = build_model(config)
  feats = features(config, state.frozen, batch["image"])
  b, fs, _, c = feats.shape
  jitter_key, dropout_key = jax.random.split(rng)
  noise = jitter_noise(config, jitter_key, (b, fs * fs, c))

  def loss_fn(params):
    recon = model.apply({"params": params}, feats, noise, train=True,
                        rngs={"dropout": dropout_key})
    return reconstruction_loss(feats, recon)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads), {"loss": loss}


def score_slices(config, params: dict, images: jnp.ndarray, valid: jnp.ndarray,
                 rng: jax.Array) -> jnp.ndarray:
  """Anomaly maps (B, H, W) of slices (B, H, W, 1) in [0, 1]: one backbone and one transformer
  evaluation per slice in eval mode (no dropout, no jitter); slices are independent, so `valid`
  and `rng` are unused."""
  del valid, rng
  feats = features(config, params["backbone"], images)
  recon = build_model(config).apply({"params": params["transformer"]}, feats, train=False)
  return anomaly_maps(feats, recon, images)


def scoring_params(config, states: dict, artifacts: dict) -> dict:
  """The trained transformer and the frozen backbone of the one stage."""
  del config, artifacts
  state = states[STAGE_NAME]
  return {"transformer": state.params, "backbone": state.frozen}


def preview(config, state: train_state.TrainState, batch: dict, rng: jax.Array) -> dict:
  """TensorBoard images at a snapshot: training slices beside their anomaly maps (each map
  scaled by its own maximum)."""
  del rng
  images = batch["image"][:config.training.preview_images]
  maps = score_slices(config, scoring_params(config, {STAGE_NAME: state}, {}), images, None, None)
  peak = jnp.max(maps, axis=(1, 2), keepdims=True)
  return {"slices": images[..., 0], "anomaly_maps": maps / jnp.where(peak > 0, peak, 1.0)}


def warnings(config) -> list[str]:
  """The random-backbone warning of a run without ImageNet weights (else none)."""
  return feature_extractor.random_weights_warnings(config.model)


METHOD = contract.Method(
    name="uniad", score=score_slices, scoring_params=scoring_params,
    stages=(contract.Stage(name=STAGE_NAME, init=init_state, train_step=train_step,
                           preview=preview),),
    warnings=warnings)
