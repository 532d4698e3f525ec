"""Intensity baselines every deep method must beat (Meissen et al., 2021: thresholding FLAIR
intensities rivals deep UAD on bright lesions).

- `intensity`: the anomaly score is the normalised voxel intensity (model.polarity 'bright') or
  1 − intensity ('dark'), inside the brain. Nothing is learnt; `fit` stores nothing but a marker.
- `zscore`: |x − μ| / max(σ, model.min_std) per pixel, with μ and σ of the healthy training
  slices at the same slice position of the volume (slice index along the third axis, after the
  centre crop). Fitted in one pass over the training LMDB (float64 sums), like PatchCore's bank.
  Slice positions are rows of a volume-sized chunk: its scoring_mode is 'chunk' with
  eval.split_size ≥ the slices per volume, so row i of a chunk is slice i.

Both maps are 0 where the input is exactly 0 (background), as every method's.
"""

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.data.volumes import center_crop_pad
from uad_jax.engine import scoring, sharding
from uad_jax.errors import ConfigError, DataError
from uad_jax.methods import contract


def intensity_fit(config, lmdb_path, mesh, rng, writer, workdir):
  """No parameters: the state is an empty marker, so the engine's checkpoint layout holds."""
  del lmdb_path, mesh, rng, writer, workdir
  if config.model.polarity not in ("bright", "dark"):
    raise ConfigError(f"model.polarity {config.model.polarity!r}: expected 'bright' or 'dark'")
  return {"fitted": np.ones((), np.float32)}, {"warnings": []}


def intensity_score(config, params, images, valid, rng):
  """maps (B, H, W): x ('bright') or 1 − x ('dark') of images (B, H, W, 1) in [0, 1]; 0 where
  x == 0."""
  del params, valid, rng
  x = images[..., 0]
  score = x if config.model.polarity == "bright" else 1.0 - x
  return jnp.where(x == 0.0, 0.0, score)


def zscore_fit(config, lmdb_path, mesh, rng, writer, workdir):
  """μ, σ (Z, H, W) float32 per slice position over the training slices (crop data.image_size).

  Z = eval.split_size (one chunk is one volume); positions never seen keep μ = 0, σ = 0 (so any
  brain there scores x / model.min_std).
  """
  del mesh, rng, writer, workdir
  source = SliceDataSource(lmdb_path)
  if not len(source) or "slice_index" not in source[0]:
    raise DataError(f"{lmdb_path}: the zscore baseline needs slice positions (a uad_jax LMDB "
                    "with a header), not a reference-format database")
  size, depth = config.data.image_size, config.eval.split_size
  total = np.zeros((depth, size, size))
  squares = np.zeros((depth, size, size))
  count = np.zeros((depth, 1, 1))
  for i in range(len(source)):
    item = source[i]
    z = item["slice_index"]
    if z >= depth:
      raise ConfigError(f"{lmdb_path}: slice index {z} >= eval.split_size {depth}; the zscore "
                        "baseline needs eval.split_size >= the slices per volume")
    x = center_crop_pad(item["image"], size).astype(np.float64)
    total[z] += x
    squares[z] += x * x
    count[z] += 1
  mean = total / np.maximum(count, 1)
  var = np.maximum(squares / np.maximum(count, 1) - mean ** 2, 0.0)
  state = {"mean": mean.astype(np.float32), "std": np.sqrt(var).astype(np.float32)}
  return state, {"warnings": [], "training_slices": len(source)}


def zscore_score(config, params, images, valid, rng):
  """maps (B, H, W) of one volume's slices (B, H, W, 1) in slice order (row i = slice i)."""
  del valid, rng
  x = images[..., 0]
  mean, std = params["mean"], params["std"]
  if mean.shape[0] != x.shape[0]:
    raise ConfigError(f"zscore: a chunk of {x.shape[0]} rows but statistics of {mean.shape[0]} slice "
                      "positions; eval.split_size must equal the fitted one")
  z = jnp.abs(x - mean) / jnp.maximum(std, config.model.min_std)
  return jnp.where(x == 0.0, 0.0, z)


def fitted_state(config, states: dict, artifacts: dict):
  """The fitted state is what scoring uses."""
  del config, artifacts
  return states["fit"]


def zscore_place(params, mesh):
  """Replicated statistics; `chunk_size` pads chunks to the device count, so the statistics are
  padded to the same rows."""
  rows = scoring.chunk_size(params["mean"].shape[0], mesh.size)
  pad = ((0, rows - params["mean"].shape[0]), (0, 0), (0, 0))
  padded = {k: np.pad(np.asarray(jax.device_get(v)), pad) for k, v in params.items()}
  return sharding.replicate(padded, mesh)


INTENSITY = contract.Method(name="intensity", score=intensity_score, scoring_params=fitted_state,
                            fit=intensity_fit, network_evaluations=lambda config: 0.0)
ZSCORE = contract.Method(name="zscore", score=zscore_score, scoring_params=fitted_state,
                         fit=zscore_fit, scoring_mode="chunk", place_params=zscore_place,
                         network_evaluations=lambda config: 0.0)
