"""Greedy k-center coreset selection of PatchCore's memory bank: one-shot and streaming.

Reference (spec methods/patchcore.md §5.3, `ApproximateGreedyCoresetSampler`): descriptors E
(M, D) are projected to Z = E Wᵀ (W (128, D) ~ U(±1/√D), no projection when D == 128); the
anchor distance of every row starts as its MEAN Euclidean distance to 10 random start rows
(which are not selected); then K times: pick the row of largest anchor distance (first on ties)
and lower every anchor distance to its distance from the pick. The bank is E at the picks, in
pick order. Memory O(M) and time O(M K): 185 GB and infeasible for the paper's 461,000 slices.

Streaming (ours): the descriptors arrive in blocks X_1, X_2, ... (a bounded buffer of slices in
the seeded random training order). Block j gets the budget
k_j = floor(p (m_1 + ... + m_j)) - floor(p (m_1 + ... + m_{j-1})), so the budgets sum to the
reference's K = floor(p M). Its rows' anchor distances start as their distance to everything
selected so far (for the first block, with nothing selected: the reference's mean distance to the
start rows), then the reference's greedy loop runs k_j steps over the block. This is exactly the
one-shot greedy continued from the earlier picks, with the argmax restricted to the block; with a
single block (buffer >= training set) it IS the reference algorithm, index for index. Working
memory: the block (B rows of D + 128 floats) and the selection (K rows of 128 floats) beside the
bank itself; nothing grows with the training set except the bank (K = p M, or a fixed cap).

Coverage: after block j every row of X_j lies within ρ_j = max_x min_s d(x, s) (s over
everything selected so far) of a pick, and later picks only lower that, so the coverage radius of
the final bank is at most max_j ρ_j. For j > 1, ρ_j is the block's largest anchor distance;
greedy's argument applies: the k_j picks and the row at distance ρ_j are k_j + 1 rows of X_j
pairwise >= ρ_j apart, so ρ_j <= 2 OPT_{k_j}(X_j), against one-shot greedy's radius
<= 2 OPT_K(X) (for the first block the same holds for its largest anchor, which the reference's
mean start distance can push below ρ_1; ρ_1 is therefore computed exactly). Blocks of shuffled
slices are random samples of the training set, so at the same fraction their optimal radii are
close to the global one; `benchmarks/throughput_fit.py` measures the coverage radius of both on
a set small enough for one-shot greedy.
"""

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.methods.patchcore import knn

HIGHEST = jax.lax.Precision.HIGHEST


def coreset_size(num_rows: int, fraction: float, max_size: int = 0) -> int:
  """The reference's K = int(M * p) (float64), capped at `max_size` when that is > 0."""
  k = int(num_rows * float(fraction))
  return min(k, max_size) if max_size > 0 else k


