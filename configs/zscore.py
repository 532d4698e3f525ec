"""The z-score baseline (uad_jax/methods/baselines.py): |x − μ| / σ per pixel and slice position
of the healthy training slices. eval.split_size must cover a whole volume (155 on the paper's
SRI24 grid, 78 on the demo grid): one scoring chunk is one volume, row i is slice i.
Presets: default (paper grid 224², 155 slices), `:demo` (demo cohort, 120², 78 slices), `:tiny`.
"""

import ml_collections

from configs import common


def get_config(preset=None):
  config = ml_collections.ConfigDict()
  config.method = "zscore"
  config.seed = 42
  config.data = common.data_config(modality="T1w", image_size=224, batch_size=1)
  config.model = ml_collections.ConfigDict({"min_std": 0.05})   # σ floor, intensity units [0, 1]
  config.training = common.training_config(n_iters=0, snapshot_freq=0, log_freq=1)
  # No reference sweep exists for a baseline: derived from the healthy validation scores.
  config.eval = common.eval_config(thr_start=0.0, thr_end=0.0, thr_step=0.0, split_size=155)
  if preset == "demo":
    config.data.image_size = 120
    config.eval.split_size = 78
    common.use_demo_cohort(config)
  elif preset == "tiny":
    config.data.image_size = 16
    config.eval.split_size = 4
  elif preset not in (None, "", "paper"):
    raise ValueError(f"unknown preset {preset!r} for configs/zscore.py; use 'demo', 'tiny' or "
                     "'paper'")
  return config
