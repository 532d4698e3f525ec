"""`SliceDataSource`: grain random-access data source over an LMDB slice database.

Reads both formats of `lmdb_format` and dispatches on the presence of the `__meta__` header.
The LMDB environment is opened lazily, read-only and lock-free, once per process: it cannot be
pickled (grain ships the source to spawned workers) and py-lmdb refuses to open the same files
twice in one process, so open environments live in a process-wide table shared by all sources.
"""

import hashlib
import logging
import operator
import os
import threading
from pathlib import Path
from typing import Any

import lmdb
import numpy as np

from uad_jax.data import lmdb_format
from uad_jax.data.lmdb_writer import DB_DIRNAME
from uad_jax.errors import DataError
from uad_jax.utils.atomic import recover_interrupted

log = logging.getLogger(__name__)

OURS = "uad_jax"
REFERENCE = "reference"

_open_envs: dict[tuple[int, int], lmdb.Environment] = {}
_open_envs_lock = threading.Lock()


def resolve_database_dir(path) -> Path:
  """The LMDB directory for `path`: `path` itself if it holds `data.mdb`, else `path/slices`."""
  path = Path(path)
  for candidate in (path, path / DB_DIRNAME):
    recover_interrupted(candidate)   # a replacement interrupted between its two renames
    if (candidate / "data.mdb").is_file():
      return candidate
  hint = ""
  windows_sibling = Path(str(path) + "\\" + DB_DIRNAME)
  if (windows_sibling / "data.mdb").is_file():
    # The reference builds "<path>" + "\\slices", a sibling folder on POSIX (data.md §8.4).
    hint = f"; the reference tool wrote it to {str(windows_sibling)!r}: pass that folder"
  raise DataError(f"{path}: no LMDB slice database (expected {path / 'data.mdb'} or "
                  f"{path / DB_DIRNAME / 'data.mdb'}){hint}")


def _identity(db_dir: Path) -> tuple[int, int]:
  """Which file `db_dir/data.mdb` is (device, inode): a rebuilt database is another file."""
  try:
    st = os.stat(db_dir / "data.mdb")
  except OSError as e:
    raise DataError(f"{db_dir}: cannot access the LMDB data file ({e})") from e
  return st.st_dev, st.st_ino


def _open_env(db_dir: Path, identity: tuple[int, int]) -> lmdb.Environment:
  """The process-wide read-only environment of `db_dir` (opened on first use).

  A process forked after the open keeps using the inherited environment: without locks its
  read-only memory map stays valid, and py-lmdb would refuse a second open anyway.
  """
  with _open_envs_lock:
    env = _open_envs.get(identity)
    if env is None:
      if _identity(db_dir) != identity:
        raise DataError(f"{db_dir}: the database was replaced after this data source was created")
      try:
        env = lmdb.open(str(db_dir), subdir=True, readonly=True, lock=False, readahead=False,
                        meminit=False, max_readers=1)
      except lmdb.Error as e:
        raise DataError(f"{db_dir}: cannot open as LMDB ({e})") from e
      try:
        _check_file_size(db_dir, env)
      except DataError:
        env.close()
        raise
      _open_envs[identity] = env
    return env


def _check_file_size(db_dir: Path, env: lmdb.Environment) -> None:
  """A data file shorter than the pages the environment uses (a truncated copy) would be read
  past its end through the memory map, killing the process with SIGBUS: refuse it instead."""
  needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
  size = (db_dir / "data.mdb").stat().st_size
  if size < needed:
    raise DataError(f"{db_dir / 'data.mdb'}: truncated LMDB file ({size} bytes, its pages need "
                    f"{needed}); copy it again or rebuild it with "
                    "`python -m uad_jax.data.create_lmdb`")


def _close_env(identity: tuple[int, int]) -> None:
  with _open_envs_lock:
    env = _open_envs.pop(identity, None)
  if env is not None:
    env.close()


