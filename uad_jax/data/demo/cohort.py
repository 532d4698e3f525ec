"""The bundled demo cohort: a small multi-scanner BIDS dataset with lesions, generated offline.

  python -m uad_jax.data.demo --out DIR [--seed 0] [--geometry demo|paper] [--scale 1]

Design: the project spec `demo_cohort.md`. Anatomy comes from nilearn's MNI152 template
(synth_anatomy.py), contrasts from tissue maps (synth_contrast.py), lesions with ground-truth
masks (synth_lesions.py) and per-site acquisition recipes (synth_scanners.py). The output is
deterministic for a seed (byte-identical files) and written atomically:

  DIR/bids/participants.tsv, participants.json, dataset_description.json
  DIR/bids/sub-XXX/anat/sub-XXX_{T1w,T2w}.nii.gz [+ sub-XXX_seg-anomaly_mask.nii.gz]
  DIR/splits/{split}_{T1w,T2w}.csv   (header Path,subject,dataset,scanner,age,sex,lesion_type)
  DIR/demo_cohort.json               (seed, geometry, version, counts, generation parameters)
"""

import argparse
import csv
import dataclasses
import gzip
import io
import json
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import tqdm

from uad_jax.data.demo import anatomy as synth_anatomy
from uad_jax.data.demo import contrast as synth_contrast
from uad_jax.data.demo import lesions as synth_lesions
from uad_jax.data.demo import scanners as synth_scanners
from uad_jax.errors import ConfigError, DataError
from uad_jax.utils.atomic import atomic_path

# Bump when a change alters the generated files, so an old cohort is not mistaken for a new one.
VERSION = 1
MODALITIES = synth_scanners.CONTRASTS
# Subjects per split at scale 1 (demo_cohort.md "Splits").
BASE_COUNTS = {
    "train": 30, "val_healthy": 4, "val_lesion": 4, "test_healthy": 6,
    "test_tumour": 6, "test_ms": 6, "test_stroke": 6,
}
SPLITS = tuple(BASE_COUNTS)
_SPLIT_LESION_TYPES = {
    "train": (), "val_healthy": (), "test_healthy": (),
    "val_lesion": synth_lesions.LESION_TYPES,  # mixed types
    "test_tumour": ("tumour",), "test_ms": ("ms",), "test_stroke": ("stroke",),
}
# Patients' ages by lesion type (glioma adults, MS young adults, stroke older adults).
LESION_AGE_RANGES = {"tumour": (25.0, 80.0), "ms": (18.0, 55.0), "stroke": (40.0, 89.0)}
CSV_COLUMNS = ("Path", "subject", "dataset", "scanner", "age", "sex", "lesion_type")
PARTICIPANT_COLUMNS = ("participant_id", "age", "sex", "scanner", "lesion_type",
                       "lesion_volume_ml", "cohort")
_PLAN_STREAM, _SUBJECT_STREAM = 0, 1  # independent random streams derived from the seed


@dataclasses.dataclass(frozen=True)
class SubjectPlan:
  """Who a subject is; everything else is drawn from the subject's own random stream."""
  index: int
  participant_id: str
  split: str
  age: float
  sex: str
  scanner: str
  lesion_type: str | None
  size_quantile: float | None


@dataclasses.dataclass(frozen=True)
class SubjectVolumes:
  """Full-grid volumes of one subject: int16 images per modality, uint8 0/1 mask or None."""
  images: dict
  mask: np.ndarray | None
  record: dict


def split_counts(scale: float) -> dict[str, int]:
  """Subjects per split: the defaults times `scale`, at least one each."""
  if not scale > 0:
    raise ConfigError(f"demo cohort: scale must be > 0, got {scale}")
  return {split: max(1, int(round(n * scale))) for split, n in BASE_COUNTS.items()}


def resolve_geometry(geometry) -> synth_anatomy.Geometry:
  """A `Geometry` from its name ("demo", "paper") or itself."""
  if isinstance(geometry, synth_anatomy.Geometry):
    return geometry
  if geometry not in synth_anatomy.GEOMETRIES:
    raise ConfigError(f"demo cohort: unknown geometry {geometry!r}; expected one of "
                      f"{sorted(synth_anatomy.GEOMETRIES)}")
  return synth_anatomy.GEOMETRIES[geometry]


def _balanced(rng: np.random.Generator, values, n: int) -> list:
  """n values cycling through `values` from a random start, shuffled (balanced groups)."""
  start = int(rng.integers(len(values)))
  return [values[(start + i) % len(values)] for i in rng.permutation(n)]


