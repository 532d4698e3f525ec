"""RIAD reference checkpoint (PyTorch) -> Flax params (spec `methods/riad.md` §5).

The network is the reference's DDPMpp (`models/ANDi/DDPMpp.py`) without time embedding, so the
DDPM++ converter maps it (`convert/ddpmpp.py`, table derived from the module plan). RIAD trains
and scores without EMA: only the raw model weights are read.
"""

from pathlib import Path
from typing import Mapping

import numpy as np

from uad_jax.convert import ddpmpp
from uad_jax.convert.weight_files import read_state_dict
from uad_jax.errors import DataError
from uad_jax.methods.riad import method as riad

MODEL_FILES = ("model.safetensors", "pytorch_model.bin")


def torch_to_flax(state_dict: Mapping[str, np.ndarray], config, source: str = "state_dict"
                  ) -> dict:
  """The Flax params of `config`'s network from a reference state_dict (NCHW layout)."""
  return ddpmpp.torch_to_flax(state_dict, riad.build_model(config), source)


def reference_states(config, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """({stage: {'params': ...}}, warnings) of an accelerate checkpoint folder `src`
  (`checkpoints/RIAD/checkpoint_<k>`: `model.safetensors` or `pytorch_model.bin`)."""
  src = Path(src)
  model_file = next((src / f for f in MODEL_FILES if (src / f).is_file()), None)
  if model_file is None:
    raise DataError(f"{src}: no model weights ({' or '.join(MODEL_FILES)})")
  del ema_from_model  # RIAD has no EMA: it trains and scores with the raw weights
  weights, _ = read_state_dict(model_file)
  return {riad.STAGE_NAME: {"params": torch_to_flax(weights, config, str(model_file))}}, []
