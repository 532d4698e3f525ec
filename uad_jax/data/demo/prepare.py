"""The data of the `:demo` presets, built when absent: the demo cohort (`<root>/cohort`) and its
training slice database (`<root>/lmdb/train_<modality>`), the same files `python -m uad_jax.demo`
writes. Both steps are resumable: a complete cohort and a database of the same CSV content are
reused as they are.
"""

import logging
from pathlib import Path

from uad_jax.data import lmdb_format
from uad_jax.data.demo import cohort as demo_cohort
from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.lmdb_writer import DB_DIRNAME, write_slice_database
from uad_jax.errors import DataError
from uad_jax.utils.checksum import file_sha256

log = logging.getLogger(__name__)


def ensure_database(csv: Path, out_dir: Path) -> Path:
  """The slice LMDB of `csv`, built unless one from the same CSV content and of the current
  format version exists."""
  db = Path(out_dir) / DB_DIRNAME
  if db.is_dir():
    try:
      header = SliceDataSource(db).header or {}
    except DataError as e:
      log.warning("rebuilding %s: %s", db, e)
      header = {}
    if (header.get("source_csv", {}).get("sha256") == file_sha256(csv)
        and header.get("version") == lmdb_format.FORMAT_VERSION):
      return db
  log.info("building the training slice database %s from %s", db, csv)
  return write_slice_database(csv, out_dir)


def demo_root(config) -> Path | None:
  """The demo folder a config reads (`common.use_demo_cohort(config, root)`), else None."""
  m = config.data.modality
  suffix = f"/lmdb/train_{m}"
  lmdb = str(config.data.train_lmdb)
  if not lmdb.endswith(suffix):
    return None
  root = lmdb[:-len(suffix)]
  if str(config.eval.val_healthy_csv) != f"{root}/cohort/splits/val_healthy_{m}.csv":
    return None
  return Path(root)


def ensure_demo_data(config) -> None:
  """Builds the demo cohort and the training database of a `:demo` config when they are
  missing (logged); other configs are left alone."""
  root = demo_root(config)
  if root is None:
    return
  splits = demo_cohort.split_paths(root / "cohort")
  db = root / "lmdb" / f"train_{config.data.modality}"
  if all(p.is_file() for p in splits.values()) and (db / DB_DIRNAME / "data.mdb").is_file():
    return
  log.info("the demo data of this preset is missing: generating the demo cohort in %s",
           root / "cohort")
  splits = demo_cohort.generate(root / "cohort")
  ensure_database(splits[f"train_{config.data.modality}"], db)
