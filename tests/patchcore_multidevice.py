"""Run by test_patchcore_engine.py in a fresh process with 4 forced CPU devices: PatchCore scoring
with the bank sharded over 4 devices against the same bank on a 1-device mesh.

Prints a JSON line: max difference of patch scores and of volume maps (relative to the largest
squared descriptor norm, the scale of float32 rounding in the distance expansion), whether the
nearest-row indices agree, the per-device bank shard shape, and the largest all-gather in the
compiled program relative to the bank size.
"""

import functools
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import Mesh  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from uad_jax.engine import sharding  # pylint: disable=wrong-import-position
from uad_jax.engine.config import REPO_ROOT, load_config  # pylint: disable=wrong-import-position
from uad_jax.engine.scoring import VolumeScorer  # pylint: disable=wrong-import-position
from uad_jax.methods.patchcore import features as patchcore_features, method as patchcore  # pylint: disable=wrong-import-position
from uad_jax.networks import feature_extractor  # pylint: disable=wrong-import-position


def _largest_all_gather(hlo: str) -> int:
  """Elements of the largest all-gather result in a compiled HLO text."""
  sizes = [int(np.prod([int(d) for d in m.group(1).split(",") if d]))
           for m in re.finditer(r"= \w+\[([\d,]*)\][^=]*? all-gather\(", hlo)]
  return max(sizes, default=0)


def main():
  assert jax.device_count() == 4, jax.devices()
  config = load_config(str(REPO_ROOT / "configs" / "patchcore.py") + ":tiny")
  _, variables, _ = feature_extractor.load_frozen_backbone(config.model, jax.random.key(0))
  rng = np.random.default_rng(0)
  size = config.data.image_size
  train = rng.uniform(0, 1, (6, size, size, 1)).astype(np.float32)
  bank = np.asarray(patchcore_features.descriptors(config, variables, train))
  bank = bank.reshape(-1, bank.shape[-1])
  # 1,003 rows (not a multiple of 4, larger than the queries): descriptors + scaled noise.
  noise = rng.normal(bank.mean(0), bank.std(0), (1003 - len(bank), bank.shape[1]))
  bank = np.concatenate([bank, noise.astype(np.float32)])
  images = rng.uniform(0, 1, (8, size, size, 1)).astype(np.float32)
  images[:, :5] = 0.0
  volume = images[..., 0].copy()
  volume[3] = 0.0
  params = {"backbone": variables, "bank": bank}

  results = {}
  for name, mesh in (("one", Mesh(np.asarray(jax.devices()[:1]), ("data",))),
                     ("four", sharding.make_mesh())):
    placed = patchcore.place_params(params, mesh)
    fn = jax.jit(functools.partial(patchcore.patch_scores, config),
                 in_shardings=(jax.tree.map(lambda a: a.sharding, placed),
                               sharding.batch_sharded(mesh)),
                 out_shardings=sharding.replicated(mesh))
    x = jax.device_put(images, sharding.batch_sharded(mesh))
    hlo = fn.lower(placed, x).compile().as_text()
    scores, index = jax.block_until_ready(jax.device_get(fn(placed, x)))
    scorer = VolumeScorer(config, patchcore.METHOD, params, mesh, jax.random.key(1))
    maps = scorer(volume, key_index=0)     # blocks on every chunk
    results[name] = {"scores": scores, "index": index, "maps": maps, "hlo": hlo,
                     "shard": list(placed["bank_rows"].addressable_shards[0].data.shape),
                     "rows": placed["bank_rows"].size}
  one, four = results["one"], results["four"]
  # Distances come from |q|² - 2 q·b + |b|²: a different matmul blocking moves them by float32
  # rounding of the norms, so differences are measured against the largest squared norm.
  desc = np.asarray(patchcore_features.descriptors(config, variables, images))
  scale = float(max((desc ** 2).sum(-1).max(), (bank ** 2).sum(-1).max()))
  print(json.dumps({
      "scores_diff_vs_sq_norm": float(np.abs(one["scores"] - four["scores"]).max()) / scale,
      "maps_diff_vs_sq_norm": float(np.abs(one["maps"] - four["maps"]).max()) / scale,
      "index_equal": bool((one["index"] == four["index"]).all()),
      "empty_slice_zero": bool(not four["maps"][3].any()),
      "background_zero": bool(not four["maps"][:, :5].any()),
      "shard_shape": four["shard"], "bank_shape": [int(s) for s in bank.shape],
      "largest_all_gather_vs_bank": _largest_all_gather(four["hlo"]) / four["rows"]}))


if __name__ == "__main__":
  main()
