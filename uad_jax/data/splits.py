"""Split CSV files (one image path per row, header `Path`) and subject metadata (data.md §4, §12).

Metadata for the bias analysis comes from the BIDS `participants.tsv` of the cohort (found at
the folder holding the `sub-*` folder of each image) and from optional extra CSV columns; CSV
values override participants.tsv. Metadata never changes which voxels are loaded.
"""

import csv
import dataclasses
import io
import math
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from uad_jax.data.volumes import modality_of
from uad_jax.errors import DataError
from uad_jax.utils.atomic import atomic_write_text

PATH_COLUMN = "Path"
SUBJECT_COLUMN = "subject"
# Metadata every record carries (None where unknown), in the order CSVs are written.
META_KEYS = ("dataset", "scanner", "age", "sex", "lesion_type", "lesion_volume_ml")
_FLOAT_KEYS = ("age", "lesion_volume_ml")
_MISSING = ("", "n/a", "na", "nan", "none")
_SUBJECT_ENTITY = re.compile(r"(?:^|_)(sub-[A-Za-z0-9]+)")
_NIFTI_NAME = re.compile(r"\.nii(\.gz)?$")


@dataclasses.dataclass(frozen=True)
class SubjectRecord:
  """One row of a split CSV.

  Attributes:
    path: absolute path of the image volume.
    subject: BIDS participant id (e.g. `sub-007`), from the CSV `subject` column or the name.
    modality: `'T1w'` / `'T2w'` from the file name (None for non-BIDS names).
    meta: `dataset`, `scanner`, `age` (years, float), `sex`, `lesion_type`,
      `lesion_volume_ml` (float) and any further participants.tsv / CSV columns; None = unknown.
  """
  path: Path
  subject: str
  modality: str | None
  meta: dict[str, Any]


def subject_from_name(image_path) -> str:
  """The `sub-<label>` entity of a BIDS file name, else the name without modality/extension."""
  name = Path(image_path).name
  m = _SUBJECT_ENTITY.search(name)
  if m:
    return m.group(1)
  stem = _NIFTI_NAME.sub("", name)
  modality = modality_of(name)
  return stem[: -len(modality) - 1] if modality else stem


def _clean_value(value: str | None, key: str, source: str) -> Any:
  """'n/a' / '' -> None; numeric columns -> float."""
  if value is None or value.strip().lower() in _MISSING:
    return None
  value = value.strip()
  if key in _FLOAT_KEYS:
    try:
      return float(value)
    except ValueError:
      raise DataError(f"{source}: column {key!r} must be a number, got {value!r}") from None
  return value


def bids_root_of(image_path) -> Path | None:
  """The folder holding the `sub-*` folder that contains the image, or None."""
  for parent in Path(image_path).parents:
    if parent.name.startswith("sub-"):
      return parent.parent
  return None


