"""DISYRE reference checkpoints -> uad_jax train-state fields (for `tools.import_torch`).

The network is the reference's DDPMpp (`models/ANDi/DDPMpp.py`, DISYRE's configuration), so the
DDPM++ converter maps it (`convert/ddpmpp.py`, table derived from the module plan). The reference
scores `checkpoint_20` (step 100,000) with its EMA weights (`custom_checkpoint_0.pkl`, spec
`methods/disyre.md` §2.7).
"""

from pathlib import Path

from uad_jax.convert import accelerate, ddpmpp
from uad_jax.methods.disyre import method as disyre


def reference_states(config, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """({'disyre': {'params', 'ema_params'}}, warnings) of an accelerate checkpoint folder."""
  src = Path(src)
  model = disyre.build_model(config)
  weights, model_file = accelerate.read_model_weights(src)
  warnings = []
  if ema_from_model:
    warnings.append(accelerate.ema_from_model_warning(model_file))
    ema, ema_source = weights, model_file
  else:
    ema_source = src / accelerate.EMA_FILE
    ema = ddpmpp.shadow_params_to_state_dict(accelerate.read_ema_shadow(src), model,
                                             str(ema_source))
  fields = {"params": ddpmpp.torch_to_flax(weights, model, str(model_file)),
            "ema_params": ddpmpp.torch_to_flax(ema, model, str(ema_source))}
  return {disyre.STAGE: fields}, warnings