def plan_cohort(seed: int, scale: float = 1.0) -> list[SubjectPlan]:
  """Participants of the cohort, split by split, with ids sub-001, sub-002, ...

  Healthy subjects are spread evenly over the scanners and drawn from each site's recruitment
  age range (so scanner and age are confounded on purpose); patients' ages follow their lesion
  type and they are scanned at a site recruiting that age. Sexes are balanced per split, and
  lesion sizes are stratified per split and type (`size_quantile`).
  """
  rng = np.random.default_rng([seed, _PLAN_STREAM])
  plans = []
  for split, n in split_counts(scale).items():
    sexes = _balanced(rng, ("F", "M"), n)
    types = _SPLIT_LESION_TYPES[split]
    if not types:
      scanners = _balanced(rng, synth_scanners.SCANNERS, n)
      for i in range(n):
        age = float(rng.uniform(*scanners[i].age_range))
        plans.append((split, age, sexes[i], scanners[i].name, None))
      continue
    kinds = _balanced(rng, types, n)
    for i in range(n):
      age = float(rng.uniform(*LESION_AGE_RANGES[kinds[i]]))
      sites = [s.name for s in synth_scanners.SCANNERS if s.age_range[0] <= age <= s.age_range[1]]
      plans.append((split, age, sexes[i], str(rng.choice(sites)), kinds[i]))
  quantiles = {}
  for split in BASE_COUNTS:
    for kind in synth_lesions.LESION_TYPES:
      members = [i for i, p in enumerate(plans) if p[0] == split and p[4] == kind]
      strata = rng.permutation(len(members))
      for member, stratum in zip(members, strata):
        quantiles[member] = float((stratum + rng.uniform()) / len(members))
  width = max(3, len(str(len(plans))))
  return [SubjectPlan(index=i, participant_id=f"sub-{i + 1:0{width}d}", split=split,
                      age=round(age, 1), sex=sex, scanner=scanner, lesion_type=kind,
                      size_quantile=quantiles.get(i))
          for i, (split, age, sex, scanner, kind) in enumerate(plans)]


def synthesise_subject(plan: SubjectPlan, template: synth_anatomy.TemplateAnatomy,
                       grid: synth_anatomy.OutputGrid, seed: int) -> SubjectVolumes:
  """Anatomy -> lesion -> contrasts -> scanner, for one subject, on the full output grid."""
  rng = np.random.default_rng([seed, _SUBJECT_STREAM, plan.index])
  anatomy_params = synth_anatomy.sample_anatomy_params(rng, template, age=plan.age,
                                                       sex=plan.sex)
  lesion_plan = None
  if plan.lesion_type is not None:
    lesion_plan = synth_lesions.plan_lesion(plan.lesion_type, rng, template, plan.size_quantile)
  anatomy = synth_anatomy.warp_subject(
      template, grid, anatomy_params,
      lesion_plan.mass_effect if lesion_plan is not None else None)
  levels = synth_contrast.normalised_tissue_levels(template)
  lesion = None
  if lesion_plan is not None:
    lesion = synth_lesions.render_lesion(lesion_plan, anatomy, template, levels)
  normalised = synth_contrast.synthesise(anatomy, template, myelination=anatomy_params.myelination,
                                         lesion=lesion)
  recipe = synth_scanners.SCANNERS_BY_NAME[plan.scanner]
  shape = grid.geometry.shape
  images = {}
  for contrast in MODALITIES:
    volume = np.zeros(shape, np.int16)
    volume[grid.block] = synth_scanners.acquire(normalised[contrast], anatomy.brain,
                                                grid.axes_mm, recipe, contrast, rng)
    images[contrast] = volume
  mask = None
  record = {"anatomy": anatomy_params.to_json(),
            "brain_volume_ml": _volume_ml(anatomy.brain, grid.geometry)}
  if lesion is not None:
    mask = np.zeros(shape, np.uint8)
    mask[grid.block] = lesion.mask
    record["lesion"] = {"type": lesion.kind, "volume_ml": _volume_ml(lesion.mask, grid.geometry),
                        "size_quantile": round(plan.size_quantile, 4),
                        "params": lesion_plan.params}
  return SubjectVolumes(images=images, mask=mask, record=record)


def _volume_ml(mask: np.ndarray, geometry: synth_anatomy.Geometry) -> float:
  return round(float(mask.sum()) * geometry.voxel_mm ** 3 / 1000.0, 3)


