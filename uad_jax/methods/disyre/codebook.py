"""The k-means intensity codebook of the bias corruption (spec `methods/disyre.md` §2.10).

The reference computes it offline (`k-means_estimation.py`): every training slice centre-cropped
to the evaluation size, its non-zero voxels, `KMeans(n_clusters=5, random_state=0,
n_init='auto')` on the 1-D intensities; the 5 centres (unsorted) are the codebook. Here it is a
prepared artefact of the run (`Method.prepare`), computed from the training LMDB before training.
"""

import numpy as np

from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.volumes import center_crop_pad
from uad_jax.errors import ConfigError, DataError

NUM_CLUSTERS = 5


def training_intensities(lmdb_path, crop: int, max_voxels: int, seed: int) -> np.ndarray:
  """Non-zero voxels (float32, 1-D) of the centre-cropped training slices.

  The reference loads the entire database at once; beyond max_voxels voxels (counted before
  dropping zeros) a seeded random subset of slices is read instead (spec §2.10 [OURS]).
  """
  source = SliceDataSource(lmdb_path)
  n = len(source)
  slices = np.arange(n)
  budget = max(1, max_voxels // (crop * crop))
  if n > budget:
    slices = np.sort(np.random.default_rng(seed).choice(n, budget, replace=False))
  values = []
  for i in slices:
    image = center_crop_pad(np.asarray(source[int(i)]["image"], np.float32), crop)
    values.append(image[image != 0])
  values = np.concatenate(values) if values else np.zeros(0, np.float32)
  if values.size < NUM_CLUSTERS:
    raise DataError(f"{lmdb_path}: {values.size} non-zero voxels, too few for a "
                    f"{NUM_CLUSTERS}-class intensity codebook")
  return values


def kmeans_codebook(intensities: np.ndarray) -> list[float]:
  """The 5 k-means centres of 1-D intensities, in sklearn's order (the reference's)."""
  from sklearn.cluster import KMeans
  kmeans = KMeans(n_clusters=NUM_CLUSTERS, random_state=0, n_init="auto")
  kmeans.fit(intensities.reshape(-1, 1))
  return [float(c) for c in kmeans.cluster_centers_[:, 0]]


def prepare(config, lmdb_path) -> dict:
  """{'codebook': [5 floats]}: config.data.codebook when given (e.g. the reference's T1 values),
  else k-means on the training data (data.codebook_voxels, seed)."""
  given = tuple(config.data.codebook or ())
  if given:
    if len(given) != NUM_CLUSTERS:
      raise ConfigError(f"data.codebook has {len(given)} values, expected {NUM_CLUSTERS}")
    return {"codebook": [float(c) for c in given], "codebook_source": "config"}
  values = training_intensities(lmdb_path, config.data.image_size, config.data.codebook_voxels,
                                config.seed)
  return {"codebook": kmeans_codebook(values), "codebook_source": "kmeans",
          "codebook_voxels": int(values.size)}
