"""Synthetic lesions of the demo cohort: tumour-like, MS-like and stroke-like.

A lesion is planned in template space before the subject's warp (a tumour's mass effect is part
of the warp), then rendered on the subject's output block from each voxel's template position,
so lesions deform with the anatomy. Rendering gives the ground-truth mask and intensity
*layers*: partial-volume fractions with the lesion tissue's intensity per contrast, in
normalised units (white matter = 1, see synth_contrast.py).

`size_quantile` in [0, 1] sets each type's size (tumour core radius, number of MS lesions, stroke
volume) so a cohort can spread sizes evenly and size quartiles stay meaningful.
"""

import dataclasses

import numpy as np
from scipy import ndimage

from uad_jax.data.demo import anatomy as synth_anatomy

LESION_TYPES = ("tumour", "ms", "stroke")

# Stroke territories (left/right mirrored): deep apex and direction towards the cortex (MNI mm).
_STROKE_TERRITORIES = {
    "MCA": ((15.0, -10.0, 8.0), (1.0, 0.0, 0.35)),
    "ACA": ((8.0, 10.0, 15.0), (0.15, 0.35, 1.0)),
    "PCA": ((12.0, -35.0, 5.0), (0.25, -1.0, 0.1)),
}
_STROKE_MAX_HALF_ANGLE = np.deg2rad(65.0)
_MARGIN_MM = 12.0  # window margin for the smooth displacement and ventricle enlargement


@dataclasses.dataclass(frozen=True)
class LesionLayer:
  """Lesion tissue on `window` (block slices): partial volume `fraction` (float32, [0, 1]) and
  normalised intensity per contrast (scalar or an array of the window's shape)."""
  window: tuple[slice, slice, slice]
  fraction: np.ndarray
  t1: float | np.ndarray
  t2: float | np.ndarray


@dataclasses.dataclass(frozen=True)
class Lesion:
  """Rendered lesion: bool `mask` on the output block (inside the brain, non-empty)."""
  kind: str
  mask: np.ndarray
  layers: tuple[LesionLayer, ...]


@dataclasses.dataclass(frozen=True)
class LesionPlan:
  """Template-space description of one subject's lesion (JSON-able `params`)."""
  kind: str
  params: dict
  mass_effect: synth_anatomy.MassEffect | None = None


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
  q, r = np.linalg.qr(rng.standard_normal((3, 3)))
  q = q * np.sign(np.diag(r))
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  return q


def _choose_voxel(rng: np.random.Generator, template: synth_anatomy.TemplateAnatomy,
                  candidates: np.ndarray, weights: np.ndarray | None = None,
                  size: int | None = None) -> np.ndarray:
  """Template positions (mm) of voxels drawn from a bool candidate map, jittered in the voxel."""
  index = np.argwhere(candidates)
  p = None if weights is None else weights[candidates] / weights[candidates].sum()
  chosen = rng.choice(len(index), size=size, replace=False, p=p)
  jitter = rng.uniform(-0.5, 0.5, size=index[chosen].shape) * template.voxel_mm
  return template.position_of(index[chosen]) + jitter


def _positions(template: synth_anatomy.TemplateAnatomy):
  """Broadcastable x, y, z working-grid positions (mm)."""
  return [template.origin_mm[a] + template.voxel_mm * np.arange(n).reshape(
      [-1 if i == a else 1 for i in range(3)]) for a, n in enumerate(template.shape)]


