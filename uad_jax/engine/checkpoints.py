"""Checkpoints with orbax: train state, data-iterator state and run metadata per step.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}` (orbax writes to a temporary directory
and renames it when complete, so a crash never leaves a checkpoint that looks whole).
Calibrated thresholds are stored beside each step (`<step>/calibration.json`, see
`uad_jax.evaluation`).
"""

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from uad_jax.errors import ConfigError

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")


class CheckpointStore:
  """Saves and restores `{state: pytree, data: json, meta: json}` for integer steps."""

  def __init__(self, directory, max_to_keep: int = 0, read_only: bool = False):
    self.directory = Path(directory).resolve()   # orbax needs absolute paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, target_state, step: int | None = None):
    """Restores `(step, state, data_state, meta)`; `target_state` gives structure and shardings
    (None: as saved, for states whose shapes depend on the data, e.g. a memory bank).

    Without `step`, the newest readable checkpoint is used: a corrupt latest checkpoint is
    skipped with a warning and the previous one restored.
    """
    abstract = (None if target_state is None
                else jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state))
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    errors = []
    for s in candidates:
      if s not in self._manager.all_steps():
        raise ConfigError(f"no checkpoint for step {s} in {self.directory}; "
                          f"available: {self.steps()}")
      try:
        restored = self._manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract) if abstract is not None
            else ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  # any unreadable file
        if step is not None:
          raise
        log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                        self.step_dir(s), type(e).__name__, e)
        errors.append(f"{s}: {e}")
        continue
      return s, restored["state"], restored["data"], restored["meta"]
    raise FileNotFoundError(f"no readable checkpoint in {self.directory}: {errors}")

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self):
    self._manager.close()
