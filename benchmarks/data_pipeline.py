"""Data pipeline throughput: LMDB creation (volumes/s) and grain reading (slices/s), both formats.

  python -m benchmarks.data_pipeline [--volumes 6] [--batches 40] [--workers 0]

Builds a synthetic cohort in the paper's geometry (240x240x155, int16 .nii.gz, zero background,
brain on about 130 of 155 slices), writes it once in our LMDB format and once in the reference's
(pickled float64), and reads both through the same grain pipeline at 224x224. Also prints the
plain random-access read rate of `SliceDataSource` (no grain) and the database sizes.
Goal: our format reads at least 2x faster than the reference format.
"""

import argparse
import csv
import shutil
import tempfile
import time
from pathlib import Path

import absl.flags
import nibabel as nib
import numpy as np

from uad_jax.data import SliceDataSource, make_train_iterator, write_slice_database


def synthetic_volume(shape, seed) -> np.ndarray:
  """An int16 'brain': a smooth ellipsoid of tissue-like intensities on a zero background."""
  rng = np.random.default_rng(seed)
  x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
  r2 = (x / 0.75) ** 2 + (y / 0.85) ** 2 + (z / 0.84) ** 2
  tissue = 600 + 300 * np.cos(6 * x) * np.sin(5 * y) + 150 * z + rng.normal(0, 20, shape)
  return np.where(r2 <= 1.0, tissue, 0).astype(np.int16)


def make_cohort(root: Path, n: int, shape) -> Path:
  paths = []
  for i in range(n):
    path = root / f"sub-{i:03d}" / "anat" / f"sub-{i:03d}_T1w.nii.gz"
    path.parent.mkdir(parents=True)
    nib.Nifti1Image(synthetic_volume(shape, i), np.eye(4)).to_filename(str(path))
    paths.append(path)
  csv_path = root / "train.csv"
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["Path"])
    w.writerows([[str(p)] for p in paths])
  return csv_path


def db_bytes(db: Path) -> int:
  return sum(p.stat().st_size for p in db.glob("*.mdb"))


def time_build(csv_path, out, n_volumes, **kwargs) -> tuple[Path, float]:
  start = time.perf_counter()
  db = write_slice_database(csv_path, out, progress=False, **kwargs)
  return db, n_volumes / (time.perf_counter() - start)


def grain_rate(db, *, batch, batches, workers, image_size) -> float:
  with make_train_iterator(db, global_batch_size=batch, image_size=image_size, seed=0,
                           worker_count=workers) as it:
    for _ in range(3):  # warm-up (worker start-up, page cache)
      next(it)
    start = time.perf_counter()
    for _ in range(batches):
      next(it)["image"].sum()
    return batches * batch / (time.perf_counter() - start)


def random_access_rate(db, n_reads) -> float:
  src = SliceDataSource(db)
  order = np.random.default_rng(0).permutation(len(src))[:n_reads]
  for i in order[:32]:
    src[int(i)]
  start = time.perf_counter()
  for i in order:
    src[int(i)]
  return len(order) / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--volumes", type=int, default=6)
  p.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--workers", type=int, default=0)
  p.add_argument("--repeats", type=int, default=3, help="reading runs per format (best is kept)")
  p.add_argument("--workdir", help="keep the cohort and databases here (default: a temp dir)")
  args = p.parse_args()
  absl.flags.FLAGS.mark_as_parsed()  # grain workers read absl flags

  root = Path(args.workdir or tempfile.mkdtemp(prefix="uad_data_bench_"))
  try:
    t0 = time.perf_counter()
    csv_path = make_cohort(root / "cohort", args.volumes, args.shape)
    print(f"cohort: {args.volumes} volumes {tuple(args.shape)} int16 .nii.gz "
          f"({time.perf_counter() - t0:.1f} s to generate)")
    ours, ours_build = time_build(csv_path, root / "ours", args.volumes)
    ref, ref_build = time_build(csv_path, root / "ref", args.volumes, reference_compatible=True)
    n = len(SliceDataSource(ours))
    print(f"slices: {n} non-empty ({n / args.volumes:.0f} per volume)")
    print(f"LMDB creation, ours (float32 + header): {ours_build:6.2f} volumes/s, "
          f"{db_bytes(ours) / n / 1e3:.0f} kB/slice")
    print(f"LMDB creation, reference (pickle f64):  {ref_build:6.2f} volumes/s, "
          f"{db_bytes(ref) / n / 1e3:.0f} kB/slice")

    reads = min(n, 2000)
    for name, db in (("ours", ours), ("reference", ref)):
      rate = max(random_access_rate(db, reads) for _ in range(args.repeats))
      print(f"SliceDataSource random access, {name:9s}: {rate:8.0f} slices/s (no grain)")
    rates = {}
    for name, db in (("ours", ours), ("reference", ref)):
      rates[name] = max(grain_rate(db, batch=args.batch, batches=args.batches,
                                   workers=args.workers, image_size=args.image_size)
                        for _ in range(args.repeats))
      print(f"grain {args.image_size}x{args.image_size} batch {args.batch} workers "
            f"{args.workers}, {name:9s}: {rates[name]:8.0f} slices/s")
    ratio = rates["ours"] / rates["reference"]
    print(f"ours / reference through grain: {ratio:.2f}x (goal >= 2x: "
          f"{'met' if ratio >= 2 else 'NOT met'})")
  finally:
    if not args.workdir:
      shutil.rmtree(root)


if __name__ == "__main__":
  main()
