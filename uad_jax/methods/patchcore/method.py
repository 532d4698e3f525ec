"""PatchCore (Roth et al., CVPR 2022) as the reference runs it: the method's functions.

A frozen ImageNet CNN turns every slice into a grid of locally aggregated patch descriptors
(`features.py`). The descriptors of the healthy training slices, thinned out by greedy
k-center coreset selection (`coreset.py`, streamed by `bank.py`), form the memory bank.
A test patch scores its SQUARED distance to the nearest bank row (exact search, `knn.py`); the
patch-score grid is upsampled bilinearly (align_corners=False, no Gaussian blur) to the slice and
zeroed where the input is exactly 0. Spec: `methods/patchcore.md`.

Fitted method (`METHOD.fit`): `fit` builds the bank; the engine stores the returned state
{backbone variables, bank (K, D), projection W, start indices} as checkpoint step 0.
`scoring_params` keeps what scoring needs and `place_params` shards the bank rows over the
mesh's `data` axis, so scoring is data-parallel and the bank memory is split over devices.

Config keys read (ml_collections.ConfigDict):
  model.{backbone, layers, backbone_weights, allow_random_backbone, backbone_precision,
    normalize}: the frozen feature extractor;
  model.{patchsize, patchstride, pretrain_embed_dim, target_embed_dim}: aggregation (§4.4);
  model.num_neighbors: k of the kNN score (mean of the k smallest squared distances);
  model.{sample_size, projection_dim, num_starting_points, coreset_block_slices,
    max_train_slices, max_bank_size}: bank building (§5, `bank.py`);
  data.{image_size, batch_size, worker_count}; training.fit_state_minutes; seed.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from uad_jax.engine import sharding
from uad_jax.errors import ConfigError
from uad_jax.methods import contract
from uad_jax.methods.patchcore import bank, features, knn
from uad_jax.ops.resize import resize_bilinear


def fit(config, lmdb_path, mesh, rng: jax.Array, writer, workdir):
  """Builds the memory bank from the training slices; returns (state, meta).

  state: {'backbone': variables, 'bank': (K, D) float32 in pick order, 'projection': (d, D)
  float32 W, 'start_indices': (n,) int32}; meta: seeds, sizes, subsampling, timings, coverage
  and `warnings` (e.g. random backbone weights). See `bank.build`.
  """
  return bank.build(config, lmdb_path, mesh, rng, writer, workdir)


def scoring_params(config, states: dict, artifacts: dict) -> dict:
  """What scoring needs of the fitted state: backbone variables and the bank."""
  del config, artifacts
  return {"backbone": states["fit"]["backbone"], "bank": states["fit"]["bank"]}


def place_params(params: dict, mesh) -> dict:
  """Replicates the backbone and shards the bank rows over the mesh's `data` axis.

  Returns {'backbone', 'bank_rows' (n_chunks, n_devices, chunk, D), 'bank_sq_norms'
  (n_chunks, n_devices, chunk)} (`knn.layout_bank`: padding rows can never be nearest).
  """
  layout = knn.layout_bank(np.asarray(jax.device_get(params["bank"])), mesh.size)
  shard = NamedSharding(mesh, P(None, "data"))
  return {"backbone": sharding.replicate(params["backbone"], mesh),
          "bank_rows": jax.device_put(layout["rows"], shard),
          "bank_sq_norms": jax.device_put(layout["sq_norms"], shard)}


def patch_scores(config, params: dict, images: jnp.ndarray):
  """(scores (B, h, w), nearest bank row (B, h, w) int32) of slices (B, H, W, 1) in [0, 1].

  score = mean over the model.num_neighbors nearest bank rows of the squared L2 distance
  (faiss IndexFlatL2's squared distances; np.mean over k = 1 is the identity).
  """
  k = config.model.num_neighbors
  if k < 1:
    raise ConfigError(f"model.num_neighbors={k}: must be >= 1")
  feats = features.descriptors(config, params["backbone"], images)
  b, h, w, d = feats.shape
  dist, index = knn.search(feats.reshape(-1, d), params["bank_rows"], params["bank_sq_norms"], k)
  return jnp.mean(dist, axis=-1).reshape(b, h, w), index[:, 0].reshape(b, h, w)


def anomaly_maps(scores: jnp.ndarray, images: jnp.ndarray) -> jnp.ndarray:
  """Patch scores (B, h, w) -> maps (B, H, W) of images (B, H, W, 1): bilinear upsampling
  (align_corners=False), then 0 wherever the input is exactly 0 (spec §6.4-5)."""
  up = resize_bilinear(scores[..., None], images.shape[1], images.shape[2],
                       align_corners=False)[..., 0]
  return jnp.where(images[..., 0] == 0.0, 0.0, up)


def score_slices(config, params: dict, images: jnp.ndarray, valid: jnp.ndarray,
                 rng: jax.Array) -> jnp.ndarray:
  """PatchCore anomaly maps (B, H, W) float32 of slices (B, H, W, 1) in [0, 1], background 0.

  params: `place_params` output. Deterministic, slices independent: `valid` and `rng` unused.
  """
  del valid, rng
  scores, _ = patch_scores(config, params, images)
  return anomaly_maps(scores, images)


METHOD = contract.Method(name="patchcore", score=score_slices, scoring_params=scoring_params,
                         fit=fit, place_params=place_params)
