"""Builds the LMDB slice database of one split CSV (data.md §8).

For every volume in CSV order: load, validate, min-max normalise, and store every slice
`vol[:, :, k]` that has a non-zero voxel, uncropped, under the running 8-digit key. The database
is built under a temporary name and renamed to `<out_dir>/slices` only when complete. The map
size starts from an estimate and doubles whenever LMDB reports it full.
"""

from collections.abc import Sequence
from pathlib import Path

import lmdb
import numpy as np
import tqdm

from uad_jax.data import lmdb_format
from uad_jax.data.splits import read_split
from uad_jax.data.volumes import load_volume
from uad_jax.utils.atomic import atomic_path
from uad_jax.utils.checksum import file_sha256

DB_DIRNAME = "slices"
_PAGE = 4096


def estimate_map_size(n_volumes: int, volume_shape: Sequence[int], itemsize: int) -> int:
  """`n_volumes * Z * (H*W*itemsize + page) * 1.1` bytes (data.md §8.4), at least 1 MiB."""
  h, w, z = volume_shape
  return max(int(n_volumes * z * (h * w * itemsize + _PAGE) * 1.1), 1 << 20)


def nonempty_slices(vol: np.ndarray) -> np.ndarray:
  """Indices `k` along the third axis whose slice `vol[:, :, k]` has a non-zero voxel."""
  return np.flatnonzero((vol != 0).any(axis=(0, 1)))


def _put_all(env: lmdb.Environment, items: list[tuple[bytes, bytes]]) -> None:
  """Writes `items` in one transaction, enlarging the map (x2) until they fit."""
  while True:
    try:
      with env.begin(write=True) as txn:
        for key, value in items:
          txn.put(key, value)
      return
    except lmdb.MapFullError:
      env.set_mapsize(2 * env.info()["map_size"])


def write_slice_database(csv_path, out_dir, *, reference_compatible: bool = False,
                         clip_percentiles: Sequence[float] | None = None,
                         map_size: int | None = None, progress: bool = True) -> Path:
  """Builds `<out_dir>/slices` from the volumes listed in `csv_path`.

  Args:
    csv_path: split CSV with a `Path` column (see `splits.read_split`).
    out_dir: output folder; an existing `<out_dir>/slices` is replaced on success.
    reference_compatible: write the reference's format (pickled float64 arrays, no header,
      float64 normalisation) instead of ours (float32 records + `__meta__` header).
    clip_percentiles: optional `(pmin, pmax)` percentile clipping before min-max scaling.
    map_size: initial LMDB map size in bytes; default: an estimate from the first volume.
    progress: show a progress bar (stderr).

  Returns:
    The database directory `<out_dir>/slices`.

  Raises:
    DataError: bad CSV or volume; nothing is left under `<out_dir>/slices` then.
  """
  csv_path = Path(csv_path)
  records = read_split(csv_path)
  dtype = np.float64 if reference_compatible else np.float32
  encode = lmdb_format.encode_reference_slice if reference_compatible else lmdb_format.encode_slice
  db_dir = Path(out_dir) / DB_DIRNAME
  volumes = []
  count = 0
  with atomic_path(db_dir) as tmp:
    env = None
    try:
      for record in tqdm.tqdm(records, desc=f"create_lmdb {csv_path.name}", unit="vol",
                              disable=not progress):
        vol = load_volume(record.path, clip_percentiles=clip_percentiles, dtype=dtype)
        if env is None:
          # Durability only matters for the finished database: sync once at the end.
          env = lmdb.open(str(tmp), subdir=True, sync=False, metasync=False,
                          map_size=map_size or estimate_map_size(
                              len(records), vol.shape, np.dtype(dtype).itemsize))
        keep = nonempty_slices(vol)
        _put_all(env, [(lmdb_format.slice_key(count + j), encode(vol[:, :, k]))
                       for j, k in enumerate(keep)])
        volumes.append({"path": str(record.path), "subject": record.subject,
                        "modality": record.modality, "meta": record.meta,
                        "shape": list(vol.shape[:2]), "first_key": count,
                        "slice_indices": keep.tolist()})
        count += len(keep)
      if not reference_compatible:
        # The reference format has no header: its reader counts every entry as a slice.
        header = lmdb_format.make_header(
            count=count, volumes=volumes,
            normalisation={"method": "min-max", "clip_percentiles":
                           None if clip_percentiles is None else list(clip_percentiles)},
            source_csv={"path": str(csv_path.resolve()), "sha256": file_sha256(csv_path)})
        _put_all(env, [(lmdb_format.HEADER_KEY, lmdb_format.encode_header(header))])
      env.sync(True)
    finally:
      if env is not None:
        env.close()
  return db_dir
