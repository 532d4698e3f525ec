"""Anomaly maps (and segmentations) of new scans, in each scan's own voxel grid.

  python -m uad_jax.predict --config configs/andi.py:demo --ckpt RUN --input scan.nii.gz \
      --out map.nii.gz [--threshold fpr-0.01|opt|VALUE [--mask-out seg.nii.gz]]
  python -m uad_jax.predict ... --input DIR_OR_CSV --out OUT_DIR [--threshold ...]

A scan is normalised, sliced and centre-cropped/padded exactly as evaluation does, scored by the
run's checkpoint (config.eval.step, `--step`), and the map is placed back on the input's grid
(crop/pad undone, slice axis restored) and written with the input's affine and header (float32),
so it overlays the scan in FSLeyes or ITK-SNAP. `--threshold` binarises it at a calibrated
threshold of the run (`calibration.json`: `fpr-<target>` or `opt`) or at a value (`map > thr`).
The segmentation goes to `--mask-out` (default: beside the map, `..._anomaly_seg.nii.gz`). A
folder (every `*.nii`/`*.nii.gz`) or a split CSV (column `Path`) predicts many scans into the
folder `--out` as `<name>_anomaly_map.nii.gz` (and `<name>_anomaly_seg.nii.gz`).
"""

import dataclasses
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from uad_jax.data.splits import read_split
from uad_jax.data.volumes import (center_crop_pad, load_volume, modality_of,
                                  undo_center_crop_pad)
from uad_jax.engine import distributed, evaluate
from uad_jax.errors import ConfigError, DataError, UadError
from uad_jax.evaluation import calibration

MAP_SUFFIX, SEG_SUFFIX = "_anomaly_map.nii.gz", "_anomaly_seg.nii.gz"


@dataclasses.dataclass
class Prediction:
  """One scan's results on its own grid (X, Y, Z): the map (float32) and, with a threshold,
  the segmentation (uint8 0/1)."""
  path: Path
  anomaly_map: nib.Nifti1Image
  segmentation: nib.Nifti1Image | None


def resolve_threshold(spec: str | None, step_dir: Path) -> float | None:
  """`fpr-<target>` / `opt` (from the run's calibration.json) or a number; None: no threshold."""
  if spec is None:
    return None
  try:
    return float(spec)
  except ValueError:
    pass
  doc = calibration.load_artifact(step_dir)
  if spec == "opt":
    if doc.get("opt_thr") is None:
      raise ConfigError(f"{step_dir / calibration.ARTIFACT_NAME} has no opt_thr (calibrated "
                        "without a lesion validation cohort)")
    return float(doc["opt_thr"])
  targets = {f"fpr-{p['fpr']}": p["thr"] for p in doc["pairs"] if p["source"] == "target"}
  if spec.lower() not in targets:
    raise ConfigError(f"--threshold {spec}: expected a number, 'opt' or one of "
                      f"{sorted(targets)} (calibrated targets of {step_dir})")
  return float(targets[spec.lower()])


class Predictor:
  """A run's checkpoint, ready to score scans (`predict(path)`)."""

  def __init__(self, config, ckpt, step: int | None = None, threshold: str | None = None):
    self.config = config
    self.run = evaluate.ScoringRun(config, ckpt, step)
    self.threshold = resolve_threshold(threshold, self.run.step_dir)

  def predict(self, path, key_index: int = 0) -> Prediction:
    path = Path(path)
    modality = modality_of(path)
    if modality and modality != self.config.data.modality:
      raise DataError(f"{path}: a {modality} scan, but the run was trained on "
                      f"{self.config.data.modality}")
    volume = load_volume(path, clip_percentiles=self.config.data.clip_percentiles)
    image = np.ascontiguousarray(
        center_crop_pad(np.moveaxis(volume, 2, 0), self.config.data.image_size))
    maps = self.run.scorer(image, key_index=key_index)       # (Z, S, S)
    maps = np.moveaxis(undo_center_crop_pad(maps, volume.shape[:2]), 0, 2)
    source = nib.load(str(path))
    header = source.header.copy()
    header.set_data_dtype(np.float32)
    anomaly_map = nib.Nifti1Image(maps.astype(np.float32), source.affine, header)
    anomaly_map.header.set_slope_inter(1.0, 0.0)
    segmentation = None
    if self.threshold is not None:
      seg_header = source.header.copy()
      seg_header.set_data_dtype(np.uint8)
      segmentation = nib.Nifti1Image((maps > self.threshold).astype(np.uint8), source.affine,
                                     seg_header)
      segmentation.header.set_slope_inter(1.0, 0.0)
    return Prediction(path, anomaly_map, segmentation)


