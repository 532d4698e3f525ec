"""ANDi reference checkpoints -> uad_jax train-state fields (for `tools.import_torch`)."""

from pathlib import Path

from uad_jax.convert import accelerate
from uad_jax.methods import andi


def reference_states(config, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """({'model': {'params', 'ema_params'}}, warnings) of an accelerate checkpoint folder of the
  reference's ANDi training."""
  fields, warnings = accelerate.ddpmpp_with_ema(andi.build_model(config), src, ema_from_model)
  return {"model": fields}, warnings
