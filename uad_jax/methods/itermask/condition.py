"""IterMask's high-frequency condition (`models/IterMask/masking.py::create_condition`).

The first model reconstructs a slice from this image, and the masked AE gets it as its second
input channel: the structure of the slice without its low-frequency intensity content (spec
`methods/itermask.md` §2.3).
"""

import jax.numpy as jnp
import numpy as np


def low_frequency_disk(height: int, width: int, radius: float) -> np.ndarray:
  """(H, W) bool: the frequencies strictly within `radius` of the centre of the *shifted*
  spectrum (centre (H//2, W//2)), returned in unshifted FFT order (ifftshift applied), so that
  no shift of the spectrum itself is needed."""
  u = np.arange(height)[:, None] - height // 2
  v = np.arange(width)[None, :] - width // 2
  return np.fft.ifftshift(np.sqrt(u ** 2 + v ** 2) < radius)


def high_frequency_condition(x: jnp.ndarray, radius: float = 15.0) -> jnp.ndarray:
  """x: (B, H, W, 1) float32 slices in the ±3 scale -> (B, H, W, 1) float32.

  F = fft2(x); amplitudes inside the low-frequency disk (radius 15 pixels for any size,
  DC included) are set to 1, phases kept; c = Re(ifft2(.)). The reference shifts the spectrum
  (over all axes, which cancels on the batch axis) and back; masking the unshifted spectrum with
  the shifted disk is the same operation. Outside the disk |F|·exp(i·angle F) is F.
  """
  spectrum = jnp.fft.fft2(x[..., 0].astype(jnp.float32))
  disk = jnp.asarray(low_frequency_disk(x.shape[1], x.shape[2], radius))
  spectrum = jnp.where(disk, jnp.exp(1j * jnp.angle(spectrum)), spectrum)
  return jnp.real(jnp.fft.ifft2(spectrum)).astype(jnp.float32)[..., None]
