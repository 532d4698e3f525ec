"""Atomic outputs: a file or directory appears under its final name only when complete.

A run that is interrupted leaves at most a `.<name>.tmp-<pid>` sibling behind, never a file that
looks finished. A directory is replaced by swapping it with the finished temporary in one
atomic step (Linux `renameat2`); elsewhere it takes two renames (old away, new in), and a crash
between them leaves the old one as `.<name>.old-<pid>`. `recover_interrupted` (run by `atomic_path` and by the
LMDB reader) puts such a directory back when nothing replaced it, and removes the leftovers of
dead processes, saying so.
"""

import contextlib
import ctypes
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def _tmp_sibling(path: Path) -> Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary sibling path; on success renames it to `path` (file or directory).

  An existing `path` is replaced. On error the temporary is removed and nothing changes.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  recover_interrupted(path)
  tmp = _tmp_sibling(path)
  _remove(tmp)
  try:
    yield tmp
    if path.is_dir() and not path.is_symlink():
      if _exchange(tmp, path):
        _remove(tmp)   # now the old version
      else:
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        try:
          os.replace(tmp, path)
        except BaseException:
          os.replace(old, path)
          raise
        _remove(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    _remove(tmp)
    raise


def atomic_write_text(path, text: str) -> None:
  """Writes `text` to `path` atomically (UTF-8)."""
  with atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def atomic_write_bytes(path, data: bytes) -> None:
  """Writes `data` to `path` atomically."""
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())


def _exchange(a: Path, b: Path) -> bool:
  """Swaps two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the
  system or file system cannot."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _process_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def recover_interrupted(path) -> None:
  """Repairs what an interrupted `atomic_path(path)` of a dead process left beside `path`.

  `.<name>.old-<pid>` without `path`: the process died between its two renames; the old
  version is renamed back. With `path`: the swap was done, the old copy is removed. An
  unfinished `.<name>.tmp-<pid>` is removed. Each repair is logged as a warning.
  """
  path = Path(path)
  if not path.parent.is_dir():
    return
  pattern = re.compile(rf"^\.{re.escape(path.name)}\.(old|tmp)-(\d+)$")
  try:
    leftovers = sorted((m.group(1), int(m.group(2)), p) for p in path.parent.iterdir()
                       if (m := pattern.match(p.name)))
    for kind, pid, p in leftovers:
      if _process_alive(pid):
        continue
      if kind == "old" and not (path.exists() or path.is_symlink()):
        os.replace(p, path)
        log.warning("restored %s from %s, left hidden by process %d that was interrupted while "
                    "replacing it", path, p.name, pid)
      else:
        _remove(p)
        log.warning("removed %s, left by process %d that was interrupted while %s %s", p,
                    pid, "replacing" if kind == "old" else "writing", path)
  except OSError as e:   # e.g. a read-only folder: reading must still work
    log.warning("could not clean up interrupted outputs beside %s: %s", path, e)


def _remove(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p)
  elif p.exists() or p.is_symlink():
    p.unlink()
