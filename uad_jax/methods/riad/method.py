"""RIAD (Reconstruction by Inpainting for Anomaly Detection; Zavrtanik et al. 2021).

The slice is tiled into k×k cells split at random into n disjoint subsets; for each subset a
DDPM++-style U-Net without time embedding sees the slice with those cells zeroed and inpaints
them. Stitching the n inpainted subsets gives a reconstruction in which no pixel was visible when
it was predicted. Training: one random k per step, loss γ·L2 + α·MSGMS + β·SSIM. Scoring: for each
of the cell sizes eval.k, the multi-scale GMS dissimilarity of slice and reconstruction weighted
by 1/N² (N cells per side), summed; then, per chunk of slices, background (exact-zero input) is
set to the chunk minimum and the minimum subtracted. Spec: `methods/riad.md`.

Config keys read (ml_collections.ConfigDict):
  model.{nf, ch_mult, num_res_blocks, attn_resolutions, attn_emb_dim, dropout, dropout_at,
    rescale, embedding_type, nonlinearity, num_channels, conv_weight_grad}: the network
    (`networks/ddpmpp.py`; RIAD: embedding_type None, rescale False);
  data.image_size: slice size S (every cell size must divide it);
  training.k: cell sizes, one drawn per step; training.n: subsets (masked passes) per step;
  training.{gamma, alpha, beta}: weights of L2, MSGMS and SSIM in the loss;
  training.compute_dtype: 'float32' | 'bfloat16', the network's computation (params stay f32);
  optim.*: `engine/optim.py` (AdamW, torch StepLR by epoch);
  eval.k, eval.n: cell sizes and subsets at scoring (len(eval.k)·eval.n network evaluations per
    slice).
"""

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.engine import optim
from uad_jax.engine.train_state import TrainState
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.methods.riad import masks as riad_masks
from uad_jax.networks.ddpmpp import DDPMpp, ddpmpp_from_config
from uad_jax.ops import gms, ssim

SSIM_WINDOW = 11   # `my_SSIMLoss` default window, 'valid' map (spec §2.4)


def build_model(config) -> DDPMpp:
  """The inpainting network of `config` (compute dtype from config.training.compute_dtype)."""
  if config.model.get("num_channels", 1) != 1:
    raise ConfigError(f"model.num_channels {config.model.num_channels}: RIAD inpaints "
                      "single-channel slices")
  dtype = jnp.dtype(config.get("training", {}).get("compute_dtype", "float32"))
  return ddpmpp_from_config(config.model, config.data.image_size, dtype)


def init(config, rng: jax.Array, ctx: contract.TrainContext) -> TrainState:
  """Fresh train state: spec initialisation, AdamW with torch's StepLR by epoch, no EMA."""
  model = build_model(config)
  s = config.data.image_size
  params = jax.jit(lambda key: model.init({"params": key}, jnp.zeros((1, s, s, 1)), None,
                                          train=False)["params"])(rng)
  tx, lr = optim.make_optimizer(config.optim, ctx.steps_per_epoch)
  return TrainState.create(params, tx, lr, ema=False)


def stitched_reconstruction(forward, images: jax.Array, visible: jax.Array,
                            batched: bool = False) -> jax.Array:
  """Σᵢ forward(x·Mᵢ, i)·(1 − Mᵢ): every pixel predicted by the pass that hid it.

  images: (B, S, S, 1) float32. visible: (n, B or 1, S, S, 1) float32 masks, 1 = visible.
  forward(z (b, S, S, 1), i int32 scalar) -> (b, S, S, 1). batched: the n passes as ONE call of
  batch n·B (i = 0; training: XLA:CPU runs the gradient of a scan over the network far slower);
  else a lax.scan over the passes (scoring: memory of one pass, network compiled once). Exactly
  one term is nonzero at each pixel, so the order of the sum does not matter.
  """
  n = visible.shape[0]
  if batched:
    masked = (images[None] * visible).reshape((-1,) + images.shape[1:])
    out = forward(masked, jnp.int32(0)).reshape((n,) + images.shape)
    return jnp.sum(out * (1.0 - visible), axis=0)

  def body(acc, pass_inputs):
    mask, i = pass_inputs
    return acc + forward(images * mask, i) * (1.0 - mask), None

  recon, _ = jax.lax.scan(body, jnp.zeros_like(images), (visible, jnp.arange(n)))
  return recon