def _plan_tumour(rng, template, size_quantile):
  radius = 10.0 + 15.0 * size_quantile  # core radius, mm (demo_cohort.md: 10-25 mm)
  side = float(rng.choice([-1.0, 1.0]))
  x, _, z = _positions(template)
  candidates = ((template.maps[synth_anatomy.WM] > 0.5)
                & (template.depth_mm >= max(8.0, 0.7 * radius))
                & (side * x >= 15.0) & (z >= -10.0))
  centre = _choose_voxel(rng, template, candidates)
  params = {
      "centre_mm": centre.round(2).tolist(), "side": side, "core_radius_mm": radius,
      "axes": [1.0, float(rng.uniform(0.75, 1.15)), float(rng.uniform(0.75, 1.15))],
      "rotation": _random_rotation(rng).round(6).tolist(),
      "oedema_mm": float(rng.uniform(5.0, 15.0)),
      "irregularity": float(rng.uniform(0.15, 0.25)),
      "noise_offsets_mm": rng.uniform(0.0, 200.0, size=(3, 3)).round(2).tolist(),
  }
  push = float(rng.uniform(0.15, 0.3)) * radius  # mild mass effect
  params["push_mm"] = push
  return LesionPlan("tumour", params, synth_anatomy.MassEffect(centre, radius, push))


def _plan_ms(rng, template, size_quantile):
  count = int(round(5 + 25 * size_quantile))  # 5-30 lesions
  _, _, z = _positions(template)
  candidates = ((template.maps[synth_anatomy.WM] > 0.6) & (template.depth_mm >= 6.0)
                & (z >= -15.0))
  # More likely near the ventricles (periventricular lesions, Dawson's fingers).
  weights = np.exp(-template.ventricle_distance_mm / 8.0) + 0.05
  centres = _choose_voxel(rng, template, candidates, weights, size=count)
  lesions = []
  for centre in centres:
    diameter = float(rng.uniform(2.0, 8.0))
    black_hole = rng.random() < 0.3
    lesions.append({
        "centre_mm": centre.round(2).tolist(),
        "semi_axes_mm": (0.5 * diameter * np.array([1.0, *rng.uniform(0.5, 1.0, 2)])).round(
            3).tolist(),
        "rotation": _random_rotation(rng).round(6).tolist(),
        # T1w iso- to hypointense, some "black holes"; T2w moderately hyperintense.
        "t1_relative_to_wm": float(rng.uniform(0.45, 0.65) if black_hole
                                   else rng.uniform(0.8, 1.0)),
        "t2_relative_to_csf": float(rng.uniform(0.7, 0.9)),
    })
  return LesionPlan("ms", {"lesions": lesions})


def _plan_stroke(rng, template, size_quantile):
  volume_ml = float(10.0 ** (2.0 * size_quantile))  # 1-100 ml, log-uniform over the quantile
  territory = "MCA" if volume_ml > 40.0 else str(rng.choice(["MCA", "ACA", "PCA"],
                                                             p=[0.55, 0.2, 0.25]))
  side = float(rng.choice([-1.0, 1.0]))
  apex, axis = (np.array(v) for v in _STROKE_TERRITORIES[territory])
  apex[0] *= side
  axis[0] *= side
  tilt = synth_anatomy.rotation_matrix(rng.uniform(-12.0, 12.0, size=3))
  axis = tilt @ (axis / np.linalg.norm(axis))
  return LesionPlan("stroke", {
      "target_volume_ml": volume_ml, "territory": territory, "side": side,
      "apex_mm": apex.round(3).tolist(), "axis": axis.round(6).tolist(),
      "noise_offset_mm": rng.uniform(0.0, 200.0, size=3).round(2).tolist(),
  })


_PLANNERS = {"tumour": _plan_tumour, "ms": _plan_ms, "stroke": _plan_stroke}


def plan_lesion(kind: str, rng: np.random.Generator, template: synth_anatomy.TemplateAnatomy,
                size_quantile: float) -> LesionPlan:
  """Draws a lesion of `kind` (one of LESION_TYPES) in template space."""
  if kind not in _PLANNERS:
    raise ValueError(f"unknown lesion type {kind!r}; expected one of {LESION_TYPES}")
  return _PLANNERS[kind](rng, template, float(size_quantile))


def _noise(template, points_mm, offset_mm):
  """The template's smooth blob noise (unit std) at shifted positions, wrapped around."""
  index = template.index_of(points_mm + np.asarray(offset_mm, np.float32).reshape(3, 1, 1, 1))
  return ndimage.map_coordinates(template.blob_noise, index, order=1, mode="grid-wrap",
                                 prefilter=False)


