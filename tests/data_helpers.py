"""Tiny synthetic BIDS cohorts for the data-layer tests (test_data_*.py)."""

import csv
from pathlib import Path

import nibabel as nib
import numpy as np


def write_nifti(path, array, *, dtype=np.float32, affine=None) -> Path:
  """Writes `array` as NIfTI-1 (`.nii` or `.nii.gz` by the name), creating folders."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  img = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.eye(4) if affine is None else affine)
  img.to_filename(str(path))
  return path


def brain_volume(shape=(20, 20, 6), *, seed=0, empty_slices=(0,)) -> np.ndarray:
  """Random positive 'brain' (ellipsoid) on a zero background; `empty_slices` are all zero.

  Every non-empty slice is different, so slices can be told apart by their bytes.
  """
  rng = np.random.default_rng(seed)
  x, y = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape[:2]), indexing="ij")
  inside = (x / 0.8) ** 2 + (y / 0.7) ** 2 <= 1.0
  vol = rng.uniform(10.0, 1000.0, size=shape) * inside[:, :, None]
  vol[:, :, list(empty_slices)] = 0.0
  return vol.astype(np.float32)


def make_cohort(root, n_subjects, *, shape=(20, 20, 6), modality="T1w", lesion=False,
                participants=True, ext=".nii.gz") -> list[Path]:
  """BIDS cohort `root/sub-XXX/anat/sub-XXX_<modality><ext>`; returns the image paths.

  With `lesion`, each subject gets `<prefix>_seg-anomaly_mask.nii.gz` (a small block).
  With `participants`, `root/participants.tsv` lists age, sex, scanner, lesion_type.
  """
  root = Path(root)
  paths, rows = [], []
  for i in range(n_subjects):
    sub = f"sub-{i:03d}"
    anat = root / sub / "anat"
    paths.append(write_nifti(anat / f"{sub}_{modality}{ext}",
                             brain_volume(shape, seed=i), dtype=np.float32))
    if lesion:
      mask = np.zeros(shape, np.float32)
      mask[6:10, 7:12, 2:4] = 1.0
      write_nifti(anat / f"{sub}_seg-anomaly_mask.nii.gz", mask)
    rows.append([sub, f"{20.5 + i}", "FM"[i % 2], f"scanner{i % 3}",
                 "tumour" if lesion else "n/a"])
  if participants:
    with open(root / "participants.tsv", "w", newline="") as f:
      w = csv.writer(f, delimiter="\t", lineterminator="\n")
      w.writerow(["participant_id", "age", "sex", "scanner", "lesion_type"])
      w.writerows(rows)
  return paths


def write_csv(path, image_paths, *, header=("Path",), extra_rows=None) -> Path:
  """A split CSV: `header` line (None for none), then one row per image (+ `extra_rows`)."""
  path = Path(path)
  with open(path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    if header is not None:
      w.writerow(header)
    for i, p in enumerate(image_paths):
      w.writerow([str(p), *(extra_rows[i] if extra_rows else [])])
  return path


def reference_normalise(path, dtype) -> np.ndarray:
  """Independent re-statement of the reference loader + `utils/normalize.py` (no clipping)."""
  vol = np.asarray(nib.load(str(path)).dataobj, dtype=dtype)
  return (vol - vol.min()) / (vol.max() - vol.min())