def reconstruction_losses(images: jax.Array, recon: jax.Array) -> dict:
  """The three training-loss terms of (B, S, S, 1) slices and reconstructions (spec §2.4):
  l2 = mean squared error, msgms = mean over 4 scales of mean(1 − GMS), ssim = 1 − mean SSIM
  (window 11, 'valid' map). Scalars, float32."""
  return {"l2": jnp.mean(jnp.square(images - recon)),
          "msgms": gms.msgms_loss(images, recon),
          "ssim": ssim.ssim_loss(images, recon, window=SSIM_WINDOW, padding="valid")}


def total_loss(config, terms: dict) -> jax.Array:
  t = config.training
  return t.gamma * terms["l2"] + t.alpha * terms["msgms"] + t.beta * terms["ssim"]


def _masks_by_pass(batch: dict) -> jax.Array:
  """batch['masks'] (B, n, S, S) -> (n, B, S, S, 1) float32."""
  return jnp.moveaxis(batch["masks"].astype(jnp.float32), 1, 0)[..., None]


def train_step(config, state: TrainState, batch: dict, rng: jax.Array):
  """One AdamW step on γ·L2 + α·MSGMS + β·SSIM of the stitched reconstruction.

  batch['image']: (B, S, S, 1) float32 in [0, 1]; batch['masks']: (B, n, S, S) uint8 partition
  masks of the step's cell size (the same for every slice, `batch_transform`); batch
  ['cell_size']: (B,) int32, logged. The n passes run as one network call of batch n·B
  (measured 19x faster than a scan's gradient on XLA:CPU), dropout key fold_in(rng, 0).
  """
  model = build_model(config)
  images = batch["image"].astype(jnp.float32)
  visible = _masks_by_pass(batch)

  def loss_fn(params):
    def forward(z, i):
      return model.apply({"params": params}, z, None, train=True,
                         rngs={"dropout": jax.random.fold_in(rng, i)})
    terms = reconstruction_losses(
        images, stitched_reconstruction(forward, images, visible, batched=True))
    return total_loss(config, terms), terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {"loss": loss, **terms,
             "cell_size": jnp.mean(batch["cell_size"].astype(jnp.float32))}
  return state.apply_gradients(grads), metrics


def batch_transform(config, artifacts):
  """Host-side masks of one training batch: ONE cell size k drawn from training.k and one
  partition into training.n subsets, shared by every slice of the batch (as the reference
  draws them per step with Python's `random` and NumPy's global RNG, unseeded there)."""
  del artifacts
  ks, n = tuple(config.training.k), config.training.n
  for k in ks:
    riad_masks.cells_per_side(config.data.image_size, k)

  def transform(batch: dict, gen: np.random.Generator) -> dict:
    b, s = batch["image"].shape[:2]
    k = int(ks[gen.integers(len(ks))])
    masks = riad_masks.host_masks(gen, s, k, n).astype(np.uint8)
    return {**batch, "masks": np.ascontiguousarray(np.broadcast_to(masks, (b,) + masks.shape)),
            "cell_size": np.full((b,), k, np.int32)}
  return transform


