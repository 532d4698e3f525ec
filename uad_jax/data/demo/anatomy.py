"""Synthetic subject anatomy for the demo cohort: MNI152 tissue maps warped per subject.

The source anatomy is nilearn's MNI152 ICBM-2009a template (T1, GM and WM probability maps, brain
mask; CSF = clip(mask - GM - WM, 0, 1)), loaded offline. It is resampled once onto a *working
grid* aligned with MNI space at the output voxel size. Each subject is a pull-back warp of that
grid: output voxel -> (rotation, head scale) -> smooth random displacement -> optional tumour mass
effect -> age-dependent ventricle enlargement -> template position, plus an age-dependent grey
matter thinning next to the sulci.

All positions are in millimetres. The "world" frame of the output grid is the MNI frame (the
output affine maps voxel indices to MNI-like millimetres with the brain centred).
"""

import dataclasses
import functools
import math

import numpy as np
from scipy import ndimage

# Centre of rotation and head scaling, and centre of the output grid (MNI mm). Slightly above
# the ventricles so the vertex keeps a margin in a 155 mm axial field of view and the lower
# brainstem, not the cortex, is what falls off the bottom (as in the SRI24 crop).
CENTRE_MM = np.array([0.0, -17.0, 12.0])

# Channels of `TemplateAnatomy.maps`, all warped per subject.
T1, GM, WM, BRAIN, SULCAL, TEXTURE = range(6)

