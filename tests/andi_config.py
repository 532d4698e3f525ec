"""ANDi configs for tests: the project's paper config (`configs/andi.py`) with fixture overrides."""

import ml_collections

from configs import andi as andi_configs


def fixture_config(fixture_config_dict: dict) -> ml_collections.ConfigDict:
  """The paper config updated with a fixture's `config` sections (extra fixture keys ignored).

  A fixture's `config` lists every value that differs from the paper config, by spec section.
  """
  c = andi_configs.get_config()
  for section, values in fixture_config_dict.items():
    if section in c and isinstance(values, dict):
      for key, value in values.items():
        c[section][key] = tuple(value) if isinstance(value, list) else value
  return c


def tiny_config(image_size: int = 16) -> ml_collections.ConfigDict:
  """A small ANDi network (2 levels, 8 channels) for fast functional tests."""
  return fixture_config({
      "model": {"nf": 8, "ch_mult": [1, 2], "num_res_blocks": [1, 1],
                "attn_resolutions": [image_size // 2], "attn_emb_dim": 8,
                "dropout_at": image_size},
      "data": {"image_size": image_size},
  })
