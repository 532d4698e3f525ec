"""UniAD configs for tests: the project's paper config (`configs/uniad.py`) with overrides."""

import ml_collections

from configs import uniad as uniad_configs


def fixture_config(fixture_config_dict: dict, preset=None) -> ml_collections.ConfigDict:
  """The `preset` config updated with a fixture's `config` sections (extra fixture keys, e.g.
  `tap_channels`, ignored; lists become tuples)."""
  c = uniad_configs.get_config(preset)
  for section, values in fixture_config_dict.items():
    if section in c and isinstance(values, dict):
      for key, value in values.items():
        c[section][key] = tuple(value) if isinstance(value, list) else value
  return c
