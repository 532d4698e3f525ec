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

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from uad_jax.engine import optim, train_state
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.networks.uniad_transformer import UniADTransformer, tie_initial_clones
from uad_jax.ops.resize import resize_bilinear

STAGE_NAME = "model"
PRECISIONS = {"highest": "highest", "default": None}


def _precision(name: str, key: str):
  if name not in PRECISIONS:
    raise ConfigError(f"{key}={name!r}: expected one of {sorted(PRECISIONS)}")
  return PRECISIONS[name]


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
      jitter_scale=m.feature_jitter_scale, precision=_precision(m.precision, "model.precision"))


def align_features(taps: Sequence[jnp.ndarray], feature_size: int) -> jnp.ndarray:
  """Backbone taps (B, h_l, w_l, C_l), in tap order -> F (B, fs, fs, ΣC_l) float32.

  Each tap is resized bilinearly with align_corners=True and no antialiasing (sparse sampling
  when shrinking; the identity at fs), then the taps are concatenated on channels.
  """
  return jnp.concatenate(
      [resize_bilinear(jnp.asarray(t, jnp.float32), feature_size, feature_size,
                       align_corners=True) for t in taps], axis=-1)


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
