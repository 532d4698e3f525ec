"""Atomic outputs: a file or directory appears under its final name only when complete.

A run that is interrupted leaves at most a `*.tmp-<pid>` sibling behind, never a file that
looks finished.
"""

import contextlib
import os
import shutil
from pathlib import Path


def _tmp_sibling(path: Path) -> Path:
  return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary sibling path; on success renames it to `path` (file or directory).

  An existing `path` is replaced. On error the temporary is removed and nothing changes.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _tmp_sibling(path)
  _remove(tmp)
  try:
    yield tmp
    if path.is_dir() and not path.is_symlink():
      old = path.with_name(f".{path.name}.old-{os.getpid()}")
      os.replace(path, old)
      os.replace(tmp, path)
      shutil.rmtree(old)
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


def _remove(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p)
  elif p.exists() or p.is_symlink():
    p.unlink()
