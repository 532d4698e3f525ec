"""FAE reference state_dict -> Flax variables (feature autoencoder and frozen backbone).

The reference checkpoint (`FeatureReconstructor.state_dict()`, spec methods/fae.md §4.3, §5)
holds `step`, the backbone under `extractor.backbone.` (torchvision keys; converted by
`uad_jax/convert/torchvision.py`) and the autoencoder under `ae.`:

| torch key (after `ae.`) | Flax variable (after `params/`, `batch_stats/`) |
|---|---|
| enc.encoder_layer_{i}.encoder_conv_{i}.weight | enc/encoder_layer_{i}/encoder_conv_{i}/kernel |
| enc.encoder_conv_final.weight | enc/encoder_conv_final/kernel |
| dec.decoder_layer_{i}.decoder_tconv_{i}.weight | dec/decoder_layer_{i}/decoder_tconv_{i}/kernel |
| dec.decoder_conv_final.weight | dec/decoder_conv_final/kernel |
| ...{encoder,decoder}_norm_{i}.weight, .bias | .../{encoder,decoder}_norm_{i}/scale, bias |
| ...{encoder,decoder}_norm_{i}.running_mean, _var | (batch_stats) .../mean, var |
| ...num_batches_tracked | dropped |

Conv kernels OIHW -> HWIO; transposed-conv kernels (I, O, k, k) -> (k, k, I, O) without a flip
(`uad_jax/ops/conv_transpose.py` flips). The expected tree comes from the Flax module, so a
missing, unexpected or mis-shaped key is a DataError naming it.
"""

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from uad_jax.convert import accelerate
from uad_jax.convert.torchvision import torchvision_to_flax
from uad_jax.errors import DataError
from uad_jax.methods import fae

AE_PREFIX = "ae."
BACKBONE_PREFIX = "extractor.backbone."
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def autoencoder_variables_shape(module, featmap_size: int, in_channels: int) -> dict:
  """{'params', 'batch_stats'} of a FeatureAutoencoder as ShapeDtypeStructs."""
  probe = jax.ShapeDtypeStruct((1, featmap_size, featmap_size, in_channels), jnp.float32)
  return dict(jax.eval_shape(module.init, jax.random.key(0), probe))


def autoencoder_to_flax(state_dict: Mapping, module, featmap_size: int, in_channels: int, *,
                        prefix: str = AE_PREFIX, source: str = "state_dict") -> dict:
  """The `prefix`ed autoencoder keys of `state_dict` as {'params', 'batch_stats'} of `module`
  (a FeatureAutoencoder for (featmap_size², in_channels) features); float32 numpy arrays."""
  expected = traverse_util.flatten_dict(
      autoencoder_variables_shape(module, featmap_size, in_channels))
  flat = {}
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    parts = key[len(prefix):].split(".")
    *path, leaf = parts
    if leaf == "num_batches_tracked":
      continue
    array = np.asarray(value, np.float32)
    if ("params", *path, "kernel") in expected and leaf == "weight":
      target = ("params", *path, "kernel")
      if array.ndim != 4:
        raise DataError(f"{source}: {key!r} must be a 4-D conv weight, got shape {array.shape}")
      # Conv (O, I, kh, kw) -> (kh, kw, I, O); transposed conv (I, O, kh, kw) -> (kh, kw, I, O).
      array = array.transpose(2, 3, 0, 1) if "tconv" in path[-1] else array.transpose(2, 3, 1, 0)
    elif leaf in _BN_LEAVES:
      collection, name = _BN_LEAVES[leaf]
      target = (collection, *path, name)
    else:
      target = None
    if target not in expected:
      raise DataError(f"{source}: {key!r} is not a variable of the feature autoencoder")
    if array.shape != tuple(expected[target].shape):
      raise DataError(f"{source}: {key!r} has shape {np.shape(value)}, which does not fit the "
                      f"autoencoder (Flax {'/'.join(target)} expects {expected[target].shape}); "
                      "check model.channels and the backbone taps")
    flat[target] = np.ascontiguousarray(array)
  missing = sorted("/".join(p) for p in set(expected) - set(flat))
  if missing:
    raise DataError(f"{source}: lacks {len(missing)} autoencoder tensors (prefix {prefix!r}), "
                    f"e.g. {missing[:5]}")
  return traverse_util.unflatten_dict(flat)


def backbone_to_flax(state_dict: Mapping, module, *, source: str = "state_dict") -> dict:
  """The frozen backbone of a reference checkpoint (`extractor.backbone.*`) for `module`."""
  if not any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
    raise DataError(f"{source}: no backbone weights (keys {BACKBONE_PREFIX}*)")
  return torchvision_to_flax(state_dict, module, prefix=BACKBONE_PREFIX)


def reference_states(config, src: Path, ema_from_model: bool):
  """The stages of a reference FAE checkpoint folder (accelerate `save_state`).

  Returns ({'fae': {'params', 'batch_stats', 'frozen'}}, warnings): the autoencoder and the
  backbone the reference trained and scored with (its ImageNet resnet18 is stored inside the
  checkpoint). FAE has no EMA, so `ema_from_model` changes nothing.
  """
  del ema_from_model
  src = Path(src)
  weights, model_file = accelerate.read_model_weights(src)
  ae = autoencoder_to_flax(weights, fae.autoencoder(config), config.model.featmap_size,
                           fae.feature_channels(config), source=str(model_file))
  backbone = backbone_to_flax(weights, fae.backbone_module(config), source=str(model_file))
  return {fae.STAGE: {"params": ae["params"], "batch_stats": ae["batch_stats"],
                      "frozen": backbone}}, []
