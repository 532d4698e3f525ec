"""RIAD's random partition masks (`models/RIAD/masking.py::gen_mask`, spec `methods/riad.md` §2.3).

An S×S image is tiled into N×N cells of k×k pixels (N = S // k, exact). A random permutation of
the N² cell ids, padded with (n − N² mod n) dummy ids when N² is not a multiple of n, is read
row-major into n rows of r = ⌈N²/n⌉ ids: subset i hides the cells of row i. The subsets partition
the grid, so every pixel is hidden in exactly one of the n masks. A row of dummies only hides
nothing (an all-ones mask, whose pass contributes nothing).

One implementation serves the host (numpy, training masks drawn in the data pipeline) and the
device (jax.numpy, scoring masks drawn from a key): `xp` selects the array module.
"""

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.errors import ConfigError


def cells_per_side(image_size: int, k: int) -> int:
  """N = image_size // k; the cells must tile the image exactly (else pixels are never hidden
  and never reconstructed)."""
  if k < 1 or image_size % k:
    raise ConfigError(f"mask cell size {k} does not divide the image size {image_size}")
  return image_size // k


def partition_masks(perm, image_size: int, k: int, n: int, xp=np):
  """The n masks of one permutation: (n, S, S) float32, 1 = visible, 0 = hidden.

  perm: (N²,) integer permutation of the cell ids (the reference's np.random.permutation(N²)).
  The cell at position p of the permutation belongs to subset p // r, so the subset of cell c is
  argsort(perm)[c] // r (argsort inverts a permutation).
  """
  n_cells = cells_per_side(image_size, k)
  row = -(-n_cells * n_cells // n)
  subset = (xp.argsort(perm) // row).reshape(n_cells, n_cells)
  subset = xp.repeat(xp.repeat(subset, k, axis=0), k, axis=1)
  return (subset[None] != xp.arange(n)[:, None, None]).astype(xp.float32)


def host_masks(gen: np.random.Generator, image_size: int, k: int, n: int) -> np.ndarray:
  """Training masks for cell size k from the pipeline's seeded Generator: (n, S, S) float32."""
  n_cells = cells_per_side(image_size, k)
  return partition_masks(gen.permutation(n_cells * n_cells), image_size, k, n)


def key_masks(rng: jax.Array, image_size: int, ks, n: int) -> jax.Array:
  """Scoring masks from a key: (len(ks), n, S, S) float32, cell size ks[j] from fold_in(rng, j).

  The reference draws them from NumPy's global state as left by the checkpoint restore, which a
  port cannot reproduce (spec §4 item 7); a key makes a run repeatable.
  """
  masks = []
  for j, k in enumerate(ks):
    n_cells = cells_per_side(image_size, k)
    perm = jax.random.permutation(jax.random.fold_in(rng, j), n_cells * n_cells)
    masks.append(partition_masks(perm, image_size, k, n, xp=jnp))
  return jnp.stack(masks)
