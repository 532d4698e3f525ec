"""The training feed's augmentation chain (spec `methods/disyre.md` §2.3), numpy/scipy on the host.

A re-implementation of the few batchgenerators 0.25.1 functions the reference composes, with
their semantics (draw ranges, order, cubic spline warps, crop/pad rules) but drawing from one
`numpy.random.Generator`: per batch, foreground crop -> spatial augmentation to P×P -> mirror ->
brightness -> gamma -> inverted gamma -> Gaussian noise -> Gaussian blur -> clip to [0, 1].
Images are 2-D float arrays (H, W) in [0, 1].
"""

import dataclasses

import numpy as np
from scipy import ndimage


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Probabilities of the augmentations (the reference's values as defaults)."""
  p_elastic: float = 0.1
  p_rotation: float = 0.1
  p_scale: float = 0.1
  p_brightness: float = 0.15
  p_gamma: float = 0.15
  p_inverted_gamma: float = 0.15
  p_noise: float = 0.15
  p_blur: float = 0.15

  @classmethod
  def from_config(cls, augment) -> "AugmentConfig":
    return cls(**{f.name: float(augment[f.name]) for f in dataclasses.fields(cls)})


def uniform_between(rng: np.random.Generator, low: float, high: float) -> float:
  """low + (high - low)·U[0, 1): numpy's legacy `np.random.uniform`, which the reference calls,
  also when high < low (a value between the bounds); Generator.uniform refuses that case."""
  return low + (high - low) * rng.random()


def foreground_crop(image: np.ndarray) -> np.ndarray:
  """The bounding box of the non-zero pixels (the whole image when there are none)."""
  rows, cols = np.nonzero(image)
  if rows.size == 0:
    return image
  return image[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def random_crop_or_pad(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """A random size×size crop with margin 0 (batchgenerators `random_crop`).

  Per axis: lower bound randint(0, d - size) (exclusive upper bound) when d > size, else
  (d - size) // 2 with the missing part zero-padded (before = -lower bound, after = the rest).
  """
  out = image
  for axis in (0, 1):
    d = out.shape[axis]
    lo = int(rng.integers(0, d - size)) if d - size > 0 else (d - size) // 2
    if lo < 0:
      pad = [(0, 0), (0, 0)]
      pad[axis] = (-lo, size - d + lo)
      out = np.pad(out, pad)
    else:
      out = np.take(out, np.arange(lo, lo + size), axis=axis)
  return out


def centred_grid(size: int) -> np.ndarray:
  """(2, size, size) zero-centred coordinates i - (size - 1)/2 (`create_zero_centered_...`)."""
  r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  return np.stack(np.meshgrid(r, r, indexing="ij"))


def rotate_coords(coords: np.ndarray, angle: float) -> np.ndarray:
  """Row-vector coordinates times [[cos, -sin], [sin, cos]] (`rotate_coords_2d`)."""
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  return (coords.reshape(2, -1).T @ rot).T.reshape(coords.shape)


def elastic_offsets(size: int, sigma: float, magnitude: float,
                    rng: np.random.Generator) -> np.ndarray:
  """One axis' elastic offsets: U(-1, 1) noise smoothed by a Gaussian of std sigma in the Fourier
  domain, rescaled so that its largest |value| is `magnitude` (`elastic_deform_coordinates_2`)."""
  noise = rng.uniform(-1.0, 1.0, (size, size))
  smooth = np.fft.ifftn(ndimage.fourier_gaussian(np.fft.fftn(noise), sigma)).real
  return smooth / (np.max(np.abs(smooth)) / (magnitude + 1e-8))


def spatial_augment(images: list, patch: int, rng: np.random.Generator,
                    cfg: AugmentConfig) -> np.ndarray:
  """Differently sized slices -> (B, P, P) float32 (`augment_spatial_2`, list-aware copy).

  Per sample, w.p. p_elastic an elastic deformation (σ = U(0, 0.25)·P, per-axis magnitude
  U(σ/8, σ/2)), w.p. p_rotation a rotation U(±15°), w.p. p_scale a scale from U(0.75, 1) or
  U(1, 1.25) (s > 1 shrinks the content). A deformed sample is resampled (cubic spline, zeros
  outside) around a centre drawn from U(P/2, S⁰ - P/2) per axis, where S⁰ is the size of the
  batch's FIRST sample (reference quirk, spec §4.9, kept); any other sample is randomly
  cropped/padded to P×P.
  """
  first_shape = images[0].shape
  out = np.zeros((len(images), patch, patch), np.float32)
  for b, image in enumerate(images):
    coords = centred_grid(patch)
    deformed = False
    if rng.random() < cfg.p_elastic:
      sigma = rng.uniform(0.0, 0.25) * patch
      for d in range(2):
        coords[d] += elastic_offsets(patch, sigma, rng.uniform(sigma / 8, sigma / 2), rng)
      deformed = True
    if rng.random() < cfg.p_rotation:
      coords = rotate_coords(coords, rng.uniform(-np.pi / 12, np.pi / 12))
      deformed = True
    if rng.random() < cfg.p_scale:
      coords *= rng.uniform(0.75, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 1.25)
      deformed = True
    if deformed:
      coords -= coords.mean(axis=(1, 2), keepdims=True)
      for d in range(2):
        # S⁰ < P makes the lower bound the larger one: still a value between the bounds.
        coords[d] += uniform_between(rng, patch / 2, first_shape[d] - patch / 2)
      out[b] = ndimage.map_coordinates(image.astype(np.float64), coords, order=3,
                                       mode="constant", cval=0.0)
    else:
      out[b] = random_crop_or_pad(image, patch, rng)
  return out


def _gamma(x: np.ndarray, gamma: float) -> np.ndarray:
  """((x - mn)/(R + 1e-7))^γ · (R + 1e-7) + mn with mn, R the slice's min and range."""
  mn = x.min()
  rnge = x.max() - mn
  return np.power((x - mn) / (rnge + 1e-7), gamma) * (rnge + 1e-7) + mn


def _draw_gamma(rng: np.random.Generator) -> float:
  return rng.uniform(0.5, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, 2.0)


def intensity_augment(batch: np.ndarray, rng: np.random.Generator,
                      cfg: AugmentConfig) -> np.ndarray:
  """Mirror, brightness, gamma, inverted gamma, noise, blur, clip: (B, P, P) -> float32 [0, 1].

  Each transform runs over the whole batch before the next (batchgenerators' Compose), each
  sample drawing independently.
  """
  x = batch.astype(np.float32)
  for b in range(len(x)):          # MirrorTransform: axis 0 then axis 1, w.p. 0.5 each
    for axis in (0, 1):
      if rng.random() < 0.5:
        x[b] = np.flip(x[b], axis=axis)
  for b in range(len(x)):
    if rng.random() < cfg.p_brightness:
      x[b] *= rng.uniform(0.9, 1.1)
  for b in range(len(x)):
    if rng.random() < cfg.p_gamma:
      x[b] = _gamma(x[b], _draw_gamma(rng))
  for b in range(len(x)):
    if rng.random() < cfg.p_inverted_gamma:
      x[b] = -_gamma(-x[b], _draw_gamma(rng))
  for b in range(len(x)):
    if rng.random() < cfg.p_noise:
      # batchgenerators calls this draw "noise_variance" but uses it as the std (spec §4.20).
      x[b] += rng.normal(0.0, rng.uniform(0.0, 0.05), x[b].shape).astype(np.float32)
  for b in range(len(x)):          # per sample, then w.p. 0.5 per channel (one channel here)
    if rng.random() < cfg.p_blur and rng.random() < 0.5:
      x[b] = ndimage.gaussian_filter(x[b], rng.uniform(0.5, 1.5), mode="reflect", truncate=4.0)
  return np.clip(x, 0.0, 1.0)


def augment_batch(images: list, patch: int, rng: np.random.Generator,
                  cfg: AugmentConfig) -> np.ndarray:
  """Stored slices (list of (H, W) in [0, 1]) -> augmented clean patches (B, P, P) float32."""
  cropped = [foreground_crop(np.asarray(im)) for im in images]
  return intensity_augment(spatial_augment(cropped, patch, rng, cfg), rng, cfg)