def _ellipsoid_radius(points_mm, centre, rotation, semi_axes):
  """Ellipsoidal radius (1 on the surface) of (3, ...) points."""
  offset = points_mm - np.asarray(centre, np.float32).reshape(3, 1, 1, 1)
  local = np.tensordot(np.asarray(rotation, np.float32).T, offset, axes=1)
  scaled = local / np.asarray(semi_axes, np.float32).reshape(3, 1, 1, 1)
  return np.sqrt((scaled ** 2).sum(0))


def _ramp(signed_distance_mm, voxel_mm):
  """Partial-volume fraction of a voxel whose centre is at a signed distance (inside < 0)."""
  return np.clip(0.5 - signed_distance_mm / voxel_mm, 0.0, 1.0).astype(np.float32)


def _render_tumour(plan, anatomy, template, levels):
  p = plan.params
  radius, oedema = p["core_radius_mm"], p["oedema_mm"]
  semi = radius * np.asarray(p["axes"])
  reach = 1.5 * semi.max() + 1.6 * oedema + p["push_mm"] + _MARGIN_MM
  win = anatomy.window(p["centre_mm"], reach)
  points = anatomy.template_mm[(slice(None),) + win]
  offsets = p["noise_offsets_mm"]
  shape_noise = np.clip(_noise(template, points, offsets[0]), -2.0, 2.0)
  score = _ellipsoid_radius(points, p["centre_mm"], p["rotation"], semi)
  score = score + p["irregularity"] * shape_noise
  core_distance = (score - 1.0) * radius  # ~ signed distance to the core surface, mm
  thickness = oedema * (1.0 + 0.4 * np.clip(_noise(template, points, offsets[1]), -1.5, 1.5))
  # The falx stops the tumour at the midline.
  hemisphere = np.clip((p["side"] * points[0] + 2.0) / 2.0, 0.0, 1.0)
  brain = anatomy.brain[win]
  vs = anatomy.grid.geometry.voxel_mm
  core = _ramp(core_distance, vs) * hemisphere * brain
  # Oedema spreads in white matter, much less in grey matter, not into CSF.
  tissue = np.clip(1.5 * anatomy.wm[win] + 0.5 * anatomy.gm[win], 0.0, 1.0)
  oedema_f = np.clip(_ramp(core_distance - thickness, vs) - core, 0.0, 1.0) * tissue
  oedema_f *= hemisphere * brain
  heterogeneity = np.clip(_noise(template, points, offsets[2]), -2.0, 2.0)
  mask = np.zeros(anatomy.brain.shape, bool)
  mask[win] = ((core >= 0.5) | (oedema_f >= 0.5)) & brain
  csf_t2 = levels["T2w"]["csf"]
  layers = (
      LesionLayer(win, oedema_f.astype(np.float32), 0.65, 0.8 * csf_t2),
      # Necrotic/solid core: darker on T1w (about 0.4 x WM), brighter than oedema on T2w.
      LesionLayer(win, core.astype(np.float32), (0.4 - 0.06 * heterogeneity).astype(np.float32),
                  ((0.95 + 0.05 * heterogeneity) * csf_t2).astype(np.float32)),
  )
  return mask, layers


def _render_ms(plan, anatomy, template, levels):
  del template
  vs = anatomy.grid.geometry.voxel_mm
  mask = np.zeros(anatomy.brain.shape, bool)
  layers = []
  for lesion in plan.params["lesions"]:
    semi = np.asarray(lesion["semi_axes_mm"])
    win = anatomy.window(lesion["centre_mm"], semi.max() + _MARGIN_MM)
    points = anatomy.template_mm[(slice(None),) + win]
    r = _ellipsoid_radius(points, lesion["centre_mm"], lesion["rotation"], semi)
    tissue = np.clip(anatomy.gm[win] + anatomy.wm[win], 0.0, 1.0) * anatomy.brain[win]
    fraction = _ramp((r - 1.0) * semi.mean(), vs) * tissue
    if fraction.max() <= 0.0:
      continue
    # A lesion smaller than a voxel still marks the voxel it occupies most.
    lesion_mask = (fraction >= 0.5) | (fraction == fraction.max())
    mask[win] |= lesion_mask & anatomy.brain[win]
    layers.append(LesionLayer(win, fraction, lesion["t1_relative_to_wm"],
                              lesion["t2_relative_to_csf"] * levels["T2w"]["csf"]))
  return mask, tuple(layers)


