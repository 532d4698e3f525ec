"""The layout of a run directory (`--workdir`), shared by training, evaluation and tools.

  WORKDIR/.lock                        held by the training that runs in it (`workdir_lock`)
  WORKDIR/config.json                  the run's config: written once, by the first launch that
                                       got past validation (training and imports); never replaced
  WORKDIR/artifacts.json               the method's prepared artefacts (`Method.prepare`)
  WORKDIR/checkpoints/<step>/          the scored (final) stage's checkpoints
  WORKDIR/stages/<name>/checkpoints/   earlier stages of multi-stage methods (IterMask's first model)
  WORKDIR/tensorboard/{train,eval}/    TensorBoard event files
  WORKDIR/eval/step_<N>/<cohort>/      evaluation outputs; `EVALUATION_IN_PROGRESS.json` beside
                                       them while an evaluation runs (or after it was
                                       interrupted): the report refuses such a folder
"""

import json
from pathlib import Path

import jax

from uad_jax.errors import ConfigError
from uad_jax.utils.atomic import atomic_write_text

ARTIFACTS = "artifacts.json"
EVAL_IN_PROGRESS = "EVALUATION_IN_PROGRESS.json"
EVAL_RESULTS = "results.json"   # in each cohort folder


def checkpoint_dir(workdir, method=None, stage=None) -> Path:
  """Checkpoint folder of `stage` (default and single-stage methods: the final stage)."""
  workdir = Path(workdir)
  if method is None or stage is None or stage == method.final_stage.name:
    return workdir / "checkpoints"
  return workdir / "stages" / stage / "checkpoints"


def check_run_config(workdir, config, keys=("method", "model")) -> None:
  """Refuses to run `config` in a workdir whose recorded config differs at `keys` (a resumed
  run must use the same method and model; scoring needs the same method)."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    return
  old = json.loads(path.read_text())
  new = json.loads(_config_json(config))
  for key in keys:
    if old.get(key) != new.get(key):
      raise ConfigError(f"{workdir} holds a run of another {key} ({path}: {key} "
                        f"{_describe(old.get(key))}, this config: {_describe(new.get(key))}); "
                        "use a new --workdir")


def write_run_config(workdir, config) -> None:
  """Records the config of the run once (`config.json`), after it was validated; a later
  launch (a resume, possibly with other settings such as n_iters) never rewrites it.

  Raises:
    ConfigError: the workdir holds a run of another method or model.
  """
  check_run_config(workdir, config)
  path = Path(workdir) / "config.json"
  if jax.process_index() == 0 and not path.exists():
    atomic_write_text(path, _config_json(config))


def _config_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def _describe(value) -> str:
  text = json.dumps(value, sort_keys=True, default=str)
  return text if len(text) <= 80 else text[:77] + "..."


def read_artifacts(workdir) -> dict:
  """The prepared artefacts of a run ({} when the method prepares none)."""
  path = Path(workdir) / ARTIFACTS
  return json.loads(path.read_text()) if path.is_file() else {}


def write_artifacts(workdir, artifacts: dict) -> None:
  if jax.process_index() == 0:
    atomic_write_text(Path(workdir) / ARTIFACTS, json.dumps(artifacts, indent=2) + "\n")
