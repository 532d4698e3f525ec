"""T1w and T2w contrast synthesis from a subject's tissue maps (demo cohort).

Images are returned in *normalised* units where pure white matter is 1 in both contrasts; the
scanner recipe (synth_scanners.py) turns them into scanner units. Lesion intensities are given
in the same units (synth_lesions.py).
"""

import numpy as np

from uad_jax.data.demo import anatomy as synth_anatomy
from uad_jax.data.demo import lesions as synth_lesions

# Relative T2w signal of pure tissue (demo_cohort.md): CSF brightest, then GM, then WM.
T2_WEIGHTS = {"csf": 1.0, "gm": 0.65, "wm": 0.45}
# Faint texture so T2w (and lesion tissue) is not piecewise constant.
TEXTURE_AMPLITUDE = 0.03


def normalised_tissue_levels(template: synth_anatomy.TemplateAnatomy) -> dict:
  """Pure-tissue intensities per contrast in normalised units (WM = 1)."""
  t1 = template.t1_levels
  return {
      "T1w": {k: t1[k] / t1["wm"] for k in ("csf", "gm", "wm")},
      "T2w": {k: T2_WEIGHTS[k] / T2_WEIGHTS["wm"] for k in ("csf", "gm", "wm")},
  }


def synthesise(anatomy: synth_anatomy.SubjectAnatomy, template: synth_anatomy.TemplateAnatomy,
               *, myelination: float,
               lesion: synth_lesions.Lesion | None) -> dict[str, np.ndarray]:
  """{"T1w": ..., "T2w": ...}: float32 block images, WM = 1, exactly 0 outside the brain.

  T1w keeps the template's real texture; its grey-white contrast is scaled by `myelination`
  (< 1 in children). T2w is a tissue-probability mixture with a faint smooth texture.
  Lesion layers replace tissue by lesion tissue in proportion to their partial volume.
  """
  levels = template.t1_levels
  t1 = anatomy.t1 - np.float32((1.0 - myelination) * (levels["wm"] - levels["gm"])) * anatomy.wm
  t1 = t1 / np.float32(levels["wm"])
  t2 = (T2_WEIGHTS["csf"] * anatomy.csf + T2_WEIGHTS["gm"] * anatomy.gm
        + T2_WEIGHTS["wm"] * anatomy.wm) / np.float32(T2_WEIGHTS["wm"])
  t2 = t2 * (1.0 + np.float32(TEXTURE_AMPLITUDE) * anatomy.texture)
  images = {"T1w": t1.astype(np.float32), "T2w": t2.astype(np.float32)}
  if lesion is not None:
    for layer in lesion.layers:
      texture = 1.0 + np.float32(TEXTURE_AMPLITUDE) * anatomy.texture[layer.window]
      for contrast, level in (("T1w", layer.t1), ("T2w", layer.t2)):
        region = images[contrast][layer.window]
        region *= 1.0 - layer.fraction
        region += layer.fraction * (level * texture)
  for image in images.values():
    image[~anatomy.brain] = 0.0
    np.maximum(image, 0.0, out=image)
  return images
