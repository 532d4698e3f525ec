"""Training and scoring throughput of any registered method, and its share of the matmul peak.

  python -m benchmarks.throughput --config configs/<method>.py[:preset] [--paper] [--batch 4]
      [--lmdb demo/lmdb/train_T1w] [--artifacts '{"validation_thr": 0.004}']
      [--set scoring.max_ae_passes=1 ...]

For every training stage: slices/s of the jitted train step on a synthetic batch made by the
stage's own feed (crop, value range, host transform), at the preset's batch size. Scoring: the
jitted `score` on `--batch` slices: slices/s, seconds per 155-slice volume and the method's
network evaluations per slice (`Method.network_evaluations`). FLOP/s from XLA's cost analysis,
against the FLOP/s of a large float32 `jnp.dot` measured in the same run. `--paper` measures the
paper preset too (random backbone weights allowed; batch `--batch`, as the reference's figures in
`shared/perf/reference_cpu.md`: batch 4 at 224²). The ISA XLA compiles for is printed (set
`XLA_FLAGS=--xla_cpu_max_isa=AVX2` to emulate an AVX2-only CPU). Methods with prepared
artefacts (DISYRE's codebook) prepare them from `--lmdb`. `--set KEY=VALUE` overrides a config value
of both presets (e.g. IterMask's data-dependent AE passes fixed to one, to quote a per-pass figure). Fitted methods (PatchCore) are
measured by `benchmarks/throughput_fit.py`.
"""

import argparse
import ast
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax import methods
from uad_jax.data.pipeline import EpochShuffle, ReadBatch
from uad_jax.engine.config import load_config
from uad_jax.methods.contract import TrainContext
from uad_jax.utils import cpu

VOLUME_SLICES = 155


def timed(fn, *args, repeats: int):
  """Seconds per call of `fn` (compiled first; best of `repeats`, blocking on the result)."""
  jax.block_until_ready(fn(*args))
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def flops_of(fn, *args) -> float:
  return float(fn.lower(*args).compile().cost_analysis().get("flops", float("nan")))


def matmul_peak(n: int = 2048) -> float:
  """FLOP/s of an (n x n) @ (n x n) float32 product."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  return 2.0 * n ** 3 / timed(jax.jit(jnp.dot), a, a, repeats=5)


def isa() -> str:
  """The CPU's widest vector ISA and XLA's cap on it (XLA_FLAGS --xla_cpu_max_isa)."""
  cap = [f for f in os.environ.get("XLA_FLAGS", "").split() if "max_isa" in f]
  return f"CPU {cpu.vector_isa()}; XLA {cap[0] if cap else 'uncapped'}"


class SyntheticSlices:
  """A brain-like slice source (an ellipse of textured intensities in [0, 1], 0 outside)."""

  def __init__(self, size: int, count: int = 8):
    rng = np.random.default_rng(0)
    y, x = np.mgrid[:size, :size] / (size - 1) * 2 - 1
    inside = (x / 0.8) ** 2 + (y / 0.9) ** 2 < 1
    self.images = [np.where(inside, rng.uniform(0.2, 1.0, (size, size)), 0).astype(np.float32)
                   for _ in range(count)]
    self.path = "synthetic"

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    return {"image": self.images[index]}


def stage_batch(config, stage, artifacts, stored_size: int) -> dict:
  """One training batch of `stage` made by its own feed from synthetic stored slices."""
  source = SyntheticSlices(stored_size)
  transform = stage.batch_transform(config, artifacts) if stage.batch_transform else None
  read = ReadBatch(source=source, order=EpochShuffle(len(source), 0),
                   global_batch_size=config.data.batch_size, process_index=0, process_count=1,
                   image_size=stage.train_crop(config), value_range=stage.value_range(config),
                   transform=transform)
  return read.map(0)


def measure(config, label: str, batch: int, peak: float, repeats: int, stored_size: int,
            artifacts: dict) -> None:
  method = methods.get_method(config.method)
  key = jax.random.key(0)
  print(f"\n{label}: batch {batch}, eval crop {config.data.image_size}²")
  states = {}
  for stage in method.stages:
    state = stage.init(config, key, TrainContext(1, artifacts))
    data = stage_batch(config, stage, artifacts, stored_size)
    step = jax.jit(functools.partial(stage.train_step, config))
    seconds = timed(lambda s, d: step(s, d, key)[1], state, data, repeats=repeats)
    flops = flops_of(step, state, data, key)
    shape = "x".join(map(str, data["image"].shape[1:3]))
    print(f"  train {stage.name:>6}: {batch / seconds:8.3f} slices/s ({shape} inputs, "
          f"{seconds:.2f} s/step)  {flops / seconds / 1e9:6.1f} GFLOP/s "
          f"({100 * flops / seconds / peak:4.1f} % of matmul peak)")
    states[stage.name] = state

  params = method.scoring_params(config, states, artifacts)
  size = config.data.image_size
  images = jnp.asarray(SyntheticSlices(size, batch).images)[..., None]
  valid = jnp.ones((batch,), bool)
  score = jax.jit(functools.partial(method.score, config))
  seconds = timed(score, params, images, valid, key, repeats=repeats)
  flops = flops_of(score, params, images, valid, key)
  evals = method.network_evaluations(config)
  print(f"  score       : {batch / seconds:8.3f} slices/s, {VOLUME_SLICES * seconds / batch:8.1f} "
        f"s per {VOLUME_SLICES}-slice volume ({evals:g} network evaluations per slice)  "
        f"{flops / seconds / 1e9:6.1f} GFLOP/s ({100 * flops / seconds / peak:4.1f} %)")


def with_batch(config, batch: int):
  config.data.batch_size = batch
  if "allow_random_backbone" in config.get("model", {}):
    config.model.allow_random_backbone = True   # speed does not depend on the weights
  return config


def with_settings(config, settings: list[str]):
  """`config` with each `KEY=VALUE` applied (VALUE a Python literal, else a string)."""
  for item in settings:
    key, _, text = item.partition("=")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/<method>.py[:preset]")
  parser.add_argument("--paper", action="store_true", help="also the paper preset")
  parser.add_argument("--batch", type=int, default=4, help="batch of the paper measurement")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--lmdb", default="demo/lmdb/train_T1w",
                      help="training slices for methods that prepare artefacts")
  parser.add_argument("--artifacts", default="{}", help="JSON merged into the artefacts")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override of both presets (repeatable)")
  args = parser.parse_args()
  config = with_settings(load_config(args.config), args.set)
  method = methods.get_method(config.method)
  if method.is_fitted:
    from benchmarks import throughput_fit  # pylint: disable=import-outside-toplevel
    throughput_fit.run(config)
    return
  artifacts = method.prepare(config, Path(args.lmdb)) if method.prepare else {}
  artifacts.update(json.loads(args.artifacts))
  peak = matmul_peak()
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()} ({isa()}): float32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s")
  stored = 120 if "demo" in args.config else 240   # demo grid 120², paper LMDB 240²
  measure(with_batch(config, config.data.batch_size), args.config, config.data.batch_size, peak,
          args.repeats, stored, artifacts)
  if args.paper:
    paper = with_batch(with_settings(load_config(args.config.partition(":")[0]), args.set),
                       args.batch)
    measure(paper, f"{args.config.partition(':')[0]} (paper)", args.batch, peak, args.repeats,
            240, artifacts)


if __name__ == "__main__":
  main()
