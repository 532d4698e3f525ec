"""Scoring whole volumes slice-wise with a method's jitted `score_slices`, sharded over devices."""

import functools

import jax
import numpy as np

from uad_jax.engine import sharding


def chunk_size(split_size: int, num_devices: int) -> int:
  """Slices per scoring call: `split_size` rounded up to a multiple of the device count."""
  return -(-split_size // num_devices) * num_devices


class VolumeScorer:
  """Scores (Z, H, W) volumes in chunks of `config.eval.split_size` slices.

  Slices without any brain voxel are not sent to the network: every method zeroes the map on
  background, so their map is exactly 0. Each chunk is padded to one fixed size (one compiled
  program) and sharded over the `data` axis of the mesh; every process feeds its share and gets
  the whole result back.
  """

  def __init__(self, config, method, params, mesh, rng):
    self.mesh = mesh
    place = getattr(method, "place_params", None)
    self.params = place(params, mesh) if place else sharding.replicate(params, mesh)
    self.rng = rng
    self.size = chunk_size(config.eval.split_size, mesh.size)
    self._score = jax.jit(functools.partial(method.score_slices, config),
                          in_shardings=(jax.tree.map(lambda a: a.sharding, self.params),
                                        sharding.batch_sharded(mesh), sharding.replicated(mesh)),
                          out_shardings=sharding.replicated(mesh))

  def __call__(self, volume: np.ndarray, key_index: int) -> np.ndarray:
    """volume: (Z, H, W) float32 in [0, 1] -> anomaly maps (Z, H, W) float32.

    `key_index` (e.g. the subject's row in its CSV) selects the noise, so a subject's map does
    not depend on which other subjects are scored or on the number of devices.
    """
    maps = np.zeros(volume.shape, np.float32)
    brain_slices = np.flatnonzero(volume.reshape(volume.shape[0], -1).max(axis=1) > 0)
    rng = jax.random.fold_in(self.rng, key_index)
    pc, pi = jax.process_count(), jax.process_index()
    share = self.size // pc
    for c, start in enumerate(range(0, brain_slices.size, self.size)):
      idx = brain_slices[start:start + self.size]
      chunk = np.zeros((self.size,) + volume.shape[1:] + (1,), np.float32)
      chunk[:idx.size, ..., 0] = volume[idx]
      local = chunk[pi * share:(pi + 1) * share]
      images = jax.make_array_from_process_local_data(sharding.batch_sharded(self.mesh), local,
                                                      chunk.shape)
      out = self._score(self.params, images, jax.random.fold_in(rng, c))
      maps[idx] = np.asarray(jax.device_get(out))[:idx.size]
    return maps
