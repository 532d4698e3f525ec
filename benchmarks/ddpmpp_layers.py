"""CPU profile of the paper DDPM++ U-Net (ANDi, 224², batch 4) per layer type and size, and of
the remedies adopted in `uad_jax/networks/ddpmpp_layers.py`.

  flock /tmp/uad_heavy.lock python -m benchmarks.ddpmpp_layers [--part layers|network|all]
      [--batch 4] [--iters 3] [--bf16]

`layers`: every distinct layer of the network (3×3 conv, 1×1 conv, GroupNorm+SiLU, attention)
with its count; forward and forward+backward ms of the straightforward Flax/XLA version
('before') and of the adopted one ('after'), and count × time. `network`: forward and training
slices/s of the whole network with the straightforward layers, with the adopted layers and XLA's
conv weight gradient, and with everything adopted (the default on one CPU device).

Measured 2026-11-26, 2-core AMD EPYC (AVX-512), jax 0.10.2, batch 4, 224², slices/s
(`--part network` takes about 3 minutes, 8 with `--bf16`; `--part layers` about 1.5):
  PyTorch reference (spec platform.md):       forward 3.84, training 1.31
  straightforward Flax layers:                forward 5.7-6.1, training 1.6-1.7
                                              (bfloat16 6.50 / 1.65)
  + GroupNorm from per-channel sums and
    1×1 convolutions as dots:                 forward 8.8-9.7, training 2.07-2.13
                                              (bfloat16 9.45 / 2.01)
  + row-blocked im2col weight gradient of
    the 224² 3×3 convolutions (the default):  forward 9.1-9.5, training 2.35-2.44
                                              (bfloat16 9.30 / 2.18)
  i.e. about 2.4x the reference's forward and 1.8x its training throughput (two runs);
  bfloat16 compute is not faster on this CPU.
  Per layer (fwd+bwd ms): 3×3 conv 32→32 at 224² 82 -> 66 (its weight gradient alone 50 -> 26),
  64→32 182 -> 125; 1×1 conv 64→32 at 224² 89 -> 60; GroupNorm+SiLU 32 ch at 224² 42 -> 21.
  Tried and rejected: the row-block weight gradient at 112² and below or with 1 channel (slower
  than XLA's there, hence not used), the weight gradient as 9 shifted matmuls (2.7x slower at
  224²), as one im2col matmul over the whole map (3.2x slower), per-sample or batch-folded XLA
  gradients, row blocks of one sample, a single-pass GroupNorm variance. The 3×3 input gradient
  (XLA's transposed convolution) already runs at the forward's speed.
  Timings vary by ±20 % (single layers more) on this shared 2-core machine: compare variants
  within one run.
Same-run comparison with the PyTorch reference network: `benchmarks/networks.py`. Under
XLA_FLAGS=--xla_cpu_max_isa=AVX2 only XLA's generated code (GroupNorm, elementwise, copies) is
capped; the convolutions and dots run in YNNPACK (`ynn_fusion` thunks), which picks its kernels
from the CPU, so on an AVX-512 host the convolution rows stay AVX-512 (measured 2026-12-03:
3×3 32→32 at 224² forward 17.2 ms capped, 17.6 uncapped).
On one H100 (jax 0.11.2; measured before the layer changes above, i.e. flax GroupNorm and XLA
1×1 convolutions; float32 at XLA's default precision, TF32 on Hopper): training 725 slices/s at
batch 128 (176 ms/step, 33 TFLOP/s), scoring a 155-slice volume (100 steps) in 5.3 s.
"""

import argparse
import collections
import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from configs import andi as andi_configs
from uad_jax.methods import andi
from uad_jax.networks import ddpmpp_layers as layers


class FlaxGroupNorm(nn.Module):
  """The straightforward GroupNorm: flax.linen.GroupNorm with the reference's settings."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=layers.num_groups(x.shape[-1]), epsilon=1e-6,
                        use_fast_variance=False, dtype=self.dtype)(x)


def lax_conv1x1(features, dtype=jnp.float32, name=None):
  """The straightforward 1×1 convolution: nn.Conv (XLA convolution)."""
  return nn.Conv(features, (1, 1), dtype=dtype, name=name)


def timed(fn, *args, iters):
  """(first call incl. compilation, best of `iters` calls) in seconds."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  best = float("inf")
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return first, best