class SliceDataSource:
  """Slices of an LMDB slice database, in key order.

  `len()` is the number of slices. Item `i` is a dict with `image`: `(H, W)` float32 as stored
  (min-max normalised to [0, 1], uncropped) and, for our format, `subject` (str) and
  `slice_index` (int, index along the volume's third axis). Reference-format databases carry
  no identities, so their items have `image` only.

  Args:
    path: the LMDB directory (`OUT_DIR/slices`) or the folder holding it (`OUT_DIR`).

  Raises:
    DataError: no database, not LMDB, unsupported format version, inconsistent header; on
      read, a missing or corrupt record (naming database and key).
  """

  def __init__(self, path):
    self._dir = resolve_database_dir(path).resolve()
    self._identity = _identity(self._dir)
    self._env = None
    already_open = self._identity in _open_envs
    try:
      with self._get_env().begin(buffers=True) as txn:
        entries = txn.stat()["entries"]
        raw_header = txn.get(lmdb_format.HEADER_KEY)
        self.header = (None if raw_header is None else
                       lmdb_format.decode_header(raw_header, where=f"{self._dir} key __meta__"))
        self._header_sha = None if raw_header is None else hashlib.sha256(raw_header).hexdigest()
      self._init_index(entries)
      if self.format == OURS and self.header["version"] < 2:
        log.warning("%s: format version %d has no per-record checksums; only record lengths "
                    "and finiteness are checked (rebuild it with `python -m "
                    "uad_jax.data.create_lmdb` to have every record verified)", self._dir,
                    self.header["version"])
    except BaseException as e:
      # Do not keep a rejected database open: it could not be opened again for repair.
      if not already_open:
        _close_env(self._identity)
      if isinstance(e, lmdb.Error):
        raise DataError(f"{self._dir}: cannot read LMDB ({e})") from e
      raise

  def _init_index(self, entries: int) -> None:
    self.format = REFERENCE if self.header is None else OURS
    self._len = entries if self.header is None else self.header["count"]
    if self._len == 0:
      raise DataError(f"{self._dir}: the slice database is empty")
    self.volumes: list[dict[str, Any]] = [] if self.header is None else self.header["volumes"]
    if self.format == OURS:
      if entries != self._len + 1:
        raise DataError(f"{self._dir}: header counts {self._len} slices but the database holds "
                        f"{entries - 1} (incomplete or modified database)")
      lengths = [len(v["slice_indices"]) for v in self.volumes]
      self._slice_volume = np.repeat(np.arange(len(self.volumes), dtype=np.int32), lengths)
      self._slice_index = np.concatenate(
          [np.asarray(v["slice_indices"], dtype=np.int32) for v in self.volumes])
      self._shapes = [tuple(v["shape"]) for v in self.volumes]
      self._checksum = self.header["version"] >= 2

  @property
  def path(self) -> Path:
    """The LMDB directory."""
    return self._dir

  def _get_env(self) -> lmdb.Environment:
    if self._env is None:
      self._env = _open_env(self._dir, self._identity)
    return self._env

  def __getstate__(self):
    state = self.__dict__.copy()
    state["_env"] = None  # an lmdb.Environment cannot be pickled; reopened lazily per process
    return state

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    # grain validates a restored iterator state against repr(data source): name the content
    # (header checksum), not the location, so a moved database still resumes.
    if self.format == OURS:
      return (f"SliceDataSource(format={lmdb_format.FORMAT_NAME}-v{lmdb_format.FORMAT_VERSION},"
              f" slices={self._len}, header_sha256={self._header_sha})")
    return f"SliceDataSource(format={REFERENCE}, slices={self._len}, path={str(self._dir)!r})"

  def volume_of(self, index: int) -> dict[str, Any]:
    """Volume-table entry (`path`, `subject`, `modality`, `meta`, ...) of slice `index` (ours)."""
    if self.format != OURS:
      raise DataError(f"{self._dir}: a reference-format database has no volume table")
    return self.volumes[int(self._slice_volume[self._check_index(index)])]

  def slice_index_of(self, index: int) -> int:
    """Index along its volume's third axis of slice `index` (ours)."""
    if self.format != OURS:
      raise DataError(f"{self._dir}: a reference-format database has no volume table")
    return int(self._slice_index[self._check_index(index)])

  def _check_index(self, index) -> int:
    index = operator.index(index)
    if not 0 <= index < self._len:
      raise IndexError(f"slice index {index} out of range [0, {self._len})")
    return index

  def __getitem__(self, index) -> dict[str, Any]:
    index = self._check_index(index)
    key = lmdb_format.slice_key(index)
    where = f"{self._dir} key {key.decode()}"
    try:
      with self._get_env().begin(buffers=True) as txn:
        value = txn.get(key)
        if value is None:
          raise DataError(f"{where}: record missing")
        if self.format == REFERENCE:
          return {"image": lmdb_format.decode_reference_slice(value, where=where)}
        v = int(self._slice_volume[index])
        where += f" ({self.volumes[v]['subject']} slice {int(self._slice_index[index])})"
        image = lmdb_format.decode_slice(value, self._shapes[v], where=where,
                                         checksum=self._checksum)
    except lmdb.Error as e:
      raise DataError(f"{where}: LMDB read failed ({e})") from e
    return {"image": image, "subject": self.volumes[v]["subject"],
            "slice_index": int(self._slice_index[index])}
