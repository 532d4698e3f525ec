"""Throughput and memory of a fitted method (PatchCore): bank building and scoring.

  python benchmarks/throughput_fit.py --config configs/patchcore.py:demo
  (or `benchmarks/throughput.py --config ...`, which calls `run(config)` for fitted methods)

Prints:
1. bank building from 1,000 and 10,000 training slices, each in a fresh process: descriptors/s,
   seconds for the descriptors (read + backbone + aggregation) and the coreset, K, and the peak
   anonymous memory (sampled every 20 ms), which must stay flat as the slice count grows (the
   streaming coreset holds one block and the selection); the peak RSS also counts file-backed
   pages (shared libraries, and the pages of the memory-mapped LMDB read so far, which grow
   with the slices read and which the kernel drops under pressure);
2. scoring: slices/s of `score_slices` on `eval.split_size` slices against the 10,000-slice
   bank (in that bank's process), and the shares of backbone + aggregation vs search;
3. coverage radius of the streaming coreset against the reference's one-shot greedy on a set
   small enough for both (descriptors of `--radius-slices` slices), with their times.
When the configured database has fewer slices than asked, a larger one is built once under
`--cache` from symlinked copies of its volumes (same slices, repeated). Without backbone
weights the backbone is random (figures do not depend on the weights).

Measured 2026-11-26 on the shared 2-core CPU (jax 0.10.2), `configs/patchcore.py:demo`
(random resnet18 to layer3, 112², 196 descriptors of 256-d per slice, batch 32, blocks of 256
slices, p = 0.01; the 10,000 slices are the demo's 2,226 training slices repeated 5x):
  1,000 slices:  K = 1,960;  28,000 descriptors/s (143 slices/s; descriptors 3.5 s, coreset 3.5 s);
                 peak anonymous memory 596 MB (peak RSS 1,214 MB incl. file-backed pages)
  10,000 slices: K = 19,600; 16,000 descriptors/s (82 slices/s; descriptors 32 s, coreset 90 s);
                 peak anonymous memory 696 MB (peak RSS 1,475 MB): +100 MB for 10x the slices,
                 of which 26 MB are the larger bank and selection and the rest malloc arenas
                 (malloc_trim after the build returns to below the 1,000-slice level). The
                 reference would hold 1.96 M x (256 + 128) floats = 3.0 GB (at the paper's
                 1024-d and 784 descriptors per slice: 36 GB for 10,000 slices, 1.7 TB for 461k).
  scoring, 64 slices per call, K = 19,600: 58 slices/s; backbone + aggregation 19 %, search 81 %
  coverage radius, 200 slices (39,200 descriptors, K = 392): one-shot greedy 0.2530, streaming
                 with 7 blocks of 32 slices 0.2773 (ratio 1.096)
The coreset's cost grows as O(M K) (greedy's, streamed or not): it overtakes the backbone as the
training set grows. Figures are printed, never asserted.
"""

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from uad_jax.data.lmdb_source import SliceDataSource  # pylint: disable=wrong-import-position
from uad_jax.data.lmdb_writer import write_slice_database  # pylint: disable=wrong-import-position
from uad_jax.data.pipeline import make_train_iterator  # pylint: disable=wrong-import-position
from uad_jax.engine import sharding  # pylint: disable=wrong-import-position
from uad_jax.engine.config import load_config  # pylint: disable=wrong-import-position
from uad_jax.methods.patchcore import (  # pylint: disable=wrong-import-position
    coreset, features as patchcore_features, method as patchcore)
from uad_jax.networks import feature_extractor  # pylint: disable=wrong-import-position
from uad_jax.utils.atomic import atomic_write_text  # pylint: disable=wrong-import-position

FIT_SIZES = (1_000, 10_000)


class _NullWriter:
  def text(self, *args):
    pass

  def scalars(self, *args):
    pass


