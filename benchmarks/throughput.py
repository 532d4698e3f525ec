"""Training and scoring throughput of a method, and the share of the CPU's matmul peak it reaches.

  python -m benchmarks.throughput --config configs/andi.py[:preset] [--paper] [--batch 4]

Gradient-trained methods: slices/s of the jitted train step at the config's batch size, scoring
slices/s (one network evaluation per slice counted: ANDi's loop makes one per slice and step),
FLOP/s of both from XLA's cost analysis, and the FLOP/s of a large float32 `jnp.dot` measured in
the same run as the reference peak. `--paper` adds the paper network (224², `--batch` slices; ANDi scoring with stride 25, i.e. 4
of its 100 steps, which leaves the cost per network evaluation unchanged).
Fitted methods (PatchCore) are measured by `benchmarks/throughput_fit.py`.
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax import methods
from uad_jax.engine.config import load_config
from uad_jax.engine.trainer import image_shape


def timed(fn, *args, repeats: int):
  """Seconds per call of an already compiled `fn` (best of `repeats`, blocking on the result)."""
  jax.block_until_ready(fn(*args))
  best = np.inf
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def flops_of(fn, *args) -> float:
  return float(fn.lower(*args).compile().cost_analysis()["flops"])


def matmul_peak(n: int = 2048) -> float:
  """FLOP/s of an (n x n) @ (n x n) float32 product."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
  dot = jax.jit(jnp.dot)
  return 2.0 * n ** 3 / timed(dot, a, a, repeats=5)


def measure(config, batch: int, label: str, peak: float, repeats: int) -> None:
  method = methods.get_method(config.method)
  shape = image_shape(config)
  state = method.init_state(config, jax.random.key(0), shape)
  images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (batch,) + shape), jnp.float32)
  key = jax.random.key(2)

  step = jax.jit(functools.partial(method.train_step, config))
  step_s = timed(lambda s: step(s, {"image": images}, key)[1], state, repeats=repeats)
  step_flops = flops_of(step, state, {"image": images}, key)

  score = jax.jit(functools.partial(method.score_slices, config))
  evals = int(getattr(method, "network_evaluations_per_slice", lambda c: 1)(config))
  score_s = timed(score, state.ema_params, images, key, repeats=repeats)
  score_flops = flops_of(score, state.ema_params, images, key)

  print(f"\n{label}: {config.data.image_size}² batch {batch}")
  print(f"  train : {batch / step_s:8.2f} slices/s  {step_flops / step_s / 1e9:7.1f} GFLOP/s "
        f"({100 * step_flops / step_s / peak:4.1f} % of matmul peak)")
  print(f"  score : {batch * evals / score_s:8.2f} slice-evaluations/s "
        f"({evals} network evaluations per slice; {batch / score_s:.3f} slices/s)  "
        f"{score_flops / score_s / 1e9:7.1f} GFLOP/s ({100 * score_flops / score_s / peak:4.1f} %)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/<method>.py[:preset]")
  parser.add_argument("--paper", action="store_true", help="also the paper network at 224²")
  parser.add_argument("--batch", type=int, default=4, help="batch of the paper measurement")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  config = load_config(args.config)
  method = methods.get_method(config.method)
  if methods.kind(method) == "fit":
    from benchmarks import throughput_fit  # pylint: disable=import-outside-toplevel
    throughput_fit.run(config)
    return
  peak = matmul_peak()
  print(f"{jax.devices()[0].device_kind} x{jax.device_count()}: float32 matmul peak "
        f"{peak / 1e9:.1f} GFLOP/s")
  measure(config, config.data.batch_size, args.config, peak, args.repeats)
  if args.paper:
    paper = load_config(args.config.partition(":")[0])
    if "sampling" in paper and "stride" in paper.sampling:
      paper.sampling.stride = 25   # 4 of ANDi's 100 scoring steps: same per-evaluation cost
    measure(paper, args.batch, f"{args.config.partition(':')[0]} (paper network)", peak,
            args.repeats)


if __name__ == "__main__":
  main()
