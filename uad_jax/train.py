"""Train a method: `python -m uad_jax.train --config configs/andi.py[:demo] --workdir DIR`.

Any config value can be overridden, e.g. `--config.training.n_iters=1000`; an unknown key or a
value of the wrong type is an error; `--print_config` lists every key with its value.
Re-running with the same `--workdir` resumes from its newest checkpoint; a `:demo` preset builds
the demo cohort and its slice database first when they are missing. Errors are one line
(`--debug` shows the traceback). Multi-process runs: see `launch/`.
"""

import logging as std_logging

from absl import flags, logging
from ml_collections import config_flags

from uad_jax import cli
from uad_jax.data.demo.prepare import ensure_demo_data
from uad_jax.engine import distributed, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.config_help(), lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, TensorBoard)")
cli.define_flags(__name__)


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise cli.ConfigError("--workdir is required (the run directory)")
  distributed.initialize_from_flags()
  logging.set_verbosity(logging.WARNING)   # orbax and jax are chatty at INFO
  std_logging.getLogger("uad_jax").setLevel(std_logging.INFO)
  ensure_demo_data(_CONFIG.value)
  trainer.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run_absl(main, prog="uad_jax.train")