def _benchmark_config(config) -> ml_collections.ConfigDict:
  """A copy of `config` that runs without weights (random backbone, same shapes and cost)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.model.backbone_weights:
    config.model.allow_random_backbone = True
  return config


def database_with(config, min_slices: int, cache: Path) -> Path:
  """The configured training database, or one of >= min_slices built from repeated volumes."""
  lmdb = Path(config.data.train_lmdb)
  source = SliceDataSource(lmdb)
  if len(source) >= min_slices:
    return lmdb
  repeats = -(-min_slices // len(source))
  out = cache / f"{lmdb.name}_x{repeats}"
  if (out / "slices").is_dir() and len(SliceDataSource(out)) >= min_slices:
    return out
  links = cache / f"{lmdb.name}_x{repeats}_volumes"
  links.mkdir(parents=True, exist_ok=True)
  paths = []
  for r in range(repeats):
    for v in source.volumes:
      src = Path(v["path"])
      link = links / f"rep{r}_{src.name}"   # keeps the `_T1w`/`_T2w` modality suffix
      if not link.exists():
        link.symlink_to(src)
      paths.append(link)
  csv = cache / f"{lmdb.name}_x{repeats}.csv"
  atomic_write_text(csv, "Path\n" + "".join(f"{p}\n" for p in paths))
  print(f"  building a {repeats}x repeated database in {out} ...", flush=True)
  write_slice_database(csv, out, progress=False)
  return out


def _rss_mb() -> dict:
  """Resident memory now (MB): anonymous (arrays, buffers, allocator) and file-backed (shared
  libraries, pages of the memory-mapped LMDB read so far, which the kernel may drop)."""
  status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
  return {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile", "VmHWM")}


class _AnonPeak:
  """Samples the anonymous resident memory every 20 ms in a thread; `peak` in MB."""

  def __init__(self):
    self.peak = 0.0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self):
    while not self._stop.wait(0.02):
      self.peak = max(self.peak, _rss_mb()["RssAnon"])

  def stop(self) -> float:
    self._stop.set()
    self._thread.join()
    return self.peak


def _fit_child(config_json: str, lmdb: str, slices: int, workdir: str, score: bool) -> None:
  """In a fresh process: builds the bank of `slices` slices and prints JSON with its memory
  (measured before anything else runs) and, with `score`, the scoring figures on that bank."""
  logging.getLogger("uad_jax").setLevel(logging.ERROR)
  config = ml_collections.ConfigDict(json.loads(config_json))
  config.model.max_train_slices = slices
  sampler = _AnonPeak()
  state, meta = patchcore.fit(config, lmdb, sharding.make_mesh(), jax.random.key(config.seed),
                              _NullWriter(), workdir)
  anon_peak = sampler.stop()
  rss = _rss_mb()
  device = jax.devices()[0].memory_stats() or {}
  result = {"plan": meta["plan"], "timings": meta["timings"],
            "descriptors_per_s": meta["descriptors_per_s"], "peak_rss_mb": rss["VmHWM"],
            "peak_anon_mb": anon_peak, "file_rss_mb": rss["RssFile"],
            "device_peak_mb": device.get("peak_bytes_in_use", 0) / 2**20}
  if score:
    result["scoring"] = scoring(config, state)
  print(json.dumps(result))


def _fit_in_child(config, lmdb: Path, slices: int, score: bool) -> dict:
  with tempfile.TemporaryDirectory() as work:
    cmd = [sys.executable, __file__, "--child-fit", str(slices), "--child-lmdb", str(lmdb),
           "--child-workdir", work, "--child-config", config.to_json()]
    if score:
      cmd.append("--child-score")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
  return json.loads(out.stdout.strip().splitlines()[-1])


def bank_building_and_scoring(config, cache: Path) -> None:
  lmdb = database_with(config, max(FIT_SIZES), cache)
  m = config.model
  print(f"bank building ({m.backbone} {'+'.join(m.layers)}, {config.data.image_size}², batch "
        f"{config.data.batch_size}, blocks of {m.coreset_block_slices} slices, p = "
        f"{m.sample_size}; one fresh process each):")
  for n in FIT_SIZES:
    r = _fit_in_child(config, lmdb, n, score=n == max(FIT_SIZES))
    p, t = r["plan"], r["timings"]
    block_mb = p["block_slices"] * p["descriptors_per_slice"] * (m.target_embed_dim
                                                                 + m.projection_dim) * 4 / 2**20
    bank_mb = p["coreset_size"] * (m.target_embed_dim + m.projection_dim) * 4 / 2**20
    device = f", device peak {r['device_peak_mb']:.0f} MB" if r["device_peak_mb"] else ""
    print(f"  {n:6d} slices: {p['num_descriptors']:9d} descriptors, K = {p['coreset_size']:6d}; "
          f"{r['descriptors_per_s']:9.0f} descriptors/s "
          f"({n / (t['descriptors_s'] + t['coreset_s']):6.1f} slices/s; descriptors "
          f"{t['descriptors_s']:6.1f} s, coreset {t['coreset_s']:6.1f} s); "
          f"peak anonymous memory {r['peak_anon_mb']:5.0f} MB (peak RSS {r['peak_rss_mb']:5.0f} MB "
          f"incl. file-backed, {r['file_rss_mb']:4.0f} MB at the end){device}; block buffer "
          f"{block_mb:.0f} MB, bank + selection {bank_mb:.0f} MB", flush=True)
  s = r["scoring"]
  print(f"scoring {s['slices']} slices per call against K = {s['bank_rows']} bank rows: "
        f"{s['slices_per_s']:.1f} slices/s ({1e3 / s['slices_per_s']:.2f} ms/slice); backbone + "
        f"aggregation {100 * s['backbone_share']:.0f} %, search + upsampling "
        f"{100 * (1 - s['backbone_share']):.0f} %", flush=True)


def coverage_against_one_shot(config, slices: int, block_slices: int) -> None:
  """Streaming vs one-shot greedy on the descriptors of the first `slices` training slices."""
  m = config.model
  _, variables, _ = feature_extractor.load_frozen_backbone(config.model, jax.random.key(0))
  extract = jax.jit(functools.partial(patchcore_features.descriptors, config))
  it = make_train_iterator(config.data.train_lmdb, global_batch_size=config.data.batch_size,
                           image_size=config.data.image_size, seed=config.seed)
  parts, n = [], 0
  while n < slices:
    parts.append(np.asarray(extract(variables, next(it)["image"])))
    n += parts[-1].shape[0]
  it.close()
  desc = np.concatenate(parts)[:slices]
  per_slice = desc.shape[1] * desc.shape[2]
  desc = jnp.asarray(desc.reshape(-1, desc.shape[-1]))
  k = coreset.coreset_size(desc.shape[0], m.sample_size)
  w = coreset.random_projection(jax.random.key(1), desc.shape[1], m.projection_dim)
  start = np.asarray(jax.random.choice(jax.random.key(2), block_slices * per_slice,
                                       (m.num_starting_points,), replace=False))
  z = coreset.project(desc, w)

  t0 = time.perf_counter()
  one_shot = coreset.greedy_coreset(desc, k, w, start)
  t_one = time.perf_counter() - t0

  t0 = time.perf_counter()
  blocks = [min(block_slices, slices - s) * per_slice for s in range(0, slices, block_slices)]
  budgets = coreset.block_budgets(blocks, m.sample_size, k)
  sel = coreset.empty_selection(k, z.shape[1], desc.shape[1])
  select = jax.jit(coreset.select_from_block)
  picks, offset, size = [], 0, block_slices * per_slice
  for rows, budget in zip(blocks, budgets):
    bz = jnp.pad(z[offset:offset + rows], ((0, size - rows), (0, 0)))
    brows = jnp.pad(desc[offset:offset + rows], ((0, size - rows), (0, 0)))
    sel, p, _ = select(sel, bz, brows, rows, budget, jnp.asarray(start))
    picks += (offset + np.asarray(p[:budget])).tolist()
    offset += rows
  t_stream = time.perf_counter() - t0
  r_one = coreset.coverage_radius(z, z[one_shot])
  r_stream = coreset.coverage_radius(z, z[np.asarray(picks)])
  print(f"coverage radius on {slices} slices ({desc.shape[0]} descriptors, K = {k}, projected "
        f"{z.shape[1]}-d): one-shot greedy {r_one:.4f} ({t_one:.1f} s), streaming with "
        f"{len(blocks)} blocks of {block_slices} slices {r_stream:.4f} ({t_stream:.1f} s): "
        f"ratio {r_stream / r_one:.3f}", flush=True)


def scoring(config, state) -> dict:
  """Slices/s of score_slices with the bank of `state`, and the backbone's share of the time."""
  mesh = sharding.make_mesh()
  params = patchcore.place_params(patchcore.scoring_params(state), mesh)
  n = -(-config.eval.split_size // mesh.size) * mesh.size
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.uniform(0, 1, (n, config.data.image_size, config.data.image_size,
                                             1)).astype(np.float32), sharding.batch_sharded(mesh))
  full = jax.jit(functools.partial(patchcore.score_slices, config))
  features = jax.jit(functools.partial(patchcore_features.descriptors, config))

  def timed(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps

  t_full = timed(full, params, images, jax.random.key(0))
  t_feat = timed(features, params["backbone"], images)
  return {"slices": n, "bank_rows": int(state["bank"].shape[0]), "slices_per_s": n / t_full,
          "backbone_share": t_feat / t_full}


def run(config) -> None:
  """Prints the PatchCore benchmark figures for `config` (see the module docstring)."""
  run_with(config, Path(tempfile.gettempdir()) / "uad_bench_patchcore", radius_slices=200,
           radius_block_slices=32)


def run_with(config, cache: Path, radius_slices: int, radius_block_slices: int) -> None:
  config = _benchmark_config(config)
  print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"{'RANDOM' if not config.model.backbone_weights else 'imported'} {config.model.backbone}"
        " weights", flush=True)
  bank_building_and_scoring(config, cache)
  coverage_against_one_shot(config, radius_slices, radius_block_slices)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/patchcore.py:demo")
  parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "uad_bench_patchcore"),
                      help="where a larger repeated database is built when needed")
  parser.add_argument("--radius-slices", type=int, default=200)
  parser.add_argument("--radius-block-slices", type=int, default=32)
  parser.add_argument("--child-fit", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--child-lmdb", help=argparse.SUPPRESS)
  parser.add_argument("--child-workdir", help=argparse.SUPPRESS)
  parser.add_argument("--child-config", help=argparse.SUPPRESS)
  parser.add_argument("--child-score", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child_fit:
    _fit_child(args.child_config, args.child_lmdb, args.child_fit, args.child_workdir,
               args.child_score)
    return
  logging.getLogger("uad_jax").setLevel(logging.ERROR)
  run_with(load_config(args.config), Path(args.cache), args.radius_slices,
           args.radius_block_slices)


if __name__ == "__main__":
  import absl.flags  # pylint: disable=wrong-import-position
  absl.flags.FLAGS.mark_as_parsed()   # grain reads absl flags
  main()
