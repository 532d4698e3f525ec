"""Byte formats of the LMDB slice database: ours and the reference's (data.md §8.3, §8.5).

Both formats key slice `i` as `f"{i:08d}"` (ASCII), so keys are interchangeable.

- Reference: each value is a pickled `(H, W)` float64 array; there is no other key. It is read
  with `RestrictedUnpickler`, which rebuilds numpy arrays and nothing else, so a database from
  a stranger cannot run code.
- Ours (`FORMAT_NAME`, `FORMAT_VERSION`): each value is the raw little-endian float32 slice
  (C order) followed by the CRC-32 of those bytes (4 bytes, little-endian), half the
  reference's size, decoded with one copy out of the memory map; the key `__meta__` holds a JSON
  header: record layout, count, normalisation, source CSV checksum and a volume table from which
  every slice's subject and slice index follow. A record of the wrong length or checksum is
  reported as corrupt. The CRC costs about 0.1 ms per 240x240 slice (10x the copy; 13 ms per
  batch of 128), the price of never training on garbage. Version 1 (no checksum) is still read,
  with a warning.

Every decoded slice, in either format, must be finite: NaN/inf is reported as corrupt.
"""

import codecs
import io
import json
import pickle
import zlib
from typing import Any

import numpy as np

from uad_jax.errors import DataError

FORMAT_NAME = "uad_jax.slices"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: records without checksum
HEADER_KEY = b"__meta__"
RECORD_DTYPE = np.dtype("<f4")
CHECKSUM = "crc32-le-suffix"   # header["record"]["checksum"] of version 2
_CRC_BYTES = 4
# CPython 3.8-3.13's default, i.e. what the reference tool wrote.
REFERENCE_PICKLE_PROTOCOL = 4


def slice_key(index: int) -> bytes:
  """LMDB key of slice `index`: 8-digit zero-padded decimal, ASCII."""
  return f"{index:08d}".encode("ascii")


def encode_slice(image: np.ndarray) -> bytes:
  """Our record: the raw little-endian float32 bytes of a 2-D slice (C order) + their CRC-32."""
  data = np.ascontiguousarray(image, dtype=RECORD_DTYPE).tobytes()
  return data + zlib.crc32(data).to_bytes(_CRC_BYTES, "little")


def decode_slice(value, shape: tuple[int, int], *, where: str, checksum: bool = True
                 ) -> np.ndarray:
  """Inverse of `encode_slice`: a writable `(H, W)` float32 array (a copy of `value`).

  Args:
    value: the stored bytes (bytes or a buffer valid for the duration of the call).
    shape: the slice shape recorded in the header.
    where: `<database> key <key> (...)`, for error messages.
    checksum: the record ends with its CRC-32 (format version 2; version 1 has none).

  Raises:
    DataError: wrong length, checksum mismatch or a non-finite value (a corrupt record).
  """
  expected = shape[0] * shape[1] * RECORD_DTYPE.itemsize + (_CRC_BYTES if checksum else 0)
  view = memoryview(value)
  if view.nbytes != expected:
    raise DataError(f"{where}: corrupt record: {view.nbytes} bytes, expected {expected} for a "
                    f"{shape[0]}x{shape[1]} float32 slice"
                    + (" with its checksum" if checksum else ""))
  data = view[:expected - _CRC_BYTES] if checksum else view
  if checksum:
    stored = int.from_bytes(view[expected - _CRC_BYTES:], "little")
    if zlib.crc32(data) != stored:
      raise DataError(f"{where}: corrupt record: checksum mismatch (the slice's bytes changed "
                      "after it was written); rebuild the database with "
                      "`python -m uad_jax.data.create_lmdb`")
  return check_finite(np.frombuffer(data, dtype=RECORD_DTYPE).reshape(shape).astype(np.float32),
                      where)


def check_finite(image: np.ndarray, where: str) -> np.ndarray:
  """`image`, or a DataError naming `where` when it holds NaN or infinity."""
  if not np.isfinite(image).all():
    bad = int(np.size(image) - np.isfinite(image).sum())
    raise DataError(f"{where}: corrupt record: {bad} non-finite values (NaN/inf) in the slice")
  return image


