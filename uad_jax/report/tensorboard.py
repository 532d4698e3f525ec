"""The report's figures and main table in TensorBoard, for runs that have a training workdir.

Written with tensorboardX (no TensorFlow, platform.md) to `<workdir>/tensorboard/report` at the
evaluated checkpoint step: every figure as an RGB image under `report/<figure name>` and the
Markdown summary as text under `report/summary`.
"""

from pathlib import Path

import matplotlib.image
import numpy as np
from tensorboardX import SummaryWriter


def write(workdir: Path, step: int, figures: list[tuple[str, Path]], summary_markdown: str) -> Path:
  """Writes figures (tag, PNG file) and the summary; returns the event folder."""
  logdir = Path(workdir) / "tensorboard" / "report"
  writer = SummaryWriter(str(logdir))
  try:
    for tag, png in figures:
      rgba = matplotlib.image.imread(png)
      rgb = np.round(np.asarray(rgba)[..., :3] * 255).astype(np.uint8)
      writer.add_image(f"report/{tag}", rgb, step, dataformats="HWC")
    writer.add_text("report/summary", summary_markdown, step)
  finally:
    writer.close()
  return logdir
