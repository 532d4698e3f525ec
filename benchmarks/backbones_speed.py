"""Forward throughput of the frozen backbones as the methods tap them (random weights).

  python benchmarks/backbones_speed.py [--batch 64] [--size 224] [--iters 10]

Per arch, taps and compute mode (float32 with precision 'highest', float32 with XLA's default
precision, bfloat16): slices/s, ms per batch, conv GMAC per slice and the achieved TFLOP/s.
Reference cost (method specs, matched by the count here): wide_resnet50_2 to layer3 9.19
GMAC/slice, resnet18 to layer2 0.99 GMAC, efficientnet_b4 to features.4 0.556 GMAC.

Measured 2026-11-26 on one H100 80GB (jax 0.11.2, batch 64, 224x224), slices/s:
  wide_resnet50_2 to layer3   float32/highest 2,030 (37 TFLOP/s), float32/default (TF32) 8,870,
                              bfloat16 15,000-15,300
  resnet18 to layer2          float32/highest 15,600, float32/default 44,500, bfloat16 58,000
  efficientnet_b4 to feat.4   float32/highest 6,090, float32/default 10,200
"""

import argparse
import logging
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from uad_jax.networks.backbones import load_backbone

CASES = (("wide_resnet50_2", ("layer2", "layer3")),        # PatchCore
         ("wide_resnet50_2", ("layer1", "layer2", "layer3")),   # Reverse Distillation teacher
         ("resnet18", ("maxpool", "layer1", "layer2")),     # FAE
         ("efficientnet_b4", ("features.1", "features.2", "features.3", "features.4")))  # UniAD
MODES = (("float32/highest", jnp.float32, "highest"), ("float32/default", jnp.float32, None),
         ("bfloat16", jnp.bfloat16, None))


def conv_macs(module, variables, x) -> int:
  """Multiply-adds of every conv in one forward (shapes only; XLA's GPU cost analysis does not
  count convolutions that run as library calls)."""
  total = 0

  def count(next_fun, args, kwargs, context):
    nonlocal total
    out = next_fun(*args, **kwargs)
    m = context.module
    if isinstance(m, nn.Conv) and context.method_name == "__call__":
      kh, kw = m.kernel_size
      total += math.prod(out.shape) * kh * kw * (args[0].shape[-1] // m.feature_group_count)
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(module.apply, variables, x)
  return total


def bench(arch, taps, dtype, precision, batch, size, iters):
  module, variables, _ = load_backbone(arch, None, taps, random_key=jax.random.key(0),
                                       dtype=dtype, precision=precision)
  x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), jnp.float32)
  fwd = jax.jit(module.apply)
  flops = 2 * conv_macs(module, variables, x)
  jax.block_until_ready(fwd(variables, x))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fwd(variables, x)
  jax.block_until_ready(out)
  dt = (time.perf_counter() - t0) / iters
  return dt, flops


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=224)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--modes", default=",".join(m for m, _, _ in MODES))
  args = parser.parse_args()
  logging.getLogger("uad_jax").setLevel(logging.ERROR)   # the random-weights banner
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; batch {args.batch}, "
        f"{args.size}x{args.size}", flush=True)
  modes = [m for m in MODES if m[0] in args.modes.split(",")]
  for arch, taps in CASES:
    for name, dtype, precision in modes:
      dt, flops = bench(arch, taps, dtype, precision, args.batch, args.size, args.iters)
      print(f"{arch:16s} {'+'.join(taps):44s} {name:16s} {args.batch / dt:9.1f} slices/s "
            f"{1e3 * dt:9.2f} ms/batch  {flops / args.batch / 2e9:6.2f} GMAC/slice "
            f"{flops / dt / 1e12:7.2f} TFLOP/s", flush=True)


if __name__ == "__main__":
  main()
