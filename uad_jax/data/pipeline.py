"""grain training pipeline over an LMDB slice database.

The slice stream is endless: epoch `e` visits all `N` slices of the database in the order of a
seeded permutation (`EpochShuffle`), and epoch `e + 1` follows without a gap. Global batch `g`
is stream positions `[g * B, (g + 1) * B)`; JAX process `p` of `P` reads the `p`-th of `P` equal
parts of it. So every batch is full (unlike the reference's `DataLoader(drop_last=False)`, a
batch may straddle two epochs; the jitted step sees one shape), and a multi-host run sees
exactly the global batches of a single-process run with the same seed.

Batch `g` is a pure function of `g`, so the iterator state is the number of batches consumed:
a resumed run continues with exactly the batches it would have seen, with any number of
workers. grain runs the pipeline (`MapDataset` of batch indices, a `ReadBatch` map reading
through `SliceDataSource`, optional reader threads and worker processes). Reading a whole
batch in one map call keeps grain's per-element overhead (tens of microseconds, more than
decoding one of our slices) off every slice.
"""

import dataclasses
import json
import sys
import threading
from typing import Any, Callable, Optional

import grain
import numpy as np

from uad_jax.data.lmdb_source import OURS, SliceDataSource
from uad_jax.data.volumes import center_crop_pad
from uad_jax.errors import ConfigError, DataError

_STATE_FORMAT = "uad_jax.train_iterator"
_STATE_VERSION = 1


class EpochShuffle:
  """Stream position -> slice index: epoch `e` is `default_rng([seed, e]).permutation(N)`.

  Permutations are cached (the two latest epochs; a batch or the reader threads may straddle
  an epoch boundary). Picklable, so grain can ship it to worker processes.
  """

  def __init__(self, num_records: int, seed: int):
    if not 0 <= seed < 2**32:
      raise ConfigError(f"seed must be in [0, 2**32), got {seed}")
    self.num_records = num_records
    self.seed = seed
    self._orders: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def __getstate__(self):
    return {"num_records": self.num_records, "seed": self.seed}

  def __setstate__(self, state):
    self.__init__(state["num_records"], state["seed"])

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Slice indices in the order epoch `epoch` visits them."""
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_records)
        self._orders[epoch] = order
        if len(self._orders) > 2:
          del self._orders[min(self._orders)]
      return order

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    """Slice indices at the given (non-negative) stream positions."""
    epochs, offsets = np.divmod(positions, self.num_records)
    keys = np.empty_like(positions)
    for epoch in np.unique(epochs):
      sel = epochs == epoch
      keys[sel] = self.epoch_order(int(epoch))[offsets[sel]]
    return keys


BatchTransform = Callable[[dict, np.random.Generator], dict]


def transform_rng(seed: int, stream: int, step: int, process_index: int) -> np.random.Generator:
  """The host generator of one batch transform: a pure function of (seed, stream, global batch
  index, process), so a resumed or re-sharded run draws exactly the same numbers."""
  return np.random.default_rng([seed, stream, step, process_index])


@dataclasses.dataclass(frozen=True)
class ReadBatch(grain.transforms.Map):
  """Batch index `g` -> `{"image": (local_batch, S, S, 1) float32, ...}` of this process.

  Each slice is center-cropped/padded to `image_size` (None: stored size, which must then be
  one size for the batch) and mapped from [0, 1] by `x * (hi - lo) + lo` with `(lo, hi) =
  value_range`: `(-1, 1)` is the reference's `2x - 1` (ANDi, Disyre), `(-3, 3)` its `6x - 3`
  (IterMask), bit for bit. `transform(batch, rng)` (a method's host-side per-batch transform,
  e.g. masks or augmentation) then runs with `transform_rng(seed, transform_stream, g,
  process_index)`.
  """
  source: SliceDataSource
  order: EpochShuffle
  global_batch_size: int
  process_index: int
  process_count: int
  image_size: int | None
  value_range: tuple[float, float]
  transform: Optional[BatchTransform] = None
  transform_stream: int = 0

  @property
  def local_batch_size(self) -> int:
    return self.global_batch_size // self.process_count

  def slice_indices(self, step: int) -> np.ndarray:
    """Slice indices of this process's part of global batch `step`."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return self.order(start + np.arange(self.local_batch_size, dtype=np.int64))

  def _image(self, index: int) -> np.ndarray:
    image = self.source[index]["image"]
    return image if self.image_size is None else center_crop_pad(image, self.image_size)

  def map(self, step: int) -> dict[str, np.ndarray]:
    indices = self.slice_indices(int(step))
    first = self._image(int(indices[0]))
    out = np.empty((len(indices), *first.shape, 1), np.float32)
    out[0, ..., 0] = first
    for j in range(1, len(indices)):
      image = self._image(int(indices[j]))
      if image.shape != first.shape:
        raise DataError(f"{self.source.path}: slices {indices[0]} and {indices[j]} differ in "
                        f"shape ({first.shape} vs {image.shape}); set image_size to batch them")
      out[j, ..., 0] = image
    lo, hi = self.value_range
    if (lo, hi) != (0.0, 1.0):
      out *= np.float32(hi - lo)
      out += np.float32(lo)
    batch = {"image": out}
    if self.transform is not None:
      rng = transform_rng(self.order.seed, self.transform_stream, int(step), self.process_index)
      batch = self.transform(batch, rng)
    return batch