_DISPLACEMENT_SPACING_MM = 4.0  # control grid of the random displacement field
_DISPLACEMENT_SMOOTHING_MM = 8.0
_ATROPHY_SMOOTHING_MM = 5.0  # width of the ventricle enlargement field
_TEXTURE_SMOOTHING_MM = 1.2
_BLOB_SMOOTHING_MM = 4.0
_FIXED_NOISE_SEED = 20251126  # the template's texture is part of the anatomy, not of a cohort


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Output grid: `shape` voxels of `voxel_mm` (isotropic); axial slices on the third axis."""
  name: str
  voxel_mm: float
  shape: tuple[int, int, int]

  @property
  def affine(self) -> np.ndarray:
    """(4, 4) voxel index -> mm, voxel size on the diagonal, grid centred on `CENTRE_MM`."""
    affine = np.diag([self.voxel_mm] * 3 + [1.0])
    affine[:3, 3] = CENTRE_MM - self.voxel_mm * (np.asarray(self.shape) - 1) / 2
    return affine

  def to_json(self) -> dict:
    return {"name": self.name, "voxel_mm": self.voxel_mm, "shape": list(self.shape)}


GEOMETRIES = {
    "demo": Geometry("demo", 2.0, (120, 120, 78)),
    "paper": Geometry("paper", 1.0, (240, 240, 155)),  # SRI24-like grid (data.md §1)
}


@dataclasses.dataclass(frozen=True)
class TemplateAnatomy:
  """The template on the working grid (MNI-aligned, `voxel_mm` spacing, origin `origin_mm`).

  maps: (6, X, Y, Z) float32 channels T1 (template units, about [0, 1]), GM, WM, BRAIN (soft
    mask), SULCAL (grey matter next to sulcal CSF, [0, 1]) and TEXTURE (smooth, unit std).
  csf, ventricles: (X, Y, Z) float32 probabilities.
  depth_mm: distance to the outside of the brain; ventricle_distance_mm: distance to the
    lateral ventricles. atrophy_field: (3, X, Y, Z) unit-peak vector field pointing into the
    ventricles (pull-back direction of the age-related enlargement). blob_noise: smooth noise,
    unit std, sampled with random offsets to shape lesions.
  t1_levels: template T1 intensity of pure GM, WM and CSF (least-squares fit inside the brain).
  """
  voxel_mm: float
  origin_mm: np.ndarray
  maps: np.ndarray
  csf: np.ndarray
  ventricles: np.ndarray
  depth_mm: np.ndarray
  ventricle_distance_mm: np.ndarray
  atrophy_field: np.ndarray
  blob_noise: np.ndarray
  t1_levels: dict

  @property
  def shape(self) -> tuple[int, int, int]:
    return self.maps.shape[1:]

  def index_of(self, points_mm: np.ndarray) -> np.ndarray:
    """(3, ...) mm -> (3, ...) fractional working-grid indices."""
    shape = (3,) + (1,) * (points_mm.ndim - 1)
    return (points_mm - self.origin_mm.reshape(shape)) / self.voxel_mm

  def position_of(self, index: np.ndarray) -> np.ndarray:
    """(N, 3) integer working-grid indices -> (N, 3) mm."""
    return self.origin_mm + self.voxel_mm * np.asarray(index, dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class AnatomyParams:
  """Per-subject shape and age parameters.

  displacement: (3, a, b, c) float32 smooth displacement (mm) on a control grid of
    `_DISPLACEMENT_SPACING_MM` anchored at the template origin.
  atrophy_mm: peak ventricle enlargement; gm_thinning: fraction of sulcal grey matter turned
    into CSF; myelination: factor on the template's T1 grey-white contrast (1 = adult).
  """
  head_scale: float
  rotation_deg: tuple[float, float, float]
  displacement_peak_mm: float
  atrophy_mm: float
  gm_thinning: float
  myelination: float
  displacement: np.ndarray = dataclasses.field(repr=False)

  def to_json(self) -> dict:
    return {
        "head_scale": round(self.head_scale, 4),
        "rotation_deg": [round(a, 3) for a in self.rotation_deg],
        "displacement_peak_mm": round(self.displacement_peak_mm, 3),
        "atrophy_mm": round(self.atrophy_mm, 3),
        "gm_thinning": round(self.gm_thinning, 4),
        "myelination": round(self.myelination, 4),
    }


@dataclasses.dataclass(frozen=True)
class MassEffect:
  """Radial push of tissue away from `centre_mm` (template frame): `push_mm` at `radius_mm`."""
  centre_mm: np.ndarray
  radius_mm: float
  push_mm: float


@dataclasses.dataclass(frozen=True)
class OutputGrid:
  """The part of the output grid that can hold brain (`block`) and its voxel positions (mm)."""
  geometry: Geometry
  block: tuple[slice, slice, slice]
  axes_mm: tuple[np.ndarray, np.ndarray, np.ndarray]

  @property
  def block_shape(self) -> tuple[int, int, int]:
    return tuple(len(a) for a in self.axes_mm)

  def points_mm(self) -> np.ndarray:
    """(3, *block_shape) float32 MNI-frame positions of the block voxels."""
    return np.stack(np.meshgrid(*self.axes_mm, indexing="ij")).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SubjectAnatomy:
  """Tissue maps of one subject on the output block (float32 unless stated).

  t1: template T1 intensity after warping and grey matter thinning (template units).
  gm, wm, csf: tissue probabilities (0 outside the brain); brain: bool mask.
  texture: smooth unit-std texture; template_mm: (3, *block) template position of each voxel.
  rotation, head_scale: the subject's affine part, used to locate template points in the block.
  """
  grid: OutputGrid
  t1: np.ndarray
  gm: np.ndarray
  wm: np.ndarray
  csf: np.ndarray
  brain: np.ndarray
  texture: np.ndarray
  template_mm: np.ndarray
  rotation: np.ndarray
  head_scale: float

  def window(self, centre_mm: np.ndarray, radius_mm: float) -> tuple[slice, slice, slice]:
    """Block slices that contain every voxel within `radius_mm` of template point `centre_mm`.

    Uses the affine part of the warp only, so `radius_mm` must include a margin for the smooth
    displacement, the mass effect and the ventricle enlargement.
    """
    world = CENTRE_MM + self.head_scale * self.rotation @ (np.asarray(centre_mm) - CENTRE_MM)
    slices = []
    for axis, world_axis in enumerate(self.grid.axes_mm):
      step = world_axis[1] - world_axis[0]
      lo = int(math.floor((world[axis] - radius_mm * self.head_scale - world_axis[0]) / step))
      hi = int(math.ceil((world[axis] + radius_mm * self.head_scale - world_axis[0]) / step)) + 1
      slices.append(slice(max(lo, 0), max(min(hi, len(world_axis)), 0)))
    return tuple(slices)


def rotation_matrix(degrees) -> np.ndarray:
  """(3, 3) rotation about the x, then y, then z axis by `degrees`."""
  ax, ay, az = np.deg2rad(degrees)
  rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
  ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
  rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
  return rz @ ry @ rx


@functools.lru_cache(maxsize=1)
def _template_1mm() -> dict:
  """nilearn's 1 mm MNI152 maps and what is derived from them at 1 mm (cached per process)."""
  from nilearn import datasets  # pylint: disable=import-outside-toplevel  (slow to import)
  t1_img = datasets.load_mni152_template(resolution=1)
  t1 = np.asarray(t1_img.get_fdata(dtype=np.float32))
  brain = np.asarray(datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32))
  # nilearn's GM map has some probability outside the brain mask; the mask defines the brain.
  gm = np.asarray(datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32))
  wm = np.asarray(datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32))
  gm *= brain
  wm *= brain
  csf = np.clip(brain - gm - wm, 0.0, 1.0)
  depth = ndimage.distance_transform_edt(brain > 0.5).astype(np.float32)

  # Lateral (and third) ventricles: the deep CSF component that fills the ventricle-body box;
  # the other large deep CSF component is the interhemispheric fissure.
  origin = t1_img.affine[:3, 3]
  labels, _ = ndimage.label((csf > 0.5) & (depth > 8.0))
  x, y, z = (np.arange(n) + o for n, o in zip(t1.shape, origin))
  box = ((np.abs(x) >= 5) & (np.abs(x) <= 30))[:, None, None] & (
      (y >= -40) & (y <= 20))[None, :, None] & ((z >= 0) & (z <= 30))[None, None, :]
  counts = np.bincount(labels[box], minlength=labels.max() + 1)
  counts[0] = 0
  ventricles = (labels == counts.argmax()).astype(np.float32)
  ventricle_distance = ndimage.distance_transform_edt(ventricles == 0).astype(np.float32)

  # Grey matter that borders sulcal (not ventricular) CSF: where age-related thinning happens.
  sulcal_csf = csf * (ventricle_distance > 3.0)
  sulcal = gm * np.clip(ndimage.gaussian_filter(sulcal_csf, 1.5) / 0.25, 0.0, 1.0)
  return dict(origin=origin, t1=t1, gm=gm, wm=wm, brain=brain, csf=csf, depth=depth,
              ventricles=ventricles, ventricle_distance=ventricle_distance, sulcal=sulcal)


