"""Method registry: `config.method` names a `contract.Method` ("module" means its `METHOD`,
"module:NAME" another attribute, for modules that define several, e.g. the baselines).

Adding a method is its module (ending in `METHOD = contract.Method(...)`), its config
`configs/<name>.py` and one line here; the engine needs no change (see `contract.py`).
"""

import importlib

from uad_jax.errors import ConfigError
from uad_jax.methods.contract import Method

REGISTRY = {
    "andi": "uad_jax.methods.andi",
    "disyre": "uad_jax.methods.disyre.method",
    "fae": "uad_jax.methods.fae",
    "intensity": "uad_jax.methods.baselines:INTENSITY",
    "itermask": "uad_jax.methods.itermask.method",
    "patchcore": "uad_jax.methods.patchcore.method",
    "reverse_distillation": "uad_jax.methods.reverse_distillation",
    "riad": "uad_jax.methods.riad.method",
    "uniad": "uad_jax.methods.uniad",
    "zscore": "uad_jax.methods.baselines:ZSCORE",
}
METHODS = tuple(REGISTRY)


def get_method(name: str) -> Method:
  """The `Method` registered under `name`."""
  if name not in REGISTRY:
    raise ConfigError(f"config.method={name!r} is not a known method; choose one of {METHODS}")
  module, _, attribute = REGISTRY[name].partition(":")
  return getattr(importlib.import_module(module), attribute or "METHOD")