# Every global a pickled numpy array needs (numpy 1.x and 2.x module names; protocols 2-5).
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): np._core.numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # protocol 2 spells array bytes as latin-1 text
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that only resolves the numpy globals needed to rebuild an ndarray."""

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _NUMPY_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed (only numpy "
                                   "arrays may be unpickled)") from None


def encode_reference_slice(image: np.ndarray) -> bytes:
  """The reference's record: pickle of the float64 `(H, W)` array."""
  return pickle.dumps(np.asarray(image, dtype=np.float64), protocol=REFERENCE_PICKLE_PROTOCOL)


def decode_reference_slice(value, *, where: str) -> np.ndarray:
  """A reference record as a `(H, W)` float32 array, unpickled with `RestrictedUnpickler`."""
  try:
    array = RestrictedUnpickler(io.BytesIO(value)).load()
  except Exception as e:  # any unpickling failure of untrusted bytes is a corrupt record
    raise DataError(f"{where}: corrupt or disallowed pickle record ({type(e).__name__}: {e})"
                    ) from e
  if not isinstance(array, np.ndarray) or array.ndim != 2 or array.dtype.kind != "f":
    desc = (f"array of shape {array.shape} and dtype {array.dtype}"
            if isinstance(array, np.ndarray) else type(array).__name__)
    raise DataError(f"{where}: expected a 2-D float array, got {desc}")
  return check_finite(array.astype(np.float32), where)


def make_header(*, count: int, volumes: list[dict[str, Any]], normalisation: dict[str, Any],
                source_csv: dict[str, Any]) -> dict[str, Any]:
  """The `__meta__` header of our format.

  `shape` is the `[H, W]` of every slice, or None when volumes differ (then per volume).

  Args:
    count: number of slice records (keys `0 .. count-1`).
    volumes: one entry per source volume in key order: `path`, `subject`, `modality`, `meta`,
      `shape` (`[H, W]` of its slices), `first_key`, `slice_indices` (the kept slice indices
      along the volume's third axis, ascending; slice `first_key + j` is `slice_indices[j]`).
    normalisation: e.g. `{"method": "min-max", "clip_percentiles": None}`.
    source_csv: `{"path": ..., "sha256": ...}`.
  """
  shapes = {tuple(v["shape"]) for v in volumes}
  return {
      "format": FORMAT_NAME,
      "version": FORMAT_VERSION,
      "record": {"dtype": RECORD_DTYPE.str, "order": "C", "checksum": CHECKSUM},
      "count": count,
      "shape": list(shapes.pop()) if len(shapes) == 1 else None,  # None: see `volumes`
      "normalisation": normalisation,
      "source_csv": source_csv,
      "volumes": volumes,
  }


def encode_header(header: dict[str, Any]) -> bytes:
  return json.dumps(header, separators=(",", ":")).encode("utf-8")


def decode_header(value, *, where: str) -> dict[str, Any]:
  """Parses and checks a `__meta__` header.

  Raises:
    DataError: not JSON, not our format, another format version, inconsistent volume table.
  """
  try:
    header = json.loads(bytes(value).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DataError(f"{where}: header record is not valid JSON ({e})") from e
  if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
    raise DataError(f"{where}: header record is not a {FORMAT_NAME} header")
  if header.get("version") not in READABLE_VERSIONS:
    raise DataError(f"{where}: format version {header.get('version')!r} is not supported (this "
                    f"uad_jax reads versions {list(READABLE_VERSIONS)}); rebuild the database "
                    "with `python -m uad_jax.data.create_lmdb`")
  record = header.get("record", {})
  expected_checksum = CHECKSUM if header["version"] >= 2 else None
  if record.get("dtype") != RECORD_DTYPE.str or record.get("checksum") != expected_checksum:
    raise DataError(f"{where}: unsupported record layout {record}")
  try:
    expected = 0
    for v in header["volumes"]:
      if v["first_key"] != expected or len(v["shape"]) != 2:
        raise DataError(f"{where}: header volume table is inconsistent at {v['path']}")
      expected += len(v["slice_indices"])
    count = header["count"]
  except (KeyError, TypeError) as e:
    raise DataError(f"{where}: malformed header ({type(e).__name__}: {e})") from e
  if expected != count:
    raise DataError(f"{where}: header counts {header['count']} slices but its volume table "
                    f"lists {expected}")
  return header
