"""Run by test_multidevice.py in a fresh process with 4 forced CPU devices: one ANDi train step
on a 1-device mesh and on the 4-device mesh, from the same state, batch and key.

Prints a JSON line {"max_abs_diff": ..., "max_abs_param": ..., "loss_1": ..., "loss_4": ...}.
"""

import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import Mesh  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uad_jax.engine import sharding  # pylint: disable=wrong-import-position
from uad_jax.engine.config import REPO_ROOT, load_config  # pylint: disable=wrong-import-position
from uad_jax.methods import andi  # pylint: disable=wrong-import-position


def step_on(mesh, config, state, batch, key):
  fn = jax.jit(functools.partial(andi.train_step, config),
               in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh),
                             sharding.replicated(mesh)),
               out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
  out = fn(sharding.replicate(state, mesh), jax.device_put(batch, sharding.batch_sharded(mesh)),
           key)
  return jax.block_until_ready(jax.device_get(out))   # block: CPU collectives (platform.md)


def main():
  assert jax.device_count() == 4, jax.devices()
  config = load_config(str(REPO_ROOT / "configs" / "andi.py") + ":tiny")
  config.data.batch_size = 8
  state = andi.init_state(config, jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(0, 1, (8, 16, 16, 1)).astype(np.float32)}
  key = jax.random.key(7)
  one, m1 = step_on(Mesh(np.asarray(jax.devices()[:1]), ("data",)), config, state, batch, key)
  four, m4 = step_on(sharding.make_mesh(), config, state, batch, key)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one, four))
  scale = jax.tree.leaves(jax.tree.map(lambda a: float(np.abs(a).max()), one.params))
  print(json.dumps({"max_abs_diff": max(diffs), "max_abs_param": max(scale),
                    "loss_1": float(m1["loss"]), "loss_4": float(m4["loss"])}))


if __name__ == "__main__":
  main()
