"""Method registry: `config.method` names a module `uad_jax.methods.<name>`.

A gradient-trained method module provides pure functions (see `uad_jax/methods/andi.py`):
  init_state(config, rng, image_shape) -> TrainState
  train_step(config, state, batch, rng) -> (state, metrics)
  score_slices(config, params, images, rng) -> maps (B, H, W), background 0
and optionally `sample(config, params, rng, num_images)` for previews.
A fitted method (no gradient steps, e.g. PatchCore) sets `KIND = "fit"` and provides, instead
of `init_state`/`train_step`,
  fit(config, lmdb_path, mesh, rng, writer, workdir) -> (state pytree of arrays, meta dict)
(meta is stored with the checkpoint; its `warnings` list is copied into every result file).
Optional hooks: `scoring_params(state)` (default: `state.ema_params` for gradient methods, the
state itself for fitted ones) and `place_params(params, mesh)` (default: replicated).
"""

import importlib
import types

from uad_jax.errors import ConfigError

METHODS = ("andi", "patchcore")


def kind(method: types.ModuleType) -> str:
  """'gradient' (trained by train_step) or 'fit' (built once by fit)."""
  return getattr(method, "KIND", "gradient")


def get_method(name: str) -> types.ModuleType:
  """Imports the method module registered under `name`."""
  if name not in METHODS:
    raise ConfigError(f"config.method={name!r} is not a known method; choose one of {METHODS}")
  return importlib.import_module(f"uad_jax.methods.{name}")
