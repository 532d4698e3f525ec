"""Evaluation volumes: per subject the `(Z, H, W)` image, mask and metadata (data.md §10).

A background thread loads the next volumes while the consumer scores the current one.
"""

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from uad_jax.data.splits import SubjectRecord
from uad_jax.data.volumes import center_crop_pad, load_mask, load_volume
from uad_jax.errors import DataError, UadError


@dataclasses.dataclass
class EvalVolume:
  """One evaluation subject.

  Attributes:
    record: the split CSV row (path, subject, modality, metadata).
    image: `(Z, H, W)` float32 in [0, 1], normalised per volume, slices along the third NIfTI
      axis, center-cropped/padded to `image_size` (all slices, empty ones included).
    mask: `(Z, H, W)` bool anomaly mask, cropped like the image (all False for a healthy
      subject without mask file).
    lesion_voxels_uncropped: foreground voxels of the uncropped mask (1 mm voxels: mm^3),
      the lesion size of data.md §7.4.
  """
  record: SubjectRecord
  image: np.ndarray
  mask: np.ndarray
  lesion_voxels_uncropped: int


def load_eval_volume(record: SubjectRecord, *, image_size: int | None, require_masks: bool,
                     clip_percentiles: Sequence[float] | None = None,
                     data_type: str | None = None) -> EvalVolume:
  """Loads one subject (see `EvalVolume`).

  Args:
    record: the split CSV row.
    image_size: in-plane center crop/pad size; None keeps the stored size.
    require_masks: True for lesion cohorts (a missing mask is an error).
    clip_percentiles: optional percentile clipping before min-max scaling.
    data_type: the configured modality (`'T1w'`/`'T2w'`), checked against the file name.
  """
  vol = load_volume(record.path, clip_percentiles=clip_percentiles)
  mask = load_mask(record.path, vol.shape, required=require_masks, data_type=data_type)
  # (X, Y, Z) -> (Z, X, Y): slice k is vol[:, :, k], rows = NIfTI axis 0 (reference transpose).
  image = np.moveaxis(vol, 2, 0)
  mask_zxy = np.moveaxis(mask, 2, 0)
  if image_size is not None:
    image = center_crop_pad(image, image_size)
    mask_zxy = center_crop_pad(mask_zxy, image_size)
  return EvalVolume(record=record, image=np.ascontiguousarray(image),
                    mask=np.ascontiguousarray(mask_zxy),
                    lesion_voxels_uncropped=int(np.count_nonzero(mask)))


_DONE = object()


def iterate_volumes(records: Iterable[SubjectRecord], *, image_size: int | None,
                    require_masks: bool, clip_percentiles: Sequence[float] | None = None,
                    prefetch: int = 2, data_type: str | None = None) -> Iterator[EvalVolume]:
  """Yields `EvalVolume`s in record order, reading up to `prefetch` volumes ahead in a thread.

  Arguments as in `load_eval_volume`.

  An error while loading is re-raised in the consumer at the position of the failing record
  (as `DataError` naming the file). If the consumer stops early (break, exception, `close()`),
  the reader thread stops too.
  """
  if prefetch < 1:
    raise ValueError(f"prefetch must be >= 1, got {prefetch}")
  records = list(records)
  out: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def read() -> None:
    for record in records:
      try:
        item = load_eval_volume(record, image_size=image_size, require_masks=require_masks,
                                clip_percentiles=clip_percentiles, data_type=data_type)
      except UadError as e:
        item = e
      except Exception as e:  # anything unexpected still names the file in the consumer
        item = DataError(f"{record.path}: cannot load ({type(e).__name__}: {e})")
        item.__cause__ = e
      if not put(item) or isinstance(item, BaseException):
        return
    put(_DONE)

  thread = threading.Thread(target=read, name="uad_jax-volume-reader", daemon=True)
  thread.start()
  try:
    while True:
      item = out.get()
      if item is _DONE:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join()
