"""Streaming evaluator vs a straightforward in-memory implementation of the reference protocol.

  flock /tmp/uad_heavy.lock python -m benchmarks.evaluation [--subjects 20] [--shape 224 224 155]

One synthetic lesion cohort (ellipsoid brain, lesion blobs, continuous float32 maps with zero
background), 40 sweep thresholds + 2 `FPR-<fpr>` thresholds, raw and median-filtered (k=4).
Each implementation runs in its own process, so its peak memory (peak RSS above the process's
RSS after imports) includes the maps it holds: the baseline keeps the whole cohort, as the
reference does; the module sees one volume at a time. Synthesising the maps is not timed.
The baseline: scipy median filter per volume, numpy `map > t` per threshold and subject,
scikit-learn `average_precision_score` on the min-max normalised pooled maps.
Prints both times, both peak memories, the max difference of the CSV numbers, and the time of
one k=4 median filter per volume (scipy and ours).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

SWEEP = (0.01, 0.41, 0.01)     # 40 thresholds
PAIRS = [(0.01, 0.25), (0.019, 0.2)]
KERNEL = 4


def synthetic_subject(i: int, shape):
  """(map float32, lesion mask bool, brain bool) of subject i, deterministic."""
  rng = np.random.default_rng(1000 + i)
  axes = [np.arange(s, dtype=np.float32) - s / 2 for s in shape]
  x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
  radii = (np.array(shape) * rng.uniform(0.3, 0.36, 3)).astype(np.float32)
  brain = (x / radii[0])**2 + (y / radii[1])**2 + (z / radii[2])**2 < 1
  labels = np.zeros(shape, bool)
  for _ in range(int(rng.integers(1, 4))):
    c = (rng.uniform(-0.4, 0.4, 3) * radii).astype(np.float32)
    r = rng.uniform(3, 12, 3).astype(np.float32)
    labels |= ((x - c[0]) / r[0])**2 + ((y - c[1]) / r[1])**2 + ((z - c[2]) / r[2])**2 < 1
  labels &= brain
  scores = np.zeros(shape, np.float32)
  scores[brain] = rng.gamma(2.0, 0.05, int(brain.sum()))
  scores[labels] += rng.uniform(0.1, 0.3, int(labels.sum()))
  return scores, labels, brain


def rss_mib(field: str) -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  raise KeyError(field)


def run_module(n, shape):
  from uad_jax.evaluation import Evaluator, ThresholdSet, write_outputs
  rss0 = rss_mib("VmRSS")
  ev = Evaluator("lesion", ThresholdSet.build(SWEEP, PAIRS), kernel_size=KERNEL)
  seconds = 0.0
  for i in range(n):
    scores, labels, brain = synthetic_subject(i, shape)
    t0 = time.perf_counter()
    ev.add(scores, labels, brain, {"path": f"sub-{i}"})
    seconds += time.perf_counter() - t0
    del scores, labels, brain
  t0 = time.perf_counter()
  result = ev.result()
  with tempfile.TemporaryDirectory() as d:
    write_outputs(result, d, "bench")
  seconds += time.perf_counter() - t0
  hist_mib = ev.histogram_nbytes / 2**20
  return {"seconds": seconds, "peak_mib": rss_mib("VmHWM") - rss0, "histogram_mib": hist_mib,
          "rows": {p: result.reference_rows(p) for p in ("raw", "mf")}}


def run_baseline(n, shape):
  import scipy.ndimage
  from sklearn.metrics import average_precision_score
  rss0 = rss_mib("VmRSS")
  maps = np.empty((n,) + shape, np.float32)
  labels = np.empty((n,) + shape, bool)
  for i in range(n):
    maps[i], labels[i], _ = synthetic_subject(i, shape)
  t0 = time.perf_counter()
  rows = {}
  filtered = np.stack([scipy.ndimage.median_filter(m, size=KERNEL) for m in maps])
  for name, mm in (("raw", maps), ("mf", filtered)):
    out = []
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
      warnings.simplefilter("ignore")
      # np.float64 sweep scalars compare in float64, Python-float thresholds in float32.
      for t in [round(t, 7) for t in np.arange(*SWEEP)]:
        out.append((str(t), np.mean([2 * (m > t)[l].sum() / ((m > t).sum() + l.sum())
                                     for m, l in zip(mm, labels)])))
      for f, thr in PAIRS:
        out.append((f"FPR-{f}", np.mean([2 * (m > thr)[l].sum() / ((m > thr).sum() + l.sum())
                                         for m, l in zip(mm, labels)])))
    lo, hi = mm.min(), mm.max()
    out.append(("AUPRC", average_precision_score(labels.ravel(), ((mm - lo) / (hi - lo)).ravel())))
    rows[name] = out
  seconds = time.perf_counter() - t0
  return {"seconds": seconds, "peak_mib": rss_mib("VmHWM") - rss0,
          "rows": {k: [(key, float(v)) for key, v in r] for k, r in rows.items()}}


def time_median_filters(shape):
  import scipy.ndimage
  from uad_jax.evaluation import median_filter_3d
  scores = synthetic_subject(0, shape)[0]
  t0 = time.perf_counter()
  ref = scipy.ndimage.median_filter(scores, size=KERNEL)
  t1 = time.perf_counter()
  ours = median_filter_3d(scores, KERNEL)
  t2 = time.perf_counter()
  return {"scipy_s": t1 - t0, "ours_s": t2 - t1, "identical": bool(np.array_equal(ref, ours))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--subjects", type=int, default=20)
  parser.add_argument("--shape", type=int, nargs=3, default=(224, 224, 155))
  parser.add_argument("--impl", choices=("module", "baseline", "median"), help=argparse.SUPPRESS)
  args = parser.parse_args()
  shape = tuple(args.shape)
  if args.impl:
    run = {"module": lambda: run_module(args.subjects, shape),
           "baseline": lambda: run_baseline(args.subjects, shape),
           "median": lambda: time_median_filters(shape)}[args.impl]
    print(json.dumps(run()))
    return

  def child(impl):
    out = subprocess.run([sys.executable, "-m", "benchmarks.evaluation", "--impl", impl,
                          "--subjects", str(args.subjects), "--shape", *map(str, shape)],
                         cwd=Path(__file__).resolve().parents[1], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])

  print(f"cohort: {args.subjects} volumes of {shape}, {len(np.arange(*SWEEP))} sweep thresholds "
        f"+ {len(PAIRS)} FPR thresholds, raw + median-filtered (k={KERNEL})")
  mf = child("median")
  print(f"median filter k={KERNEL}, one volume: scipy {mf['scipy_s']:.2f} s, uad_jax "
        f"{mf['ours_s']:.2f} s, identical: {mf['identical']}")
  module, baseline = child("module"), child("baseline")
  diffs = {}
  for p in ("raw", "mf"):
    a, b = dict(module["rows"][p]), dict(baseline["rows"][p])
    assert list(a) == list(b), "row keys differ"
    diffs[p] = {"dice": max(abs(a[k] - b[k]) for k in a if k != "AUPRC"),
                "auprc": abs(a["AUPRC"] - b["AUPRC"])}
  print(f"uad_jax.evaluation: {module['seconds']:8.1f} s   peak memory {module['peak_mib']:8.0f} MiB"
        f"   (cohort histogram {module['histogram_mib']:.0f} MiB)")
  print(f"in-memory baseline: {baseline['seconds']:8.1f} s   peak memory "
        f"{baseline['peak_mib']:8.0f} MiB")
  print(f"speed-up {baseline['seconds'] / module['seconds']:.1f}x, memory ratio "
        f"{module['peak_mib'] / baseline['peak_mib']:.3f}")
  for p, d in diffs.items():
    print(f"max |difference| {p}: Dice rows {d['dice']:.3g}, AUPRC {d['auprc']:.3g}")


if __name__ == "__main__":
  main()