def preview(config, state: TrainState, batch: dict, rng: jax.Array) -> dict:
  """Inputs, the first masked input and the stitched reconstruction (eval mode) of the first
  training.preview_images slices of a training batch: {tag: (N, S, S) in [0, 1]}."""
  del rng
  model = build_model(config)
  count = config.training.get("preview_images", 3)
  images = batch["image"][:count].astype(jnp.float32)
  visible = _masks_by_pass(batch)[:, :count]
  recon = stitched_reconstruction(
      lambda z, i: model.apply({"params": state.params}, z, None, train=False), images, visible)
  return {"input": images[..., 0], "masked_input": (images * visible[0])[..., 0],
          "reconstruction": jnp.clip(recon, 0.0, 1.0)[..., 0]}


def cell_weights(image_size: int, ks) -> np.ndarray:
  """N² = (image_size // k)² per cell size, float32: the reference divides each score by it."""
  return np.array([riad_masks.cells_per_side(image_size, k) ** 2 for k in ks], np.float32)


def score_with_masks(config, params, images: jax.Array, valid: jax.Array, masks: jax.Array,
                     keep_per_k: bool = False):
  """RIAD anomaly maps of one chunk of slices with given masks (spec §3).

  images: (B, S, S, 1) float32 in [0, 1], the chunk's slices in order; valid: (B,) bool (False:
  padding, excluded from the chunk minimum, its maps set to 0); masks: (len(eval.k), n, S, S)
  float32, masks[j] the partition of cell size eval.k[j], shared by all slices.
  R = Σⱼ msgms_score(x, x̂ⱼ) / Nⱼ²; m = min of R over the valid slices; R[x == 0] = m; R − m.
  Returns maps (B, S, S) float32 (0 on background), and with keep_per_k also
  {'recon': (K, B, S, S, 1), 'msgms': (K, B, S, S)} (x̂ⱼ and the unweighted scores).
  """
  model = build_model(config)
  x = images.astype(jnp.float32)
  weights = jnp.asarray(cell_weights(x.shape[1], config.eval.k))
  if masks.shape[0] != weights.shape[0]:
    raise ValueError(f"masks for {masks.shape[0]} cell sizes, eval.k has {weights.shape[0]}")

  def forward(z, i):
    del i
    return model.apply({"params": params}, z, None, train=False)

  def per_cell_size(total, inputs):
    mask, n_cells_sq = inputs
    recon = stitched_reconstruction(forward, x, mask[:, None, :, :, None])
    s = gms.msgms_score(x, recon)[..., 0]
    return total + s / n_cells_sq, ((recon, s) if keep_per_k else None)

  total, per_k = jax.lax.scan(per_cell_size, jnp.zeros(x.shape[:3], jnp.float32),
                              (masks.astype(jnp.float32), weights))
  # The chunk minimum over the real slices only (the reference's chunk is the whole volume);
  # padding rows must not move it.
  valid = valid[:, None, None]
  m = jnp.min(jnp.where(valid, total, jnp.inf))
  maps = jnp.where(valid, jnp.where(x[..., 0] == 0.0, m, total) - m, 0.0)
  if keep_per_k:
    return maps, {"recon": per_k[0], "msgms": per_k[1]}
  return maps


def score(config, params, images: jax.Array, valid: jax.Array, rng: jax.Array) -> jax.Array:
  """`score_with_masks` with masks drawn from `rng` (`masks.key_masks`): one partition per cell
  size per chunk, as the reference draws them; the engine gives each chunk its own key."""
  masks = riad_masks.key_masks(rng, images.shape[1], tuple(config.eval.k), config.eval.n)
  return score_with_masks(config, params, images, valid, masks)


def scoring_params(config, states: dict, artifacts: dict):
  """The raw weights (RIAD has no EMA)."""
  del config, artifacts
  return states[STAGE_NAME].params


STAGE_NAME = "riad"

METHOD = contract.Method(
    name="riad",
    score=score,
    scoring_params=scoring_params,
    stages=(contract.Stage(name=STAGE_NAME, init=init, train_step=train_step,
                           batch_transform=batch_transform, preview=preview),),
    scoring_mode="chunk",
    network_evaluations=lambda config: float(len(config.eval.k) * config.eval.n),
)