def input_scans(spec) -> list[Path]:
  """The scans of `--input`: a NIfTI file, a folder of them, or a split CSV."""
  spec = Path(spec)
  if spec.is_dir():
    scans = sorted(p for p in spec.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not scans:
      raise DataError(f"{spec}: no .nii/.nii.gz file in this folder")
    return scans
  if spec.suffix == ".csv":
    return [r.path for r in read_split(spec)]
  if not spec.name.endswith((".nii", ".nii.gz")):
    raise DataError(f"{spec}: not a NIfTI file (.nii/.nii.gz), folder or split CSV")
  return [spec]


def _stem(path: Path) -> str:
  return path.name.removesuffix(".gz").removesuffix(".nii")


def predict(config, ckpt, inputs, out, *, mask_out=None, threshold=None,
            step: int | None = None) -> list[Path]:
  """Writes the maps (and, with a threshold, segmentations) of `inputs`; returns the map
  paths."""
  scans = input_scans(inputs)
  if mask_out is not None and threshold is None:
    raise ConfigError("--mask-out needs --threshold (fpr-<target>, opt or a value)")
  single = len(scans) == 1 and Path(out).name.endswith((".nii", ".nii.gz"))
  if mask_out is not None and not single:
    raise ConfigError("--mask-out names one file: with several scans the segmentations are "
                      f"written into {out} as <name>{SEG_SUFFIX}")
  predictor = Predictor(config, ckpt, step, threshold)
  written = []
  for i, scan in enumerate(scans):
    result = predictor.predict(scan, key_index=i)
    if single:
      map_path = Path(out)
      seg_path = Path(mask_out) if mask_out else map_path.with_name(
          _stem(map_path).removesuffix("_anomaly_map") + SEG_SUFFIX)
    else:
      map_path = Path(out) / f"{_stem(scan)}{MAP_SUFFIX}"
      seg_path = Path(out) / f"{_stem(scan)}{SEG_SUFFIX}"
    map_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(result.anomaly_map, str(map_path))
    if result.segmentation is None:
      seg_path = None
    else:
      seg_path.parent.mkdir(parents=True, exist_ok=True)
      nib.save(result.segmentation, str(seg_path))
    print(f"{scan} -> {map_path}" + (f", {seg_path}" if seg_path else ""))
    written.append(map_path)
  return written


_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<method>.py[:preset] of the run",
                                          lock_config=True)
_CKPT = flags.DEFINE_string("ckpt", None, "the run's workdir (or a step folder)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: config.eval.step)")
_INPUT = flags.DEFINE_string("input", None, "a NIfTI scan, a folder of scans or a split CSV")
_OUT = flags.DEFINE_string("out", None, "map file (one scan) or output folder")
_MASK_OUT = flags.DEFINE_string("mask-out", None, "segmentation file of one scan (default: "
                                "beside the map)")
_THRESHOLD = flags.DEFINE_string("threshold", None, "fpr-<target> | opt | a value")


def main(argv):
  del argv
  distributed.initialize_from_flags()
  logging.set_verbosity(logging.WARNING)
  try:
    if not (_CONFIG.value and _CKPT.value and _INPUT.value and _OUT.value):
      raise ConfigError("--config, --ckpt, --input and --out are required")
    predict(_CONFIG.value, _CKPT.value, _INPUT.value, _OUT.value,
            mask_out=_MASK_OUT.value, threshold=_THRESHOLD.value, step=_STEP.value)
  except UadError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
