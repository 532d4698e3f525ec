"""Checkpoints with orbax: train state, data-iterator state and run metadata per step.

Layout: `<workdir>/checkpoints/<step>/{state,data,meta}` (orbax writes to a temporary directory
and renames it when complete, so a crash never leaves a checkpoint that looks whole), and
`<step>/digest.json`: the SHA-256 of every file of those items, verified before each restore.
Calibrated thresholds are stored beside each step (`<step>/calibration.json`, see
`uad_jax.evaluation`).

A checkpoint whose files do not match its digest is corrupt: restoring the newest one falls
back to the previous with a one-line warning, and a writable store renames the corrupt step to
`<step>.corrupt-<n>` (never deleted; orbax ignores the name), so training can save that step
again. A checkpoint without a digest (older uad_jax, or a crash right after orbax finished) is
restored unverified, with a warning.
"""

import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from uad_jax.errors import ConfigError, DataError
from uad_jax.utils.atomic import atomic_write_text
from uad_jax.utils.checksum import file_sha256

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "meta")
DIGEST = "digest.json"


def item_digests(step_dir: Path) -> dict[str, str]:
  """{path relative to `step_dir`: SHA-256} of every file of the checkpoint's items."""
  return {str(f.relative_to(step_dir)): file_sha256(f)
          for item in ITEMS for f in sorted((step_dir / item).rglob("*")) if f.is_file()}


def verify(step_dir: Path) -> str | None:
  """What is wrong with the files of a checkpoint (None: they match its digest).

  Raises:
    FileNotFoundError: the checkpoint has no digest.
  """
  recorded = json.loads((step_dir / DIGEST).read_text())["sha256"]
  actual = item_digests(step_dir)
  changed = sorted(k for k in recorded.keys() | actual.keys() if recorded.get(k) != actual.get(k))
  if not changed:
    return None
  return (f"{len(changed)} of its files differ from {DIGEST} (first: {changed[0]}, "
          + ("missing" if changed[0] not in actual else
             "unexpected" if changed[0] not in recorded else "changed") + ")")


class CheckpointStore:
  """Saves and restores `{state: pytree, data: json, meta: json}` for integer steps."""

  def __init__(self, directory, max_to_keep: int = 0, read_only: bool = False):
    self.directory = Path(directory).resolve()   # orbax needs absolute paths
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or None, create=not read_only, read_only=read_only,
        enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self._read_only = read_only

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def save(self, step: int, state, data_state: dict, meta: dict) -> None:
    """Saves `step` and its digest; a step already there (one skipped as unreadable at the
    restore) is quarantined first."""
    if step in self._manager.all_steps():
      self.quarantine(step, "a new checkpoint of this step replaces it")
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      step_dir = self.step_dir(step)
      atomic_write_text(step_dir / DIGEST, json.dumps(
          {"algorithm": "sha256", "sha256": item_digests(step_dir)}, indent=1) + "\n")

  def quarantine(self, step: int, reason: str) -> Path:
    """Renames `<step>` to `<step>.corrupt-<n>` (kept for inspection, invisible to orbax)."""
    n = 0
    while (target := self.directory / f"{step}.corrupt-{n}").exists():
      n += 1
    if jax.process_index() == 0:
      self.step_dir(step).rename(target)
    self._manager.reload()
    log.warning("checkpoint %s quarantined as %s: %s", self.step_dir(step), target.name, reason)
    return target

  def intact(self, step: int) -> bool:
    """False when `step`'s files do not match its digest (then quarantined if writable); a
    checkpoint without a digest counts as intact (restore warns about it)."""
    step_dir = self.step_dir(step)
    problem = verify(step_dir) if (step_dir / DIGEST).is_file() else None
    if problem is not None:
      if self._read_only:
        log.warning("checkpoint %s is corrupt: %s", step_dir, problem)
      else:
        self.quarantine(step, f"corrupt ({problem})")
    return problem is None

  def restore(self, target_state, step: int | None = None, *, method: str | None = None):
    """Restores `(step, state, data_state, meta)`; `target_state` gives structure and shardings
    (None: as saved, for states whose shapes depend on the data, e.g. a memory bank).

    Without `step`, the newest intact checkpoint is used: a corrupt one (files that do not
    match its digest) is skipped with a warning (and quarantined when the store is writable)
    and the previous one restored. With `method`, a checkpoint of another method is an error.

    Raises:
      ConfigError: no checkpoint (at `step`), another method's checkpoint, or one that does
        not fit `target_state` (another model config).
      DataError: the checkpoint at `step`, or every checkpoint, is corrupt.
    """
    abstract = (None if target_state is None
                else jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state))
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      raise ConfigError(f"no checkpoint in {self.directory}")
    problems = []
    for s in candidates:
      if s not in self._manager.all_steps():
        raise ConfigError(f"no checkpoint for step {s} in {self.directory}; "
                          f"available: {self.steps()}")
      step_dir = self.step_dir(s)
      has_digest = (step_dir / DIGEST).is_file()
      problem = verify(step_dir) if has_digest else None
      if not has_digest:
        log.warning("checkpoint %s has no %s (older uad_jax, or interrupted right after saving): "
                    "restored unverified", step_dir, DIGEST)
      if problem is None:
        try:
          meta = self.restore_meta(s)
          if method is not None and meta.get("method", method) != method:
            raise ConfigError(f"{step_dir} holds a {meta['method']} checkpoint but config.method "
                              f"is {method}; use configs/{meta['method']}.py")
          restored = self._manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract) if abstract is not None
              else ocp.args.StandardRestore(), data=ocp.args.JsonRestore(),
              meta=ocp.args.JsonRestore()))
          return s, restored["state"], restored["data"], restored["meta"]
        except ConfigError:
          raise
        except Exception as e:  # pylint: disable=broad-except  # orbax's errors have no base
          if has_digest:   # intact files that do not fit the target: a config mismatch
            raise ConfigError(f"checkpoint {step_dir} does not fit this config (another model "
                              f"or method settings?): {type(e).__name__}: {e}") from e
          problem = f"unreadable ({type(e).__name__}: {e})"
      if step is not None:
        raise DataError(f"checkpoint {step_dir} is corrupt: {problem}")
      problems.append(f"{s}: {problem}")
      if not has_digest or self._read_only:   # unproven, or not ours to rename
        log.warning("checkpoint %s is corrupt: %s; trying the previous one", step_dir, problem)
      else:
        self.quarantine(s, f"corrupt ({problem}); trying the previous one")
    raise DataError(f"no intact checkpoint in {self.directory}: {'; '.join(problems)}")

  def restore_meta(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def close(self):
    self._manager.close()