def _resample(volume: np.ndarray, voxel_mm: float, shape) -> np.ndarray:
  """1 mm volume -> working grid of `voxel_mm` with the same origin (anti-aliased, linear)."""
  if voxel_mm == 1.0:
    return volume
  sigma = 0.42 * math.sqrt(max(voxel_mm ** 2 - 1.0, 0.0))
  smoothed = ndimage.gaussian_filter(volume, sigma) if sigma > 0 else volume
  return ndimage.affine_transform(smoothed, np.full(3, voxel_mm), output_shape=shape, order=1,
                                  mode="constant", cval=0.0).astype(np.float32)


def _smooth_noise(rng: np.random.Generator, shape, sigma_vox: float, mode: str) -> np.ndarray:
  """Gaussian-smoothed white noise normalised to unit standard deviation (float32)."""
  noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_vox,
                                  mode=mode)
  return noise / noise.std()


@functools.lru_cache(maxsize=2)
def load_template(voxel_mm: float) -> TemplateAnatomy:
  """The template anatomy on a working grid of `voxel_mm` (cached: shared by all subjects)."""
  src = _template_1mm()
  shape = tuple(int(math.ceil((n - 1) / voxel_mm)) + 1 for n in src["t1"].shape)
  res = {k: _resample(v, voxel_mm, shape) for k, v in src.items() if k != "origin"}
  brain = res["brain"]
  rng = np.random.default_rng(_FIXED_NOISE_SEED)
  texture = _smooth_noise(rng, shape, _TEXTURE_SMOOTHING_MM / voxel_mm, "reflect")
  blob_noise = _smooth_noise(rng, shape, _BLOB_SMOOTHING_MM / voxel_mm, "wrap")

  # Pull-back field of the ventricle enlargement: the gradient of the smoothed ventricle map
  # points into the ventricles and peaks at their wall, so adding it to a position samples
  # the template closer to the ventricles (they grow) and vanishes a few mm away.
  smooth_ventricles = ndimage.gaussian_filter(res["ventricles"], _ATROPHY_SMOOTHING_MM / voxel_mm)
  field = np.stack(np.gradient(smooth_ventricles))
  field /= np.sqrt((field ** 2).sum(0)).max()

  inside = brain > 0.5
  design = np.stack([res["gm"][inside], res["wm"][inside], res["csf"][inside]], axis=1)
  levels, *_ = np.linalg.lstsq(design, res["t1"][inside], rcond=None)
  maps = np.stack([res["t1"], res["gm"], res["wm"], brain, res["sulcal"], texture])
  return TemplateAnatomy(
      voxel_mm=float(voxel_mm), origin_mm=np.asarray(src["origin"], dtype=np.float64),
      maps=maps.astype(np.float32), csf=res["csf"], ventricles=res["ventricles"],
      depth_mm=res["depth"], ventricle_distance_mm=res["ventricle_distance"],
      atrophy_field=field.astype(np.float32), blob_noise=blob_noise,
      t1_levels={"gm": float(levels[0]), "wm": float(levels[1]), "csf": float(levels[2])})