def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
  """A gzipped NIfTI-1 file with a scanner-frame affine; no timestamp, so bytes are stable."""
  image = nib.Nifti1Image(array, affine)
  image.header.set_xyzt_units("mm")
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  return gzip.compress(image.to_bytes(), compresslevel=1, mtime=0)


def _json_text(obj) -> str:
  return json.dumps(obj, indent=1, allow_nan=False) + "\n"


def _csv_text(rows, columns, delimiter=",") -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
  writer.writerow(columns)
  writer.writerows(rows)
  return buffer.getvalue()


def _identity(seed: int, scale: float, geometry: synth_anatomy.Geometry) -> dict:
  return {"version": VERSION, "seed": int(seed), "scale": float(scale),
          "geometry": geometry.to_json()}


def _existing_identity(out_dir: Path) -> dict | None:
  meta = out_dir / "demo_cohort.json"
  if not meta.is_file():
    return None
  try:
    info = json.loads(meta.read_text(encoding="utf-8"))
  except (OSError, ValueError) as e:
    raise DataError(f"{meta}: unreadable demo cohort description ({e})") from e
  return {k: info.get(k) for k in ("version", "seed", "scale", "geometry")}


def split_paths(out_dir) -> dict[str, Path]:
  """{"<split>_<modality>": CSV path} of a cohort in `out_dir`."""
  out_dir = Path(out_dir).resolve()
  return {f"{split}_{m}": out_dir / "splits" / f"{split}_{m}.csv"
          for split in SPLITS for m in MODALITIES}


def _dataset_description() -> dict:
  return {
      "Name": "uad_jax demo cohort (synthetic)",
      "BIDSVersion": "1.9.0",
      "DatasetType": "raw",
      "GeneratedBy": [{"Name": "uad_jax.data.demo", "Version": str(VERSION),
                       "Description": "synthetic multi-scanner T1w/T2w brain MRI with lesions"}],
      "HowToAcknowledge": "Anatomy derived from the MNI152 ICBM 2009a symmetric template "
                          "(McConnell Brain Imaging Centre), as shipped with nilearn.",
  }


_PARTICIPANTS_SIDECAR = {
    "age": {"Description": "age at scan", "Units": "years"},
    "sex": {"Description": "sex", "Levels": {"F": "female", "M": "male"}},
    "scanner": {"Description": "acquisition site/scanner id (see demo_cohort.json)"},
    "lesion_type": {"Description": "synthetic lesion type",
                    "Levels": {"tumour": "glioma-like", "ms": "multiple-sclerosis-like",
                               "stroke": "chronic-stroke-like"}},
    "lesion_volume_ml": {"Description": "anomaly mask volume", "Units": "ml"},
    "cohort": {"Description": "split the subject belongs to"},
}


def _generation_parameters() -> dict:
  return {
      "template": "MNI152 ICBM 2009a symmetric (nilearn), CSF = clip(mask - GM - WM, 0, 1)",
      "t2_weights": synth_contrast.T2_WEIGHTS,
      "texture_amplitude": synth_contrast.TEXTURE_AMPLITUDE,
      "lesion_age_ranges": LESION_AGE_RANGES,
      "base_counts": BASE_COUNTS,
      "scanners": [s.to_json() for s in synth_scanners.SCANNERS],
  }