def read_participants(tsv_path) -> dict[str, dict[str, Any]]:
  """Reads a BIDS `participants.tsv`: participant_id -> {column: value}, 'n/a' -> None."""
  tsv_path = Path(tsv_path)
  with open(tsv_path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    if reader.fieldnames is None or "participant_id" not in reader.fieldnames:
      raise DataError(f"{tsv_path}: a BIDS participants.tsv needs a 'participant_id' column")
    table = {}
    for line, row in enumerate(reader, start=2):
      pid = (row.pop("participant_id") or "").strip()
      if not pid:
        raise DataError(f"{tsv_path}: line {line} has no participant_id")
      if not pid.startswith("sub-"):
        pid = "sub-" + pid
      table[pid] = {k: _clean_value(v, k, f"{tsv_path} line {line}")
                    for k, v in row.items() if k is not None}
  return table


def _looks_like_nifti_path(cell: str) -> bool:
  return bool(_NIFTI_NAME.search(cell.strip()))


def read_split(csv_path) -> list[SubjectRecord]:
  """Reads a split CSV into records, in file order (the order defines LMDB keys and results).

  The header must name a `Path` column. A header-less file (first line is a NIfTI path, as
  written by the reference's `check-data_create-perc.py`) is an error rather than a silently
  dropped first subject. Relative paths are taken relative to the CSV's folder.

  Raises:
    DataError: missing/empty file, header-less file, duplicate paths, mixed modalities, bad
      metadata values.
  """
  csv_path = Path(csv_path)
  if not csv_path.is_file():
    raise DataError(f"{csv_path}: split CSV not found")
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    rows = [(i, row) for i, row in enumerate(csv.reader(f), start=1)
            if any(cell.strip() for cell in row)]
  if not rows:
    raise DataError(f"{csv_path}: empty split CSV (expected a header line 'Path' and one image "
                    "path per row)")
  _, header = rows[0]
  header = [h.strip() for h in header]
  if PATH_COLUMN in header:
    path_col = header.index(PATH_COLUMN)
  elif _looks_like_nifti_path(header[0]):
    raise DataError(f"{csv_path}: no header line; the first line looks like a NIfTI path "
                    f"({header[0]!r}). Add a first line 'Path' (the column name) so that this "
                    "subject is not taken for the header")
  else:
    # The reference's volume loader uses the first column whatever its name (data.md §4).
    path_col = 0
    warnings.warn(f"{csv_path}: no 'Path' column in header {header}; using the first column "
                  f"{header[0]!r} as image paths", stacklevel=2)
  if len(rows) == 1:
    raise DataError(f"{csv_path}: split CSV has a header but no image paths")

  participants_cache: dict[Path, dict] = {}
  seen: dict[str, int] = {}
  records = []
  for line, row in rows[1:]:
    row = [c.strip() for c in row] + [""] * (len(header) - len(row))
    raw = row[path_col]
    if not raw:
      raise DataError(f"{csv_path}: line {line} has an empty '{header[path_col]}' value")
    path = Path(os.path.normpath(csv_path.parent.absolute() / raw))
    if str(path) in seen:
      raise DataError(f"{csv_path}: duplicate path {path} on lines {seen[str(path)]} and {line}")
    seen[str(path)] = line
    columns = {k: v for k, v in zip(header, row) if k and k != header[path_col]}
    records.append(_record(path, columns, f"{csv_path} line {line}", participants_cache))

  modalities = {r.modality for r in records}
  if len(modalities) > 1:
    raise DataError(f"{csv_path}: mixed modalities {sorted(map(str, modalities))} in one split "
                    "(the mask lookup depends on the modality; use one CSV per modality)")
  return records


def _record(path: Path, columns: dict[str, str], source: str,
            participants_cache: dict[Path, dict]) -> SubjectRecord:
  subject = _clean_value(columns.pop(SUBJECT_COLUMN, None), SUBJECT_COLUMN, source)
  subject = subject or subject_from_name(path)
  meta: dict[str, Any] = dict.fromkeys(META_KEYS)
  root = bids_root_of(path)
  tsv = root / "participants.tsv" if root is not None else None
  if tsv is not None and tsv.is_file():
    if tsv not in participants_cache:
      participants_cache[tsv] = read_participants(tsv)
    meta.update(participants_cache[tsv].get(subject, {}))
  for key, value in columns.items():
    value = _clean_value(value, key, source)
    if value is not None or key not in meta:
      meta[key] = value
  return SubjectRecord(path=path, subject=subject, modality=modality_of(path), meta=meta)


def _format_value(value: Any) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return ""
  return repr(value) if isinstance(value, float) else str(value)


def write_split(csv_path, records: Iterable[SubjectRecord],
                meta_keys: Sequence[str] | None = None) -> None:
  """Writes records as a split CSV (header `Path,subject,<meta...>`), atomically.

  Args:
    csv_path: output file.
    records: the rows, in order.
    meta_keys: metadata columns to write; default `META_KEYS` followed by every further key
      found in the records (sorted). Missing values are written as empty cells.
  """
  records = list(records)
  if meta_keys is None:
    extra = sorted({k for r in records for k in r.meta} - set(META_KEYS))
    meta_keys = list(META_KEYS) + extra
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow([PATH_COLUMN, SUBJECT_COLUMN, *meta_keys])
  for r in records:
    writer.writerow([str(r.path), r.subject, *(_format_value(r.meta.get(k)) for k in meta_keys)])
  atomic_write_text(csv_path, buf.getvalue())
