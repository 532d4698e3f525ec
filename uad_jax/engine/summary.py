"""TensorBoard event files (tensorboardX: no TensorFlow needed), written by process 0 only."""

import json

import jax
import numpy as np


class SummaryWriter:
  """Scalars, images and text under `<workdir>/tensorboard/<name>`; a no-op on other processes."""

  def __init__(self, logdir):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter as _Writer  # pylint: disable=import-outside-toplevel
      self._writer = _Writer(str(logdir), flush_secs=30)

  def scalars(self, step: int, values: dict) -> None:
    if self._writer:
      for k, v in values.items():
        self._writer.add_scalar(k, float(v), step)

  def images(self, step: int, tag: str, images) -> None:
    """images: float (N, H, W) or (N, H, W, 1) in [0, 1]."""
    if self._writer:
      images = np.clip(np.asarray(images, np.float32), 0.0, 1.0)
      if images.ndim == 4:
        images = images[..., 0]
      self._writer.add_images(tag, images[:, None], step, dataformats="NCHW")

  def text(self, step: int, tag: str, text: str) -> None:
    if self._writer:
      self._writer.add_text(tag, text, step)

  def config(self, config) -> None:
    self.text(0, "config", "```\n" + json.dumps(config.to_dict(), indent=2, default=str) + "\n```")

  def flush(self) -> None:
    if self._writer:
      self._writer.flush()

  def close(self) -> None:
    if self._writer:
      self._writer.close()


def to_unit_range(maps, eps: float = 1e-12):
  """Per-image min–max scaling to [0, 1] for display. maps: (N, H, W)."""
  maps = np.asarray(maps, np.float32)
  lo = maps.min(axis=(1, 2), keepdims=True)
  hi = maps.max(axis=(1, 2), keepdims=True)
  return (maps - lo) / np.maximum(hi - lo, eps)