def output_grid(geometry: Geometry, template: TemplateAnatomy) -> OutputGrid:
  """The output block that can contain a subject's brain (head scale <= 1.08, margins)."""
  brain_idx = np.argwhere(template.maps[BRAIN] > 0.5)
  lo = template.position_of(brain_idx.min(0)) - CENTRE_MM
  hi = template.position_of(brain_idx.max(0)) - CENTRE_MM
  margin = 8.0
  affine = geometry.affine
  axes = []
  for axis in range(3):
    world = affine[axis, 3] + geometry.voxel_mm * np.arange(geometry.shape[axis])
    keep = ((world >= CENTRE_MM[axis] + 1.08 * lo[axis] - margin)
            & (world <= CENTRE_MM[axis] + 1.08 * hi[axis] + margin))
    axes.append(np.flatnonzero(keep))
  block = tuple(slice(int(a[0]), int(a[-1]) + 1) for a in axes)
  axes_mm = tuple((affine[axis, 3] + geometry.voxel_mm * axes[axis]).astype(np.float32)
                  for axis in range(3))
  return OutputGrid(geometry=geometry, block=block, axes_mm=axes_mm)


def sample_anatomy_params(rng: np.random.Generator, template: TemplateAnatomy, *, age: float,
                          sex: str) -> AnatomyParams:
  """Shape and age parameters of one subject (demo_cohort.md "Subjects")."""
  # The MNI152 template is larger than an average brain; males are ~4 % larger than females.
  mean_scale = 1.01 if sex == "M" else 0.97
  head_scale = float(np.clip(rng.normal(mean_scale, 0.025), 0.90, 1.07))
  rotation = tuple(float(a) for a in rng.uniform(-4.0, 4.0, size=3))
  peak = float(rng.uniform(2.0, 3.0))
  extent = (np.asarray(template.shape) - 1) * template.voxel_mm
  control_shape = tuple(int(math.ceil(e / _DISPLACEMENT_SPACING_MM)) + 1 for e in extent)
  field = np.stack([
      ndimage.gaussian_filter(rng.standard_normal(control_shape, dtype=np.float32),
                              _DISPLACEMENT_SMOOTHING_MM / _DISPLACEMENT_SPACING_MM)
      for _ in range(3)])
  field *= peak / np.sqrt((field ** 2).sum(0)).max()
  # Atrophy from ~40 years, about 3 mm ventricle enlargement at 85, with individual spread.
  ageing = float(np.clip((age - 40.0) / 45.0, 0.0, 1.1)) * float(np.clip(rng.normal(1.0, 0.15),
                                                                        0.6, 1.4))
  # Incomplete myelination: lower T1 grey-white contrast in children, adult contrast from 18.
  myelination = 0.55 + 0.45 * float(np.clip((age - 6.0) / 12.0, 0.0, 1.0))
  return AnatomyParams(head_scale=head_scale, rotation_deg=rotation, displacement_peak_mm=peak,
                       atrophy_mm=3.0 * ageing, gm_thinning=0.35 * ageing,
                       myelination=myelination, displacement=field.astype(np.float32))