def _ray_length(template, apex, axis):
  """Distance from `apex` along `axis` to where the template brain ends (mm)."""
  steps = np.arange(0.0, 160.0, template.voxel_mm / 2)
  points = apex.reshape(3, 1) + axis.reshape(3, 1) * steps
  inside = ndimage.map_coordinates(template.maps[synth_anatomy.BRAIN], template.index_of(points),
                                   order=1, prefilter=False) >= 0.5
  length = steps[np.argmin(inside)] if not inside.all() else steps[-1]
  return max(float(length), 10.0)


def _render_stroke(plan, anatomy, template, levels):
  p = plan.params
  apex, axis = np.asarray(p["apex_mm"]), np.asarray(p["axis"])
  length = _ray_length(template, apex, axis)
  win = anatomy.window(apex, length + _MARGIN_MM)
  points = anatomy.template_mm[(slice(None),) + win]
  offset = points - apex.astype(np.float32).reshape(3, 1, 1, 1)
  t = np.tensordot(axis.astype(np.float32), offset, axes=1)
  angle = np.arccos(np.clip(t / np.maximum(np.sqrt((offset ** 2).sum(0)), 1e-3), -1.0, 1.0))
  # The infarct takes tissue and the sulci inside the wedge, not the ventricles.
  ventricles = ndimage.map_coordinates(template.ventricles, template.index_of(points), order=1,
                                       prefilter=False)
  candidates = (anatomy.brain[win] & (ventricles < 0.5) & (t > 0)
                & (angle < _STROKE_MAX_HALF_ANGLE) & (p["side"] * points[0] >= 0.0))
  # A wedge grows from the cortex (angle 0, t = length) deeper and wider with the volume.
  score = angle + 0.9 * (1.0 - t / length) + 0.12 * np.clip(
      _noise(template, points, p["noise_offset_mm"]), -2.0, 2.0)
  vs = anatomy.grid.geometry.voxel_mm
  count = max(int(round(p["target_volume_ml"] * 1000.0 / vs ** 3)), 1)
  flat = np.flatnonzero(candidates)
  if len(flat) > count:
    flat = flat[np.argpartition(score.ravel()[flat], count - 1)[:count]]
  local = np.zeros(candidates.shape, bool)
  local.ravel()[flat] = True
  mask = np.zeros(anatomy.brain.shape, bool)
  mask[win] = local
  # Soft edge for the intensities (the mask itself stays binary, like a manual tracing).
  fraction = np.maximum(local, ndimage.gaussian_filter(local.astype(np.float32), 0.7))
  fraction *= anatomy.brain[win]
  t1 = 1.2 * levels["T1w"]["csf"]  # chronic infarct: T1w hypointense, close to CSF
  return mask, (LesionLayer(win, fraction.astype(np.float32), t1, 0.9 * levels["T2w"]["csf"]),)


_RENDERERS = {"tumour": _render_tumour, "ms": _render_ms, "stroke": _render_stroke}


def render_lesion(plan: LesionPlan, anatomy: synth_anatomy.SubjectAnatomy,
                  template: synth_anatomy.TemplateAnatomy, levels: dict) -> Lesion:
  """Renders a planned lesion on a subject's block.

  levels: normalised pure-tissue intensities per contrast (synth_contrast.normalised_tissue_levels).
  """
  mask, layers = _RENDERERS[plan.kind](plan, anatomy, template, levels)
  mask &= anatomy.brain
  if not mask.any():
    raise RuntimeError(f"{plan.kind} lesion rendered an empty mask (params {plan.params})")
  return Lesion(plan.kind, mask, tuple(layers))
