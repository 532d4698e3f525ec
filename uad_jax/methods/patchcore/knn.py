"""Exact k-nearest-neighbour search (squared Euclidean distance) in a chunked, sharded bank.

The bank is stored as `rows` (n_chunks, n_shards, chunk, D) with `sq_norms` (n_chunks,
n_shards, chunk): shard s holds the original rows [s * R, (s + 1) * R), R = n_chunks * chunk,
and padding rows have a squared norm of +inf, so their distance is +inf and they are never
nearest. Sharding the `n_shards` axis over the mesh's `data` axis puts each device's share of
the bank in its memory; the search scans the chunk axis (bounded (Q, chunk) distance blocks per
device) and the final reduction over the shard axis is the cross-device min that XLA inserts.
Distances use faiss' IndexFlatL2 expansion ‖q‖² − 2 q·b + ‖b‖², clamped at 0, with
precision=HIGHEST (a TF32 matmul would change them, spec §7.7). Queries are processed in tiles,
so the working memory does not grow with the number of queries either.
"""

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
CHUNK_ROWS = 2048   # bank rows per distance block
QUERY_TILE = 8192   # queries per distance block: at most QUERY_TILE x CHUNK_ROWS float32 (64 MB)


def layout_bank(bank: np.ndarray, num_shards: int = 1, chunk_rows: int = CHUNK_ROWS) -> dict:
  """(K, D) bank -> {'rows': (n_chunks, num_shards, chunk, D), 'sq_norms': (n_chunks,
  num_shards, chunk)} float32 numpy arrays, padded with +inf-norm rows (see module doc)."""
  bank = np.asarray(bank, np.float32)
  k, d = bank.shape
  per_shard = max(1, -(-k // num_shards))
  chunk = min(chunk_rows, per_shard)
  n_chunks = -(-per_shard // chunk)
  padded = n_chunks * chunk * num_shards
  rows = np.zeros((padded, d), np.float32)
  rows[:k] = bank
  sq_norms = np.full((padded,), np.inf, np.float32)
  sq_norms[:k] = np.asarray(sq_norm(jnp.asarray(bank)))
  rows = rows.reshape(num_shards, n_chunks, chunk, d).transpose(1, 0, 2, 3)
  sq_norms = sq_norms.reshape(num_shards, n_chunks, chunk).transpose(1, 0, 2)
  return {"rows": np.ascontiguousarray(rows), "sq_norms": np.ascontiguousarray(sq_norms)}


def sq_norm(x: jnp.ndarray) -> jnp.ndarray:
  """Squared L2 norm over the last axis."""
  return jnp.sum(x * x, axis=-1)


def sq_distances(queries, q_sq, rows, r_sq) -> jnp.ndarray:
  """(..., Q, N) clamped squared distances of queries (Q, D) to rows (..., N, D)."""
  qr = jnp.einsum("qd,...nd->...qn", queries, rows, precision=HIGHEST)
  return jnp.maximum(q_sq[:, None] - 2.0 * qr + r_sq[..., None, :], 0.0)


def search(queries: jnp.ndarray, rows: jnp.ndarray, sq_norms: jnp.ndarray, k: int = 1,
           num_chunks=None, query_tile: int = QUERY_TILE):
  """The k nearest bank rows of every query.

  queries: (Q, D) float32. rows, sq_norms: a `layout_bank` layout (any sharding of its shard
  axis). num_chunks: scan only the first `num_chunks` chunks (may be traced; default all).
  query_tile: queries per distance block (more are processed tile by tile), so a distance
  block never exceeds query_tile x chunk per shard.
  Returns (sq_dist (Q, k) float32 ascending, index (Q, k) int32 rows of the unpadded bank);
  ties go to the lower index.
  """
  rows, sq_norms = jnp.asarray(rows), jnp.asarray(sq_norms)
  q = jnp.asarray(queries, jnp.float32)
  n = q.shape[0]
  if n <= query_tile:
    return _search_tile(q, rows, sq_norms, k, num_chunks)
  tiles = -(-n // query_tile)
  tile = -(-n // (tiles * 8)) * 8          # equal tiles, little padding
  q = jnp.pad(q, ((0, tiles * tile - n), (0, 0))).reshape(tiles, tile, -1)
  dist, index = jax.lax.map(lambda t: _search_tile(t, rows, sq_norms, k, num_chunks), q)
  return dist.reshape(-1, k)[:n], index.reshape(-1, k)[:n]


def _search_tile(q, rows, sq_norms, k, num_chunks):
  n_chunks, n_shards, chunk, _ = rows.shape
  q_sq = sq_norm(q)
  shard_offset = jnp.arange(n_shards, dtype=jnp.int32)[:, None] * (n_chunks * chunk)
  best_d = jnp.full((n_shards, q.shape[0], k), jnp.inf, jnp.float32)
  best_i = jnp.zeros((n_shards, q.shape[0], k), jnp.int32)

  def body(c, carry):
    best_d, best_i = carry
    d2 = sq_distances(q, q_sq, rows[c], sq_norms[c])        # (n_shards, Q, chunk)
    index = shard_offset + c * chunk + jnp.arange(chunk, dtype=jnp.int32)[None]
    if k == 1:
      j = jnp.argmin(d2, axis=-1)
      d = jnp.take_along_axis(d2, j[..., None], axis=-1)
      i = jnp.take_along_axis(index[:, None, :], j[..., None], axis=-1)
      better = d < best_d                                    # strict: earlier chunks win ties
      return jnp.where(better, d, best_d), jnp.where(better, i, best_i)
    cand_d = jnp.concatenate([best_d, d2], axis=-1)
    cand_i = jnp.concatenate([best_i, jnp.broadcast_to(index[:, None, :], d2.shape)], axis=-1)
    neg, j = jax.lax.top_k(-cand_d, k)
    return -neg, jnp.take_along_axis(cand_i, j, axis=-1)

  stop = n_chunks if num_chunks is None else num_chunks
  best_d, best_i = jax.lax.fori_loop(0, stop, body, (best_d, best_i))
  # Across shards (the cross-device reduction when the shard axis is sharded).
  cand_d = jnp.moveaxis(best_d, 0, 1).reshape(q.shape[0], n_shards * k)
  cand_i = jnp.moveaxis(best_i, 0, 1).reshape(q.shape[0], n_shards * k)
  if k == 1:
    j = jnp.argmin(cand_d, axis=-1)[:, None]
    return (jnp.take_along_axis(cand_d, j, axis=-1), jnp.take_along_axis(cand_i, j, axis=-1))
  neg, j = jax.lax.top_k(-cand_d, k)
  return -neg, jnp.take_along_axis(cand_i, j, axis=-1)
