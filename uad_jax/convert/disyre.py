"""DISYRE reference checkpoints -> uad_jax train-state fields (for `tools.import_torch`).

The network is the reference's DDPMpp (`models/ANDi/DDPMpp.py`, DISYRE's configuration), so the
DDPM++ converter maps it (`convert/ddpmpp.py`, table derived from the module plan). The reference
scores `checkpoint_20` (step 100,000) with its EMA weights (`custom_checkpoint_0.pkl`, spec
`methods/disyre.md` §2.7).
"""

from pathlib import Path

from uad_jax.convert import accelerate
from uad_jax.methods.disyre import method as disyre


def reference_states(config, src: Path, ema_from_model: bool) -> tuple[dict, list[str]]:
  """({'disyre': {'params', 'ema_params'}}, warnings) of an accelerate checkpoint folder."""
  fields, warnings = accelerate.ddpmpp_with_ema(disyre.build_model(config), src, ema_from_model)
  return {disyre.STAGE: fields}, warnings