def _push(points: np.ndarray, mass_effect: MassEffect) -> np.ndarray:
  """Pull-back of a radial mass effect: samples closer to the centre, so tissue moves out.

  Radius r maps to r - push * h(r), h rising linearly to 1 at `radius_mm` and decaying beyond;
  push <= 0.5 radius keeps the map monotonic (no folding).
  """
  centre = np.asarray(mass_effect.centre_mm, dtype=np.float32).reshape(3, 1)
  offset = points - centre
  r = np.sqrt((offset ** 2).sum(0))
  radius = mass_effect.radius_mm
  h = np.where(r < radius, r / radius,
               np.exp(-np.maximum(r - radius, 0.0) / max(radius, 15.0)))
  factor = 1.0 - mass_effect.push_mm * h / np.maximum(r, 1e-3)
  return centre + offset * factor.astype(np.float32)


def _sample(volume: np.ndarray, index: np.ndarray, mode: str = "constant") -> np.ndarray:
  return ndimage.map_coordinates(volume, index, order=1, mode=mode, cval=0.0, prefilter=False)


def warp_subject(template: TemplateAnatomy, grid: OutputGrid, params: AnatomyParams,
                 mass_effect: MassEffect | None = None) -> SubjectAnatomy:
  """Warps the template into one subject's anatomy on the output block."""
  shape = grid.block_shape
  points = grid.points_mm().reshape(3, -1)
  centre = CENTRE_MM.reshape(3, 1).astype(np.float32)
  rotation = rotation_matrix(params.rotation_deg)
  # Inverse of x -> c + s R (x - c).
  points = centre + (rotation.T.astype(np.float32) @ (points - centre)) / np.float32(
      params.head_scale)
  control = (points - template.origin_mm.reshape(3, 1).astype(np.float32)) / np.float32(
      _DISPLACEMENT_SPACING_MM)
  points = points + np.stack([_sample(c, control, "nearest") for c in params.displacement])
  if mass_effect is not None:
    points = _push(points, mass_effect)
  if params.atrophy_mm > 0:
    index = template.index_of(points).astype(np.float32)
    points = points + np.float32(params.atrophy_mm) * np.stack(
        [_sample(c, index) for c in template.atrophy_field])
  index = template.index_of(points).astype(np.float32)
  t1, gm, wm, brain_p, sulcal, texture = (_sample(m, index).reshape(shape)
                                          for m in template.maps)
  brain = brain_p >= 0.5
  gm = np.where(brain, gm, 0.0).astype(np.float32)
  wm = np.where(brain, wm, 0.0).astype(np.float32)
  csf = np.where(brain, np.clip(brain_p - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
  # Age-related cortical thinning: sulcal grey matter turns into CSF; the T1 texture darkens
  # by the same amount so T1w and T2w stay consistent.
  thinning = np.float32(params.gm_thinning) * sulcal * (gm > 0)
  thinning = np.minimum(thinning, gm)
  gm -= thinning
  csf += thinning
  levels = template.t1_levels
  t1 = t1 - thinning * np.float32(levels["gm"] - levels["csf"])
  return SubjectAnatomy(grid=grid, t1=t1, gm=gm, wm=wm, csf=csf, brain=brain, texture=texture,
                        template_mm=points.reshape((3,) + shape), rotation=rotation,
                        head_scale=params.head_scale)