def block_budgets(block_rows, fraction: float, total: int) -> list[int]:
  """Picks per block: floor(p * cumulative rows) differences, scaled so they sum to `total`."""
  cum = np.cumsum(np.asarray(block_rows, np.int64))
  if cum.size == 0:
    return []
  m = int(cum[-1])
  if total == int(m * float(fraction)):   # the reference's floor(p * M)
    marks = [int(c * float(fraction)) for c in cum]
  else:                                    # a cap: the same proportions of `total`
    marks = [(int(c) * total) // m for c in cum]
  return np.diff([0] + marks).tolist()


def random_projection(key: jax.Array, in_dim: int, out_dim: int) -> jnp.ndarray:
  """(out_dim, in_dim) float32 W of the reference's bias-free torch.nn.Linear(in_dim, out_dim)
  (default init U(-1/√in_dim, 1/√in_dim)); the identity when in_dim == out_dim (the reference
  then does not project)."""
  if in_dim == out_dim:
    return jnp.eye(in_dim, dtype=jnp.float32)
  bound = 1.0 / np.sqrt(in_dim)
  return jax.random.uniform(key, (out_dim, in_dim), jnp.float32, -bound, bound)


def project(features: jnp.ndarray, projection: jnp.ndarray) -> jnp.ndarray:
  """(M, D) descriptors -> (M, d) = features @ projectionᵀ (exact for the identity)."""
  return jnp.matmul(features, projection.T, precision=HIGHEST)


def _distances(z: jnp.ndarray, points: jnp.ndarray) -> jnp.ndarray:
  """(M, P) Euclidean distances, the reference's sqrt(clamp(-2 a·b + |a|² + |b|², 0))."""
  ab = jnp.matmul(z, points.T, precision=HIGHEST)
  return jnp.sqrt(jnp.maximum(-2.0 * ab + knn.sq_norm(z)[:, None] + knn.sq_norm(points)[None],
                              0.0))


def empty_selection(capacity: int, dim: int, desc_dim: int,
                    chunk_rows: int = knn.CHUNK_ROWS) -> dict:
  """Selection state for up to `capacity` picks: projected rows in a `knn.layout_bank` layout
  (one shard; unfilled rows have norm +inf), the picked descriptors, and the count."""
  chunk = max(1, min(chunk_rows, capacity))
  n_chunks = max(1, -(-capacity // chunk))
  return {"z": jnp.zeros((n_chunks, 1, chunk, dim), jnp.float32),
          "z_sq": jnp.full((n_chunks, 1, chunk), jnp.inf, jnp.float32),
          "rows": jnp.zeros((n_chunks * chunk, desc_dim), jnp.float32),
          "count": jnp.zeros((), jnp.int32)}


def select_from_block(selection: dict, block_z: jnp.ndarray, block_rows: jnp.ndarray,
                      num_valid, budget, start_indices: jnp.ndarray):
  """Adds `budget` greedy picks from the first `num_valid` rows of a block to `selection`.

  block_z: (B, d) projected rows; block_rows: (B, D) the descriptors stored for picks.
  start_indices: (n,) rows of the block for the reference's mean-distance start; used only
  while nothing is selected (the first block).
  Returns (selection, picks (B,) int32 block rows in pick order (first `budget` entries valid),
  radius ρ_j: the largest distance of a valid block row to the selection after its picks).
  """
  _, _, chunk, _ = selection["z"].shape
  rows_valid = jnp.arange(block_z.shape[0]) < num_valid
  first = selection["count"] == 0

  def start_distance(sel):
    return jnp.mean(_distances(block_z, block_z[start_indices]), axis=-1)

  def selected_distance(sel):
    n_chunks = (sel["count"] + chunk - 1) // chunk
    d2, _ = knn.search(block_z, sel["z"], sel["z_sq"], k=1, num_chunks=n_chunks)
    return jnp.sqrt(d2[:, 0])

  anchor = jax.lax.cond(first, start_distance, selected_distance, selection)
  anchor = jnp.where(rows_valid, anchor, -jnp.inf)

  def step(t, carry):
    anchor, sel, picks = carry
    i = jnp.argmax(anchor)
    slot = sel["count"] + t
    point = block_z[i]
    sel = dict(sel, z=sel["z"].at[slot // chunk, 0, slot % chunk].set(point),
               z_sq=sel["z_sq"].at[slot // chunk, 0, slot % chunk].set(knn.sq_norm(point)),
               rows=sel["rows"].at[slot].set(block_rows[i]))
    anchor = jnp.minimum(anchor, _distances(block_z, point[None])[:, 0])
    return anchor, sel, picks.at[t].set(i.astype(jnp.int32))

  picks = jnp.zeros((block_z.shape[0],), jnp.int32)
  anchor, selection, picks = jax.lax.fori_loop(0, budget, step, (anchor, selection, picks))
  selection = dict(selection, count=selection["count"] + budget)
  # The first block's anchor holds the start-point mean where it is smaller: measure exactly.
  anchor = jax.lax.cond(first, lambda s: jnp.where(rows_valid, selected_distance(s), -jnp.inf),
                        lambda s: anchor, selection)
  return selection, picks, jnp.max(anchor)


def greedy_coreset(features: jnp.ndarray, k: int, projection: jnp.ndarray,
                   start_indices: jnp.ndarray) -> np.ndarray:
  """The reference's one-shot greedy coreset: (k,) int64 row indices of `features` (M, D).

  projection: (d, D) W (identity: no projection); start_indices: the 10 random start rows.
  """
  features = jnp.asarray(features, jnp.float32)
  z = project(features, projection)
  selection = empty_selection(k, z.shape[1], features.shape[1])
  fn = jax.jit(select_from_block)
  _, picks, _ = fn(selection, z, features, features.shape[0], k, jnp.asarray(start_indices))
  return np.asarray(picks[:k], np.int64)


def coverage_radius(points: jnp.ndarray, centres: jnp.ndarray,
                    chunk_rows: int = knn.CHUNK_ROWS) -> float:
  """max over `points` of the Euclidean distance to the nearest of `centres` (both (·, d))."""
  bank = knn.layout_bank(np.asarray(centres), 1, chunk_rows)
  d2, _ = jax.jit(knn.search)(jnp.asarray(points), bank["rows"], bank["sq_norms"])
  return float(np.sqrt(np.max(np.asarray(d2))))
