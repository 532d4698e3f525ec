"""ANDi reference checkpoints -> uad_jax train-state fields (for `tools.import_torch`)."""

from pathlib import Path

from uad_jax.convert import accelerate, ddpmpp
from uad_jax.methods import andi


def reference_states(config, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """({'model': {'params', 'ema_params'}}, warnings) of an accelerate checkpoint folder of the
  reference's ANDi training."""
  model = andi.build_model(config)
  weights, model_file = accelerate.read_model_weights(src)
  warnings = []
  if ema_from_model:
    warnings.append(accelerate.ema_from_model_warning(model_file))
    ema = weights
    ema_source = model_file
  else:
    shadow = accelerate.read_ema_shadow(src)
    ema_source = src / accelerate.EMA_FILE
    ema = ddpmpp.shadow_params_to_state_dict(shadow, model, str(ema_source))
  fields = {"params": ddpmpp.torch_to_flax(weights, model, str(src)),
            "ema_params": ddpmpp.torch_to_flax(ema, model, str(ema_source))}
  return {"model": fields}, warnings