def _write_cohort(root: Path, final_root: Path, plans, template, grid, seed, identity,
                  progress: bool) -> None:
  """Writes every file of the cohort under `root`; CSV paths point into `final_root`."""
  geometry = grid.geometry
  affine = geometry.affine
  rows, records = [], []
  for plan in tqdm.tqdm(plans, desc="demo cohort", unit="subject", disable=not progress):
    subject = synthesise_subject(plan, template, grid, seed)
    anat = Path("bids") / plan.participant_id / "anat"
    (root / anat).mkdir(parents=True)
    paths = {}
    for modality, volume in subject.images.items():
      name = anat / f"{plan.participant_id}_{modality}.nii.gz"
      (root / name).write_bytes(_nifti_bytes(volume, affine))
      paths[modality] = final_root / name
    if subject.mask is not None:
      name = anat / f"{plan.participant_id}_seg-anomaly_mask.nii.gz"
      (root / name).write_bytes(_nifti_bytes(subject.mask, affine))
    lesion_volume = subject.record["lesion"]["volume_ml"] if subject.mask is not None else None
    rows.append((plan, paths, lesion_volume))
    records.append({**dataclasses.asdict(plan), **subject.record})

  na = "n/a"
  participants = [(p.participant_id, f"{p.age:.1f}", p.sex, p.scanner, p.lesion_type or na,
                   na if v is None else f"{v:.3f}", p.split) for p, _, v in rows]
  bids = root / "bids"
  (bids / "participants.tsv").write_text(
      _csv_text(participants, PARTICIPANT_COLUMNS, delimiter="\t"), encoding="utf-8")
  (bids / "participants.json").write_text(_json_text(_PARTICIPANTS_SIDECAR), encoding="utf-8")
  (bids / "dataset_description.json").write_text(_json_text(_dataset_description()),
                                                 encoding="utf-8")
  (root / "splits").mkdir()
  for split in SPLITS:
    for modality in MODALITIES:
      split_rows = [(str(paths[modality]), p.participant_id,
                     f"demo_{p.lesion_type or 'healthy'}", p.scanner, f"{p.age:.1f}", p.sex,
                     p.lesion_type or na) for p, paths, _ in rows if p.split == split]
      (root / "splits" / f"{split}_{modality}.csv").write_text(
          _csv_text(split_rows, CSV_COLUMNS), encoding="utf-8")
  counts = {split: sum(p.split == split for p in plans) for split in SPLITS}
  description = {"generator": "uad_jax.data.demo", **identity, "counts": counts,
                 "subjects": len(plans), "parameters": _generation_parameters(),
                 "participants": records}
  # Written last: its presence marks a complete cohort (the directory is renamed into place
  # only after this, so an interrupted run never leaves a cohort that looks complete).
  (root / "demo_cohort.json").write_text(_json_text(description), encoding="utf-8")


def generate(out_dir, *, seed: int = 0, geometry="demo", scale: float = 1.0,
             progress: bool = True, overwrite: bool = False) -> dict[str, Path]:
  """Generates the demo cohort in `out_dir` and returns its split CSVs.

  Args:
    out_dir: cohort directory (created atomically: generated in a temporary sibling, renamed at
      the end).
    seed: the cohort is a deterministic function of (seed, geometry, scale).
    geometry: "demo" (2 mm, 120x120x78), "paper" (1 mm, 240x240x155) or a `Geometry`.
    scale: multiplies the number of subjects per split (at least one each).
    progress: show a progress bar.
    overwrite: replace an existing *different* demo cohort. A directory that already holds this
      very cohort is reused without regenerating; a non-empty directory that is not a demo
      cohort is never replaced.

  Returns:
    {"<split>_<modality>": absolute CSV path}, e.g. "train_T1w", "test_stroke_T2w".
  """
  geometry = resolve_geometry(geometry)
  out_dir = Path(out_dir).resolve()
  identity = _identity(seed, scale, geometry)
  plans = plan_cohort(seed, scale)
  if out_dir.exists():
    existing = _existing_identity(out_dir) if out_dir.is_dir() else None
    if existing is None and (not out_dir.is_dir() or any(out_dir.iterdir())):
      raise DataError(f"{out_dir} exists and is not a demo cohort; refusing to replace it, "
                      f"choose another --out directory")
    if existing == identity and not overwrite:
      paths = split_paths(out_dir)
      if all(p.is_file() for p in paths.values()):
        return paths
    if existing is not None and existing != identity and not overwrite:
      raise DataError(f"{out_dir} holds a different demo cohort ({existing}); pass "
                      f"--overwrite (overwrite=True) to replace it with {identity}")
  template = synth_anatomy.load_template(geometry.voxel_mm)
  grid = synth_anatomy.output_grid(geometry, template)
  with atomic_path(out_dir) as tmp:
    tmp.mkdir()
    _write_cohort(tmp, out_dir, plans, template, grid, seed, identity, progress)
  return split_paths(out_dir)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m uad_jax.data.demo",
      description="Generate the bundled synthetic demo cohort (BIDS + split CSVs).")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--geometry", choices=sorted(synth_anatomy.GEOMETRIES), default="demo",
                      help="demo: 2 mm 120x120x78 (default); paper: 1 mm 240x240x155")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="multiplies the number of subjects per split")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing demo cohort generated with other settings")
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    paths = generate(args.out, seed=args.seed, geometry=args.geometry, scale=args.scale,
                     progress=not args.no_progress, overwrite=args.overwrite)
  except (ConfigError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  counts = split_counts(args.scale)
  print(f"demo cohort in {Path(args.out).resolve()} ({sum(counts.values())} subjects, "
        f"{time.perf_counter() - start:.1f} s)")
  for name, path in paths.items():
    print(f"  {name:24s} {path}")
  return 0