class TrainIterator:
  """Endless iterator of `{"image": (local_batch, S, S, 1) float32}` batches.

  `get_state()` returns JSON bytes to store in a checkpoint; `set_state()` on an iterator
  built with the same database, batch size, seed, crop, value range and process layout
  continues with exactly the batches the saved one would have produced next. Call `close()`
  (or use `with`) to stop reader threads and worker processes.

  Attributes:
    source: the `SliceDataSource`.
    local_batch_size: batch size of this process.
    slices_per_epoch: slices in one epoch (all slices of the database, over all processes).
    step: number of batches consumed so far.
  """

  def __init__(self, read_batch: ReadBatch, *, worker_count: int, read_threads: int,
               worker_buffer_size: int):
    self._read_batch = read_batch
    self._worker_count = worker_count
    self._read_threads = read_threads
    self._worker_buffer_size = worker_buffer_size
    self.source = read_batch.source
    self.local_batch_size = read_batch.local_batch_size
    self.slices_per_epoch = len(read_batch.source)
    self.step = 0
    self._iterator = None
    self._closed = False

  def _fingerprint(self) -> dict[str, Any]:
    rb = self._read_batch
    return {"source": repr(rb.source), "seed": rb.order.seed,
            "global_batch_size": rb.global_batch_size, "process_index": rb.process_index,
            "process_count": rb.process_count, "image_size": rb.image_size,
            "value_range": list(rb.value_range), "transform_stream": rb.transform_stream}

  def _grain_iterator(self):
    if self._closed:
      raise ValueError("TrainIterator is closed")
    if self._iterator is None:
      ds = grain.MapDataset.range(self.step, sys.maxsize).map(self._read_batch)
      ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._read_threads,
                                                prefetch_buffer_size=self._read_threads))
      if self._worker_count > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=self._worker_count, per_worker_buffer_size=self._worker_buffer_size))
      self._iterator = iter(ds)
    return self._iterator

  def __iter__(self) -> "TrainIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._grain_iterator())
    self.step += 1
    return batch

  def describe_batch(self, step: int) -> str:
    """Which slices this process read for global batch `step` (0-based), for error messages:
    "sub-001 slice 40, sub-007 slice 12, ..." (database keys for the reference format)."""
    source = self._read_batch.source
    names = []
    for i in self._read_batch.slice_indices(step):
      if source.format == OURS:
        item = source.volume_of(int(i))["subject"]
        names.append(f"{item} slice {source.slice_index_of(int(i))}")
      else:
        names.append(f"key {int(i):08d}")
    return ", ".join(names)

  def get_state(self) -> bytes:
    return json.dumps({"format": _STATE_FORMAT, "version": _STATE_VERSION, "step": self.step,
                       "pipeline": self._fingerprint()}).encode("utf-8")

  def set_state(self, state: bytes) -> None:
    """Continues after the batches counted in `state` (from `get_state`)."""
    try:
      parsed = json.loads(state)
      ok = parsed.get("format") == _STATE_FORMAT and parsed.get("version") == _STATE_VERSION
    except (ValueError, AttributeError):
      ok = False
    if not ok:
      raise ConfigError("not a TrainIterator state (format "
                        f"{_STATE_FORMAT} version {_STATE_VERSION})")
    if parsed["pipeline"] != self._fingerprint():
      raise ConfigError(f"iterator state was saved for another pipeline: saved "
                        f"{parsed['pipeline']}, this one {self._fingerprint()}")
    self._stop_grain_iterator()
    self.step = int(parsed["step"])

  def _stop_grain_iterator(self) -> None:
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None

  def close(self) -> None:
    """Stops reader threads and worker processes; idempotent."""
    self._stop_grain_iterator()
    self._closed = True

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_train_iterator(lmdb_path, *, global_batch_size: int, image_size: int | None,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        worker_count: int = 0, value_range: tuple[float, float] = (0.0, 1.0),
                        read_threads: int = 0, worker_buffer_size: int = 2,
                        transform: Optional[BatchTransform] = None,
                        transform_stream: int = 0) -> TrainIterator:
  """Training batches from an LMDB slice database (either format).

  Args:
    lmdb_path: the database (`OUT_DIR/slices` or `OUT_DIR`).
    global_batch_size: batch size over all processes; must divide by `process_count`.
    image_size: center crop/pad size (224 in the paper); None keeps the stored size.
    seed: shuffling seed in [0, 2**32); see `EpochShuffle`.
    process_index, process_count: this JAX process and their number (`jax.process_index()`,
      `jax.process_count()`); each reads `global_batch_size // process_count` slices per batch.
    worker_count: grain worker processes (0 = read in this process; fastest on 2 cores).
    value_range: see `ReadBatch`.
    read_threads: grain threads reading batches ahead in this process (0 = on demand).
    worker_buffer_size: batches each worker prepares ahead.
    transform, transform_stream: see `ReadBatch` (the stream separates the draws of several
      training stages of one run).
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                      f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
  source = SliceDataSource(lmdb_path)
  read_batch = ReadBatch(source=source, order=EpochShuffle(len(source), seed),
                         global_batch_size=global_batch_size, process_index=process_index,
                         process_count=process_count, image_size=image_size,
                         value_range=(float(value_range[0]), float(value_range[1])),
                         transform=transform, transform_stream=transform_stream)
  return TrainIterator(read_batch, worker_count=worker_count, read_threads=read_threads,
                       worker_buffer_size=worker_buffer_size)
