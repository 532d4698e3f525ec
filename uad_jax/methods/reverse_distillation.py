"""Reverse Distillation (Deng & Li, CVPR 2022) as the reference runs it: the method's functions.

A frozen ImageNet teacher (wide_resnet50_2) maps a slice to three feature maps (layer1..3). A
trainable one-class bottleneck (OCBE) fuses them into one code and a student decoder rebuilds the
three maps from it (`networks/rd_student.py`). Training minimises, per scale, 1 − cosine between
the flattened (C·h·w) teacher and student maps of each slice. A slice's anomaly map is, per
scale, 1 − cosine along the channels at every position, upsampled bilinearly with
align_corners=True to the slice and summed over the scales; 0 where the input is exactly 0.
Spec: `methods/reverse_distillation.md`.

The teacher's variables live in `TrainState.frozen`: no optimiser state, no weight decay (§6.3),
run in eval mode under stop_gradient, once per batch. The student's trainable BatchNorm
statistics are `TrainState.batch_stats`. No EMA: scoring uses the raw weights.

Config keys read (ml_collections.ConfigDict):
  model.{backbone, layers, backbone_weights, allow_random_backbone, backbone_precision,
    normalize}: the frozen teacher (`networks/feature_extractor.py`);
  model.{width_per_group, ocbe_blocks, decoder_blocks}: the student (`rd_student.StudentConfig`);
  model.student_precision: 'default' | 'highest' (the student's convs);
  optim.*: AdamW (`engine/optim.py`; reference: lr 1e-4, weight decay 0.01 on every student
    tensor); data.image_size; training.compute_dtype.
"""

import functools

import jax
import jax.numpy as jnp

from uad_jax.engine import optim, train_state
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.networks import backbones, feature_extractor
from uad_jax.networks.rd_student import Student, StudentConfig
from uad_jax.ops.resize import resize_bilinear

# torch.nn.CosineSimilarity's eps, applied to each norm separately (torch >= 1.12).
COSINE_EPS = 1e-8
PRECISIONS = {"highest": "highest", "default": None}


def cosine_similarity(u: jax.Array, v: jax.Array, axis) -> jax.Array:
  """torch.nn.functional.cosine_similarity: Σ (u / max(|u|, eps)) · (v / max(|v|, eps)) over
  `axis` (an int or a tuple), in float32."""
  u, v = jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)
  nu = jnp.maximum(jnp.sqrt(jnp.sum(u * u, axis, keepdims=True)), COSINE_EPS)
  nv = jnp.maximum(jnp.sqrt(jnp.sum(v * v, axis, keepdims=True)), COSINE_EPS)
  return jnp.sum((u / nu) * (v / nv), axis)


def per_sample_losses(teacher_maps, student_maps) -> jax.Array:
  """(B,) Σ_k (1 − cos(vec F_k[b], vec R_k[b])), cosine over each whole (h, w, C) map (§4.3;
  the reference's validation loss)."""
  return sum(1.0 - cosine_similarity(f, r, axis=(1, 2, 3))
             for f, r in zip(teacher_maps, student_maps))


def training_loss(teacher_maps, student_maps) -> jax.Array:
  """Σ_k mean_b (1 − cos_k): the reference's training loss (= the batch mean of the above)."""
  return jnp.mean(per_sample_losses(teacher_maps, student_maps))


def one_minus_cosine_maps(teacher_maps, student_maps) -> list[jax.Array]:
  """Per scale, (B, h_k, w_k) 1 − cosine along the channels at every position."""
  return [1.0 - cosine_similarity(f, r, axis=-1) for f, r in zip(teacher_maps, student_maps)]


def anomaly_maps(teacher_maps, student_maps, images: jax.Array) -> jax.Array:
  """(B, H, W) anomaly maps of slices `images` (B, H, W, 1): per-scale 1 − cosine maps resized
  bilinearly with align_corners=True to (H, W) and summed (no Gaussian smoothing, §5.3), then 0
  wherever the input is exactly 0 (§5.4)."""
  h, w = images.shape[1:3]
  total = sum(resize_bilinear(m[..., None], h, w, align_corners=True)[..., 0]
              for m in one_minus_cosine_maps(teacher_maps, student_maps))
  return jnp.where(images[..., 0] == 0.0, 0.0, total)


def _dtype(config):
  return jnp.dtype(config.get("training", {}).get("compute_dtype", "float32"))


def _precision(name: str):
  if name not in PRECISIONS:
    raise ConfigError(f"model.student_precision={name!r}: expected one of {sorted(PRECISIONS)}")
  return PRECISIONS[name]


def teacher_channels(config) -> tuple[int, ...]:
  """Channels of the teacher taps `model.layers` (traced on shapes only)."""
  if len(config.model.layers) != 3:
    raise ConfigError(f"model.layers={tuple(config.model.layers)}: Reverse Distillation needs "
                      "three teacher taps, shallow to deep")
  return tuple(t.shape[-1] for t in abstract_teacher_maps(config))


def abstract_teacher_maps(config) -> list[jax.ShapeDtypeStruct]:
  """Shapes of the teacher taps of one `data.image_size` slice."""
  variables = backbones.abstract_variables(feature_extractor.backbone_module(config.model))
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
  return jax.eval_shape(functools.partial(feature_extractor.extract, config.model), variables,
                        images)


