"""NIfTI volumes: load, validate, min-max normalise, center crop/pad, anomaly masks (data.md §5-7).

Volumes keep nibabel's raw voxel order `(X, Y, Z)`: no reorientation, no resampling; the slice
axis is the third axis. Every check raises `DataError` with the offending file in the message.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from uad_jax.errors import ConfigError, DataError

MODALITIES = ("T1w", "T2w")
MASK_SUFFIX = "_seg-anomaly_mask.nii.gz"
_MODALITY_SUFFIX = re.compile(r"_(T1w|T2w)\.nii(\.gz)?$")


def _load_nifti(path: Path, what: str) -> nib.Nifti1Image:
  """Opens `path` as NIfTI (header only; voxels are read by the caller)."""
  if not path.is_file():
    raise DataError(f"{path}: {what} not found")
  try:
    img = nib.load(str(path))
  except Exception as e:  # nibabel raises ImageFileError, OSError, EOFError... for bad files
    raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from e
  if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
    raise DataError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
  if len(img.shape) != 3:
    raise DataError(f"{path}: expected a 3-D volume, got shape {tuple(img.shape)}")
  return img


def _read_voxels(img: nib.Nifti1Image, path: Path, dtype) -> np.ndarray:
  """Voxels exactly as the reference reads them: `asarray(dataobj, dtype)` (applies scl_slope)."""
  try:
    return np.asarray(img.dataobj, dtype=dtype)
  except Exception as e:  # truncated gzip streams fail only here
    raise DataError(f"{path}: cannot read voxel data ({type(e).__name__}: {e})") from e


def normalise_min_max(vol: np.ndarray, clip_percentiles: Sequence[float] | None = None,
                      *, name: str = "volume") -> np.ndarray:
  """Per-volume min-max scaling to [0, 1] (reference `utils/normalize.py`), same dtype as `vol`.

  Args:
    vol: array of any shape; statistics are global over all voxels.
    clip_percentiles: optional `(pmin, pmax)`, e.g. `(1, 99)`: clip to numpy's (linear)
      percentiles computed over all voxels, background zeros included, before scaling.
    name: used in error messages (the file path).
  """
  v = vol
  if clip_percentiles is not None:
    lo, hi = np.percentile(vol, clip_percentiles)
    v = np.clip(vol, lo, hi)
  vmin, vmax = v.min(), v.max()
  if not vmax > vmin:
    # The reference divides by zero here and gets an all-NaN volume whose slices pass the
    # "non-empty" test (data.md §5.2 pitfall), so a constant volume is rejected.
    raise DataError(f"{name}: constant volume (min = max = {vmin}) after "
                    f"{'percentile clipping' if clip_percentiles is not None else 'loading'}; "
                    "cannot min-max normalise")
  return (v - vmin) / (vmax - vmin)


def load_volume(path, *, clip_percentiles: Sequence[float] | None = None,
                dtype=np.float32) -> np.ndarray:
  """Loads, validates and normalises one image volume.

  Args:
    path: a `.nii` / `.nii.gz` file.
    clip_percentiles: optional `(pmin, pmax)` percentile clipping (off in the reference).
    dtype: float32 (ours); float64 reproduces the reference LMDB builder bit for bit.

  Returns:
    `(X, Y, Z)` array of `dtype` in [0, 1], raw voxel order.

  Raises:
    DataError: missing file, not NIfTI, not 3-D, NaN/Inf voxels, constant volume.
  """
  path = Path(path)
  vol = _read_voxels(_load_nifti(path, "image volume"), path, dtype)
  finite = np.isfinite(vol)
  if not finite.all():
    raise DataError(f"{path}: {vol.size - int(finite.sum())} of {vol.size} voxels are NaN or Inf")
  return normalise_min_max(vol, clip_percentiles, name=str(path))


def _crop_pad_axis(array: np.ndarray, size: int, axis: int) -> np.ndarray:
  n = array.shape[axis]
  if n < size:
    pad = [(0, 0)] * array.ndim
    pad[axis] = ((size - n) // 2, (size - n + 1) // 2)
    return np.pad(array, pad)
  # torchvision: `int(round((n - size) / 2.0))` with Python's round-half-to-even.
  offset = int(round((n - size) / 2.0))
  index = [slice(None)] * array.ndim
  index[axis] = slice(offset, offset + size)
  return array[tuple(index)]


def center_crop_pad(array: np.ndarray, size, axes: Sequence[int] = (-2, -1)) -> np.ndarray:
  """Center crop / zero pad to `size` along `axes` (torchvision `CenterCrop` semantics, §6).

  An axis longer than the target keeps `[o, o + size)` with `o = round((n - size) / 2)`
  (round half to even: 240 -> 224 keeps 8..231); a shorter one is zero-padded with
  `floor((size - n) / 2)` before and `ceil((size - n) / 2)` after (219 -> 224 pads 2 / 3).

  Args:
    array: any array; other axes are untouched.
    size: an int (same for all axes) or one int per axis.
    axes: the axes to crop/pad (default: the last two, in-plane).
  """
  sizes = (size,) * len(axes) if isinstance(size, (int, np.integer)) else tuple(size)
  if len(sizes) != len(axes):
    raise ConfigError(f"center_crop_pad: {len(sizes)} sizes for {len(axes)} axes")
  for s, axis in zip(sizes, axes):
    array = _crop_pad_axis(array, int(s), axis)
  return array


def undo_center_crop_pad(array: np.ndarray, sizes: Sequence[int],
                         axes: Sequence[int] = (-2, -1)) -> np.ndarray:
  """The inverse placement of `center_crop_pad`: `array` (cropped/padded along `axes`) back on
  a grid of `sizes` along those axes. Cropped-away regions are 0; padding is dropped."""
  for n, axis in zip(sizes, axes):
    size = array.shape[axis]
    index = [slice(None)] * array.ndim
    if n <= size:   # the axis was padded (or kept): drop the padding
      before = (size - n) // 2
      index[axis] = slice(before, before + n)
      array = array[tuple(index)]
    else:           # the axis was cropped at torchvision's offset: put it back there
      shape = list(array.shape)
      shape[axis] = n
      out = np.zeros(shape, array.dtype)
      offset = int(round((n - size) / 2.0))
      index[axis] = slice(offset, offset + size)
      out[tuple(index)] = array
      array = out
  return array


def modality_of(image_path) -> str | None:
  """`'T1w'` / `'T2w'` from a BIDS file name ending `_T1w.nii[.gz]` / `_T2w.nii[.gz]`, else None."""
  m = _MODALITY_SUFFIX.search(Path(image_path).name)
  return m.group(1) if m else None


def mask_path_for(image_path, data_type: str | None = None) -> Path:
  """The anomaly mask of an image: `<prefix>_seg-anomaly_mask.nii.gz` in the image's folder.

  `data_type` is derived from the `_T1w` / `_T2w` suffix of the file name. A configured
  `data_type` that disagrees is an error: the reference would silently miss the mask and
  evaluate the subject lesion-free (data.md §7.1 pitfall). The prefix is the name before the
  modality suffix, which equals the reference's `name.split('_' + data_type)[0]` for every
  BIDS name (they differ only for names containing the modality twice).
  """
  image_path = Path(image_path)
  if data_type is not None and data_type not in MODALITIES:
    raise ConfigError(f"data_type must be one of {MODALITIES}, got {data_type!r}")
  m = _MODALITY_SUFFIX.search(image_path.name)
  if m is None:
    raise DataError(f"{image_path}: cannot derive the modality; expected a BIDS name ending "
                    "'_T1w.nii.gz' or '_T2w.nii.gz'")
  if data_type is not None and m.group(1) != data_type:
    raise ConfigError(f"{image_path}: file name says {m.group(1)} but data_type is {data_type!r}")
  return image_path.with_name(image_path.name[:m.start()] + MASK_SUFFIX)


def load_mask(image_path, image_shape: Sequence[int], *, required: bool,
              data_type: str | None = None) -> np.ndarray:
  """Loads the binarised anomaly mask of an image (data.md §7).

  Args:
    image_path: the image whose mask is wanted (see `mask_path_for`).
    image_shape: `(X, Y, Z)` of the image; the mask must have exactly this shape.
    required: True for lesion cohorts: a missing mask is an error. False for healthy cohorts:
      a missing mask means "no lesion" (all False).
    data_type: optional configured modality, checked against the file name.

  Returns:
    `(X, Y, Z)` bool array, `mask > 0.5` (labels such as BraTS 1/2/4 all become foreground).
  """
  path = mask_path_for(image_path, data_type)
  if not path.exists():
    if required:
      raise DataError(f"{path}: anomaly mask not found for {image_path} (masks are required for "
                      "this cohort; a missing mask would score the subject as lesion-free)")
    return np.zeros(tuple(image_shape), dtype=bool)
  img = _load_nifti(path, "anomaly mask")
  if tuple(img.shape) != tuple(image_shape):
    raise DataError(f"{path}: mask shape {tuple(img.shape)} differs from the shape "
                    f"{tuple(image_shape)} of its image {image_path}")
  m = _read_voxels(img, path, np.float32)
  if not np.isfinite(m).all():
    # The reference would turn NaN voxels into foreground (§7.2); a label file never has them.
    raise DataError(f"{path}: anomaly mask has NaN or Inf voxels")
  return m > 0.5