def network_layers(model):
  """Counter of (kind, resolution, c_in, c_out) over the network's layers."""
  count = collections.Counter()
  for m in model.plan():
    if m.kind == "conv":
      count[("conv3x3", m.resolution, m.c_in, m.c_out)] += 1
    elif m.kind == "norm":
      count[("gn_silu", m.resolution, m.c_out, m.c_out)] += 1
    elif m.kind == "attn":
      count[("attn", m.resolution, m.c_in, m.c_out)] += 1
    elif m.kind == "resblock":
      inner = {"down": m.resolution // 2, "up": m.resolution, "plain": m.resolution}[m.mode]
      out = 2 * m.resolution if m.mode == "up" else inner
      count[("gn_silu", m.resolution, m.c_in, m.c_in)] += 1
      count[("conv3x3", inner, m.c_in, m.c_out)] += 1
      count[("gn_silu", out, m.c_out, m.c_out)] += 1  # GN_1 (+ modulation, no SiLU: same cost)
      count[("conv3x3", out, m.c_out, m.c_out)] += 1
      if m.has_skip_conv:
        count[("conv1x1", out, m.c_in, m.c_out)] += 1
  return count


def layer_variants(kind, c_out):
  """(before, after) Flax modules of one layer kind."""
  if kind == "conv3x3":
    return (layers.Conv3x3(c_out, weight_grad="xla"),
            layers.Conv3x3(c_out, weight_grad="row_chunks"))
  if kind == "conv1x1":
    return lax_conv1x1(c_out), layers.Conv1x1(c_out)
  if kind == "gn_silu":
    return FlaxGroupNorm(), layers.GroupNorm()
  attn = layers.CausalSelfAttention(head_dim=32)
  return attn, attn


def profile_layers(model, batch, iters):
  print(f"{'layer':8s} {'res':>4s} {'c_in->out':>10s} {'n':>3s} | fwd ms before/after | "
        f"fwd+bwd ms before/after | n x fwd+bwd before/after")
  totals = [0.0, 0.0, 0.0, 0.0]
  for (kind, res, c_in, c_out), n in sorted(network_layers(model).items(),
                                            key=lambda kv: (-kv[0][1], kv[0])):
    x = jax.random.normal(jax.random.key(0), (batch, res, res, c_in))
    row = []
    for module in layer_variants(kind, c_out):
      if kind == "attn":
        apply_fn = lambda p, x, module=module: module.apply(p, x, False)
      elif kind == "gn_silu":
        apply_fn = lambda p, x, module=module: nn.silu(module.apply(p, x))
      else:
        apply_fn = module.apply
      params = module.init(jax.random.key(1), x, False) if kind == "attn" else module.init(
          jax.random.key(1), x)
      fwd = jax.jit(apply_fn)
      grad = jax.jit(jax.grad(lambda p, x, f=apply_fn: jnp.sum(f(p, x) * x[..., :1]),
                              argnums=(0, 1)))
      row += [timed(fwd, params, x, iters=iters)[1], timed(grad, params, x, iters=iters)[1]]
    fb, fa, gb, ga = row[0], row[2], row[1], row[3]
    totals = [t + n * v for t, v in zip(totals, (fb, fa, gb, ga))]
    print(f"{kind:8s} {res:4d} {c_in:4d}->{c_out:<4d} {n:3d} | {fb * 1e3:7.1f} / {fa * 1e3:6.1f}"
          f" | {gb * 1e3:7.1f} / {ga * 1e3:6.1f} | {n * gb * 1e3:7.1f} / {n * ga * 1e3:6.1f}",
          flush=True)
  print(f"sum over layers (ms): forward {totals[0] * 1e3:.0f} -> {totals[1] * 1e3:.0f}, "
        f"forward+backward {totals[2] * 1e3:.0f} -> {totals[3] * 1e3:.0f} (elementwise glue, "
        "pooling, concatenation and the optimiser not included)")


def profile_network(batch, iters, bf16):
  variants = [("straightforward layers", "xla", True), ("adopted layers, XLA weight grad",
                                                        "xla", False),
              ("adopted layers, row-chunk weight grad", "row_chunks", False)]
  original = layers.GroupNorm, layers.Conv1x1
  for name, weight_grad, straightforward in variants:
    for dtype in ("float32", "bfloat16") if bf16 else ("float32",):
      config = andi_configs.get_config()
      config.model.pyramid = False
      config.model.conv_weight_grad = weight_grad
      config.training.compute_dtype = dtype
      if straightforward:
        layers.GroupNorm, layers.Conv1x1 = FlaxGroupNorm, lax_conv1x1
      try:
        model = andi.build_model(config)
        state = andi.init_state(config, jax.random.key(0))
        images = jax.random.uniform(jax.random.key(1), (batch, 224, 224, 1))
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.full((batch,), 0.3)))
        step = jax.jit(functools.partial(andi.train_step, config))
        _, t_fwd = timed(fwd, state.params, images, iters=iters)
        first, t_step = timed(step, state, {"image": images}, jax.random.key(2), iters=iters)
      finally:
        layers.GroupNorm, layers.Conv1x1 = original
      print(f"{name:40s} {dtype:8s}: forward {batch / t_fwd:5.2f} slices/s "
            f"({t_fwd * 1e3:5.0f} ms), training {batch / t_step:5.2f} slices/s "
            f"({t_step * 1e3:5.0f} ms/step; compile+first {first:4.1f} s)", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("layers", "network", "all"), default="all")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--bf16", action="store_true", help="also time bfloat16 compute")
  args = parser.parse_args()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch}, 224x224")
  if args.part in ("layers", "all"):
    config = andi_configs.get_config()
    profile_layers(andi.build_model(config), args.batch, args.iters)
  if args.part in ("network", "all"):
    profile_network(args.batch, args.iters, args.bf16)


if __name__ == "__main__":
  main()