def _check_tap_sizes(config, taps) -> None:
  """The decoder doubles the code 3 times: taps must be h, h/2, h/4 with h/4 even."""
  sizes = [t.shape[1:3] for t in taps]
  (h, w), (h3, w3) = sizes[0], sizes[2]
  if sizes != [(h, w), (h // 2, w // 2), (h // 4, w // 4)] or h3 % 2 or w3 % 2:
    raise ConfigError(
        f"data.image_size={config.data.image_size}: the teacher taps are {sizes}; the student "
        "rebuilds maps of sizes 8c, 4c, 2c from a c x c code, so the deepest tap must have an "
        "even size and each shallower one twice the size (a multiple of 32 for ResNet teachers)")


def build_student(config) -> Student:
  """The OCBE + decoder of `config.model` for the teacher's tap channels."""
  m = config.model
  taps = abstract_teacher_maps(config)
  _check_tap_sizes(config, taps)
  student_config = StudentConfig(tuple(t.shape[-1] for t in taps), m.width_per_group,
                                 m.ocbe_blocks, tuple(m.decoder_blocks))
  return Student(student_config, dtype=_dtype(config),
                 precision=_precision(m.get("student_precision", "default")))


def teacher_maps(config, frozen, images: jax.Array) -> list[jax.Array]:
  """The frozen teacher's taps of slices (B, H, W, 1) in [0, 1], shallow to deep, float32,
  without gradients (eval-mode BN, stop_gradient)."""
  return feature_extractor.extract(config.model, frozen, images)


def init_state(config, rng: jax.Array,
               ctx: contract.TrainContext = contract.TrainContext()) -> train_state.TrainState:
  """Teacher variables (the weight file, or random for the demo/tiny presets) in `frozen`; the
  student with the reference's initialisation in `params`/`batch_stats`; AdamW; no EMA."""
  teacher_key, student_key = jax.random.split(rng)
  _, frozen, _ = feature_extractor.load_frozen_backbone(config.model, teacher_key)
  student = build_student(config)
  taps = [jnp.zeros(t.shape, jnp.float32) for t in abstract_teacher_maps(config)]
  variables = jax.jit(functools.partial(student.init, train=False))(student_key, taps)
  tx, lr = optim.make_optimizer(config.optim, ctx.steps_per_epoch)
  return train_state.TrainState.create(variables["params"], tx, lr, ema=False,
                                       batch_stats=variables["batch_stats"], frozen=frozen)


def train_step(config, state: train_state.TrainState, batch: dict, rng: jax.Array):
  """One AdamW step on the cosine loss of the batch (student BN in train mode).

  batch["image"]: float32 (B, H, W, 1) in [0, 1]. The teacher runs once, outside the
  differentiated function. Returns (new_state, {"loss": scalar}).
  """
  del rng
  student = build_student(config)
  targets = teacher_maps(config, state.frozen, batch["image"])

  def loss_fn(params):
    (_, outputs), updates = student.apply(
        {"params": params, "batch_stats": state.batch_stats}, targets, train=True,
        mutable=["batch_stats"])
    return training_loss(targets, outputs), updates["batch_stats"]

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads, batch_stats=batch_stats), {"loss": loss}


def student_maps(config, student_variables, targets) -> list[jax.Array]:
  """The student's maps (eval-mode BN), in the taps' order."""
  _, outputs = build_student(config).apply(student_variables, targets, train=False)
  return outputs


def score_slices(config, params: dict, images: jax.Array, valid: jax.Array,
                 rng: jax.Array) -> jax.Array:
  """RD anomaly maps (B, H, W) float32 of slices (B, H, W, 1) in [0, 1]: one teacher and one
  student forward per slice. Deterministic, slices independent: `valid` and `rng` unused."""
  del valid, rng
  targets = teacher_maps(config, params["teacher"], images)
  return anomaly_maps(targets, student_maps(config, params["student"], targets), images)


def scoring_params(config, states: dict, artifacts: dict) -> dict:
  """Teacher variables and the student's raw weights with its running BN statistics."""
  del config, artifacts
  state = states["model"]
  return {"teacher": state.frozen,
          "student": {"params": state.params, "batch_stats": state.batch_stats}}


def preview(config, state: train_state.TrainState, batch: dict, rng: jax.Array) -> dict:
  """TensorBoard images at a snapshot: training slices and their anomaly maps / 3 (eval-mode
  student; healthy slices should stay dark)."""
  n = config.training.preview_images
  images = batch["image"][:n]
  params = scoring_params(config, {"model": state}, {})
  maps = score_slices(config, params, images, None, rng)
  return {"images": images[..., 0], "anomaly_maps": jnp.clip(maps / 3.0, 0.0, 1.0)}


def warnings(config) -> list[str]:
  """The random-backbone warning of a run without ImageNet weights (else none)."""
  return feature_extractor.random_weights_warnings(config.model)


METHOD = contract.Method(
    name="reverse_distillation", score=score_slices, scoring_params=scoring_params,
    stages=(contract.Stage(name="model", init=init_state, train_step=train_step,
                           preview=preview),),
    warnings=warnings)
