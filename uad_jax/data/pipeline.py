"""grain training pipeline over an LMDB slice database.

Seeded shuffling (a new permutation each epoch), endless epochs, center crop, scaling to the
range a method wants, full batches, optional worker processes, sharding by JAX process, and a
checkpointable iterator state.

Unlike the reference's `DataLoader(drop_last=False)`, every batch is full: the record stream
rolls over from one epoch into the next inside a batch, so the jitted train step sees one
shape. An "epoch" is therefore `slices_per_epoch` slices, not a whole number of batches.
"""

import dataclasses
from typing import Any

import grain
import numpy as np

from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.volumes import center_crop_pad
from uad_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CropAndScale(grain.transforms.Map):
  """Slice dict -> `{"image": (S, S, 1) float32}`, center-cropped and mapped from [0, 1].

  Attributes:
    image_size: crop/pad size `S` (torchvision CenterCrop semantics); None keeps the stored size.
    value_range: `(lo, hi)`: `x -> x * (hi - lo) + lo`, e.g. `(-1, 1)` gives the reference's
      `2x - 1` (ANDi, Disyre) and `(-3, 3)` its `6x - 3` (IterMask), bit for bit.
  """
  image_size: int | None
  value_range: tuple[float, float] = (0.0, 1.0)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    image = element["image"]
    if self.image_size is not None:
      image = center_crop_pad(image, self.image_size)
    lo, hi = self.value_range
    if (lo, hi) != (0.0, 1.0):
      image = image * np.float32(hi - lo) + np.float32(lo)
    return {"image": np.asarray(image, dtype=np.float32)[..., None]}


class TrainIterator:
  """Endless iterator of `{"image": (local_batch, S, S, 1) float32}` batches.

  `get_state()` returns grain's state (JSON bytes) to store in a checkpoint; `set_state()` on a
  fresh iterator built with the same arguments continues with exactly the batches the saved
  one would have produced next. Call `close()` (or use `with`) to stop worker processes.

  Attributes:
    source: the `SliceDataSource`.
    local_batch_size: batch size of this process.
    slices_per_epoch: slices of this process's shard (one pass over them is one epoch).
  """

  def __init__(self, loader: grain.DataLoader, source: SliceDataSource, local_batch_size: int,
               slices_per_epoch: int):
    self._iterator = iter(loader)
    self.source = source
    self.local_batch_size = local_batch_size
    self.slices_per_epoch = slices_per_epoch

  def __iter__(self) -> "TrainIterator":
    return self

  def _open_iterator(self) -> grain.DataLoaderIterator:
    if self._iterator is None:
      raise ValueError("TrainIterator is closed")
    return self._iterator

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._open_iterator())

  def get_state(self) -> bytes:
    return self._open_iterator().get_state()

  def set_state(self, state: bytes) -> None:
    self._open_iterator().set_state(state)

  def close(self) -> None:
    """Stops worker processes and releases shared memory; idempotent."""
    # grain 0.2.18's DataLoaderIterator has no close(); the dataset iterator it wraps does.
    # Dropping the reference now also lets grain's own finalizers run while the interpreter
    # is alive (at shutdown they fail noisily).
    inner = getattr(self._iterator, "_iterator", None)
    if inner is not None:
      inner.close()
    self._iterator = None

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_train_iterator(lmdb_path, *, global_batch_size: int, image_size: int | None,
                        seed: int, process_index: int = 0, process_count: int = 1,
                        worker_count: int = 0, value_range: tuple[float, float] = (0.0, 1.0),
                        read_threads: int = 0, worker_buffer_size: int = 2) -> TrainIterator:
  """Training batches from an LMDB slice database (either format).

  Args:
    lmdb_path: the database (`OUT_DIR/slices` or `OUT_DIR`).
    global_batch_size: batch size over all processes; must divide by `process_count`.
    image_size: center crop/pad size (224 in the paper); None keeps the stored size.
    seed: shuffling seed (non-negative, < 2**32); epoch `e` uses the permutation of `seed + e`.
    process_index, process_count: this JAX process and their number (`jax.process_index()`,
      `jax.process_count()`): each process reads its own contiguous block of
      `len(source) // process_count` slices (the remainder is dropped so all processes have
      equally long epochs) and shuffles it.
    worker_count: grain worker processes (0 = read in this process; fastest on 2 cores).
    value_range: see `CropAndScale`.
    read_threads: grain reader threads per process (0 = read synchronously).
    worker_buffer_size: batches each worker prepares ahead.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ConfigError(f"global_batch_size {global_batch_size} must be a positive multiple of "
                      f"process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index {process_index} not in [0, {process_count})")
  source = SliceDataSource(lmdb_path)
  slices_per_epoch = len(source) // process_count
  if slices_per_epoch == 0:
    raise ConfigError(f"{source.path}: {len(source)} slices cannot be shared by "
                      f"{process_count} processes")
  local_batch_size = global_batch_size // process_count
  shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                      drop_remainder=True)
  sampler = grain.samplers.IndexSampler(num_records=len(source), shard_options=shard,
                                        shuffle=True, num_epochs=None, seed=seed)
  loader = grain.DataLoader(
      data_source=source, sampler=sampler, shard_options=shard,
      operations=[CropAndScale(image_size, tuple(map(float, value_range))),
                  grain.transforms.Batch(local_batch_size, drop_remainder=True)],
      worker_count=worker_count, worker_buffer_size=worker_buffer_size,
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=2 * local_batch_size))
  return TrainIterator(loader, source, local_batch_size, slices_per_epoch)
