"""Scoring whole volumes with a method's jitted `score`, in chunks sharded over devices.

Two modes (`Method.scoring_mode`):
- 'slice': slices are scored independently. Slices without any brain voxel are not sent to the
  network (every method zeroes the map on background, so their map is exactly 0).
- 'chunk': every slice of the volume, in order, in consecutive chunks of `eval.split_size`
  slices (the reference's unit for per-chunk operations such as RIAD's minimum subtraction).

Either way a chunk holds at most `eval.split_size` slices (its membership never depends on the
device count) and is zero-padded to one compiled size, `split_size` rounded up to a multiple of
the device count; the method gets `valid` (False on padding rows) and must ignore those rows.
Maps are therefore the same on any number of devices when `eval.split_size` is a multiple of the
device count; otherwise the padded batch shape changes random draws of stochastic methods
(e.g. ANDi's noise is drawn for the whole padded batch).
"""

import functools

import jax
import numpy as np

from uad_jax.engine import sharding


def chunk_size(split_size: int, num_devices: int) -> int:
  """Rows per scoring call: `split_size` rounded up to a multiple of the device count."""
  return -(-split_size // num_devices) * num_devices


class VolumeScorer:
  """Scores (Z, H, W) volumes; every process feeds its share of each chunk and gets the whole
  result back."""

  def __init__(self, config, method, params, mesh, rng):
    self.mesh = mesh
    self.mode = method.scoring_mode
    self.params = (method.place_params(params, mesh) if method.place_params
                   else sharding.replicate(params, mesh))
    self.rng = rng
    self.split = config.eval.split_size
    self.size = chunk_size(self.split, mesh.size)
    self._score = jax.jit(functools.partial(method.score, config),
                          in_shardings=(jax.tree.map(lambda a: a.sharding, self.params),
                                        sharding.batch_sharded(mesh),
                                        sharding.batch_sharded(mesh), sharding.replicated(mesh)),
                          out_shardings=sharding.replicated(mesh))

  def slices_to_score(self, volume: np.ndarray) -> np.ndarray:
    """Indices of the slices sent to the network, in order."""
    if self.mode == "chunk":
      return np.arange(volume.shape[0])
    return np.flatnonzero(volume.reshape(volume.shape[0], -1).max(axis=1) > 0)

  def __call__(self, volume: np.ndarray, key_index: int) -> np.ndarray:
    """volume: (Z, H, W) float32 in [0, 1] -> anomaly maps (Z, H, W) float32.

    `key_index` (e.g. the subject's row in its CSV) selects the random draws, so a subject's map
    does not depend on which other subjects are scored.
    """
    maps = np.zeros(volume.shape, np.float32)
    indices = self.slices_to_score(volume)
    rng = jax.random.fold_in(self.rng, key_index)
    pc, pi = jax.process_count(), jax.process_index()
    share = self.size // pc
    batch_sharding = sharding.batch_sharded(self.mesh)
    for c, start in enumerate(range(0, indices.size, self.split)):
      idx = indices[start:start + self.split]
      chunk = np.zeros((self.size,) + volume.shape[1:] + (1,), np.float32)
      chunk[:idx.size, ..., 0] = volume[idx]
      valid = np.arange(self.size) < idx.size
      part = slice(pi * share, (pi + 1) * share)
      images = jax.make_array_from_process_local_data(batch_sharding, chunk[part], chunk.shape)
      valid = jax.make_array_from_process_local_data(batch_sharding, valid[part], valid.shape)
      out = self._score(self.params, images, valid, jax.random.fold_in(rng, c))
      maps[idx] = np.asarray(jax.device_get(out))[:idx.size]
    return maps
