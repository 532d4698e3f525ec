"""The layout of a run directory (`--workdir`), shared by training, evaluation and tools.

  WORKDIR/config.json                  the run's config (written by training and imports)
  WORKDIR/artifacts.json               the method's prepared artefacts (`Method.prepare`)
  WORKDIR/checkpoints/<step>/          the scored (final) stage's checkpoints
  WORKDIR/stages/<name>/checkpoints/   earlier stages of multi-stage methods (IterMask's first model)
  WORKDIR/tensorboard/{train,eval}/    TensorBoard event files
  WORKDIR/eval/step_<N>/<cohort>/      evaluation outputs
"""

import json
from pathlib import Path

import jax

from uad_jax.errors import ConfigError
from uad_jax.utils.atomic import atomic_write_text

ARTIFACTS = "artifacts.json"


def checkpoint_dir(workdir, method=None, stage=None) -> Path:
  """Checkpoint folder of `stage` (default and single-stage methods: the final stage)."""
  workdir = Path(workdir)
  if method is None or stage is None or stage == method.final_stage.name:
    return workdir / "checkpoints"
  return workdir / "stages" / stage / "checkpoints"


def write_run_config(workdir: Path, config) -> None:
  """Stores the config of the run (JSON); a run of another method/model in `workdir` is an
  error (a resumed run must use the same model)."""
  path = Path(workdir) / "config.json"
  text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
  if path.exists():
    old = json.loads(path.read_text())
    if old.get("method") != config.method or old.get("model") != json.loads(text).get("model"):
      raise ConfigError(f"{workdir} holds a run of a different method/model ({path}); "
                        "use a new --workdir")
  if jax.process_index() == 0:
    atomic_write_text(path, text)


def read_artifacts(workdir) -> dict:
  """The prepared artefacts of a run ({} when the method prepares none)."""
  path = Path(workdir) / ARTIFACTS
  return json.loads(path.read_text()) if path.is_file() else {}


def write_artifacts(workdir, artifacts: dict) -> None:
  if jax.process_index() == 0:
    atomic_write_text(Path(workdir) / ARTIFACTS, json.dumps(artifacts, indent=2) + "\n")
