"""Calibrate or evaluate a checkpoint.

  python -m uad_jax.eval --config configs/andi.py:demo --ckpt WORKDIR --calibrate
  python -m uad_jax.eval --config configs/andi.py:demo --ckpt WORKDIR [--out DIR]

`--ckpt` is a training workdir (newest checkpoint, or `--step`), its `checkpoints/` folder, or
one step folder. `--calibrate` scores the validation cohorts and stores the thresholds with the
checkpoint; plain evaluation scores every cohort of `config.eval.cohorts` with them (add one
with `--config.eval.cohorts.NAME.csv=CSV [--config.eval.cohorts.NAME.lesion=false]`).
`--print_config` lists every config key with its value; errors are one line (`--debug` shows
the traceback).
"""

import logging as std_logging

from absl import flags, logging
from ml_collections import config_flags

from uad_jax import cli
from uad_jax.engine import distributed, evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.config_help(), lock_config=True)
_CKPT = flags.DEFINE_string("ckpt", None, "workdir, checkpoints/ folder or step folder")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the newest)")
_CALIBRATE = flags.DEFINE_bool("calibrate", False, "estimate thresholds on validation cohorts")
_OUT = flags.DEFINE_string("out", None, "output folder (default: WORKDIR/eval/step_<N>)")
_COHORTS = flags.DEFINE_list("cohorts", None, "evaluate only these cohorts of the config")
cli.define_flags(__name__)


def main(argv):
  del argv
  if not _CKPT.value:
    raise cli.ConfigError("--ckpt is required (a training workdir, its checkpoints/ or a step)")
  distributed.initialize_from_flags()
  logging.set_verbosity(logging.ERROR)   # orbax warns on every read-only restore
  std_logging.getLogger("uad_jax").setLevel(std_logging.INFO)
  if _CALIBRATE.value:
    evaluate.calibrate(_CONFIG.value, _CKPT.value, _STEP.value)
  else:
    evaluate.evaluate(_CONFIG.value, _CKPT.value, _STEP.value, _OUT.value, _COHORTS.value)


if __name__ == "__main__":
  cli.run_absl(main, prog="uad_jax.eval")
