"""Method registry: `config.method` names a module `uad_jax.methods.<name>`.

A gradient-trained method module provides pure functions (see `uad_jax/methods/andi.py`):
  init_state(config, rng, image_shape) -> TrainState
  train_step(config, state, batch, rng) -> (state, metrics)
  score_slices(config, params, images, rng) -> maps (B, H, W), background 0
and optionally `sample(config, params, rng, num_images)` for previews.
A fitted method (no gradient steps, e.g. PatchCore) provides `fit(...)` instead of
`init_state`/`train_step`; the engine dispatches on `KIND` ("gradient" or "fit").
"""

import importlib
import types

from uad_jax.errors import ConfigError

METHODS = ("andi", "patchcore")


def get_method(name: str) -> types.ModuleType:
  """Imports the method module registered under `name`."""
  if name not in METHODS:
    raise ConfigError(f"config.method={name!r} is not a known method; choose one of {METHODS}")
  return importlib.import_module(f"uad_jax.methods.{name}")
