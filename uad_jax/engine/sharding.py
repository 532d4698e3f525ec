"""Data parallelism: one `data` mesh axis over every device of every process.

Parameters and optimiser state are replicated; batches are sharded on their leading axis.
Each process feeds its local slice of the global batch (`global_batch`).
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def global_batch(local_batch, mesh: Mesh):
  """Host-local numpy arrays (leading axis = this process's share) -> global sharded jax arrays."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def must_block_every_step(requested: bool) -> bool:
  """Multi-device jit on the CPU backend can deadlock in collectives unless each step is waited
  for (platform.md: 12 of 17 unblocked runs hung on 4 forced devices)."""
  return requested or (jax.default_backend() == "cpu" and jax.device_count() > 1)
