"""The intensity baseline (uad_jax/methods/baselines.py): score = normalised intensity.

model.polarity 'bright' (hyperintense lesions: T2w, FLAIR) or 'dark' (hypointense: T1w). No
training: `uad_jax.train` stores an empty fitted state so calibration and evaluation run as for
every method. Presets: default (T1w, paper grid 224²), `:demo` (demo cohort, 120²), `:tiny`.
"""

import ml_collections

from configs import common


def get_config(preset=None):
  config = ml_collections.ConfigDict()
  config.method = "intensity"
  config.seed = 42
  config.data = common.data_config(modality="T1w", image_size=224, batch_size=1)
  config.model = ml_collections.ConfigDict({"polarity": "dark"})   # T1w lesions are hypointense
  config.training = common.training_config(n_iters=0, snapshot_freq=0, log_freq=1)
  # No reference sweep exists for a baseline: derived from the healthy validation scores.
  config.eval = common.eval_config(thr_start=0.0, thr_end=0.0, thr_step=0.0)
  if preset == "demo":
    config.data.image_size = 120
    config.eval.split_size = 78
    common.use_demo_cohort(config)
  elif preset == "tiny":
    config.data.image_size = 16
    config.eval.split_size = 4
  elif preset not in (None, "", "paper"):
    raise ValueError(f"unknown preset {preset!r} for configs/intensity.py; use 'demo', 'tiny' "
                     "or 'paper'")
  return config
