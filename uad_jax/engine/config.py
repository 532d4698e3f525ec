"""Loading `configs/<method>.py[:preset]` outside absl, type checks of overridden values, and
checks of paths a run needs."""

import importlib.util
import sys
from pathlib import Path

import ml_collections

from uad_jax.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`"configs/andi.py:demo"` -> the locked ConfigDict of that preset (as `--config` gives it)."""
  path, _, preset = spec.partition(":")
  path = Path(path)
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist")
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
  module_spec = importlib.util.spec_from_file_location(f"_uad_config_{path.stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    config = module.get_config(preset or None)
  except ValueError as e:   # e.g. an unknown preset
    raise ConfigError(f"{spec}: {e}") from e
  config.lock()
  return config


def flatten(config, prefix: str = "") -> dict:
  """{dotted key: value} of every leaf of a ConfigDict, in key order."""
  out = {}
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _fits(value, default) -> bool:
  if isinstance(default, bool) or isinstance(value, bool):
    return type(value) is type(default)
  if isinstance(default, (int, float)):
    return isinstance(value, (int, float))
  return isinstance(value, type(default))


def check_types(config, defaults, prefix: str = "") -> None:
  """Every value of `config` has the type of the same key in `defaults` (the preset before
  command-line overrides); sequences also element by element, so a tuple of ints stays one
  (ml_collections alone turns `--config.model.ch_mult=foo` into `('foo',)`).

  Raises:
    ConfigError: naming the key, the value and what its default looks like.
  """
  for key in defaults.keys():
    default, value, name = defaults[key], config[key], f"{prefix}{key}"
    if isinstance(default, ml_collections.ConfigDict):
      check_types(value, default, name + ".")
      continue
    if default is None:
      continue
    if isinstance(default, (tuple, list)):
      ok = isinstance(value, (tuple, list)) and all(
          any(_fits(v, d) for d in default) for v in value) if default else True
    else:
      ok = _fits(value, default)
    if not ok:
      raise ConfigError(f"config.{name}={value!r} has the wrong type: the default is "
                        f"{default!r}; pass e.g. --config.{name}=\"{default!r}\"")


def required_path(config, key: str, *, kind: str = "file") -> Path:
  """The path stored at dotted `key` of `config`; a clear error if it is unset or missing."""
  value = config
  for part in key.split("."):
    value = value[part]
  if not value:
    raise ConfigError(f"config.{key} is not set; pass --config.{key}=PATH")
  path = Path(value)
  exists = path.is_dir() if kind == "dir" else path.is_file()
  if not exists:
    raise ConfigError(f"config.{key}={value}: no such {kind}")
  return path
