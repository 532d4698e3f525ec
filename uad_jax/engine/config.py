"""Loading `configs/<method>.py[:preset]` outside absl, and checks of paths a run needs."""

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
  module_spec.loader.exec_module(module)
  config = module.get_config(preset or None)
  config.lock()
  return config


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
