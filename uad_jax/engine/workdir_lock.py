"""One training per run directory: an exclusive lock on `WORKDIR/.lock`.

The lock is an advisory `flock` held for the whole run by process 0 (the other processes of a
multi-process run share its workdir); the operating system releases it when the process ends,
however it ends, so a crash never leaves a stale lock. The file names the holder (pid, host,
command, start time) for the error a second launch gets.
"""

import contextlib
import datetime
import fcntl
import os
import socket
import sys
from pathlib import Path

import jax

from uad_jax.errors import ConfigError

LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold(workdir):
  """Holds the lock of `workdir` (process 0) for the duration of the `with` block.

  Raises:
    ConfigError: another process holds it (naming that process).
  """
  if jax.process_index() != 0:
    yield
    return
  path = Path(workdir) / LOCK_NAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = path.read_text().strip() or "another process"
      raise ConfigError(f"{workdir} is in use by {holder}; wait for it to end or stop it, or "
                        "use another --workdir") from None
    since = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, (f"process {os.getpid()} on {socket.gethostname()} "
                  f"({' '.join(sys.argv)}; since {since})\n").encode())
    yield
  finally:
    os.close(fd)   # releases the lock
