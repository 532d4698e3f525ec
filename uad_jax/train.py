"""Train a method: `python -m uad_jax.train --config configs/andi.py[:demo] --workdir DIR`.

Any config value can be overridden, e.g. `--config.training.n_iters=1000`; an unknown key is an
error. Re-running with the same `--workdir` resumes from its newest checkpoint. Multi-process
runs: see `launch/`.
"""

import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

from uad_jax.engine import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  distributed.initialize_from_flags()
  logging.set_verbosity(logging.WARNING)   # orbax and jax are chatty at INFO
  std_logging.getLogger("uad_jax").setLevel(std_logging.INFO)
  trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
