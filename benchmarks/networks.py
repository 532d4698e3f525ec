"""Every method's network at paper size: training and forward slices/s per CPU ISA, beside the
PyTorch reference network measured in the same run.

  flock /tmp/uad_heavy.lock python -m benchmarks.networks [--methods andi,riad,...]
      [--isa native,avx2] [--batch 4] [--iters 5] [--torch-python PATH] [--xla-flags=FLAGS]

For each ISA (`native`: what the CPU has; `avx2`: XLA_FLAGS=--xla_cpu_max_isa=AVX2 for XLA and
ATEN_CPU_CAPABILITY=avx2 + ONEDNN_MAX_CPU_ISA=AVX2 for PyTorch, an AVX2-only CPU emulated) and
method, one subprocess measures, at the paper preset and batch `--batch`:
  training: slices/s of each training stage's jitted train step (the method's own step: loss,
    optimiser, EMA), on a synthetic batch made by the stage's feed (`benchmarks/throughput.py`);
  forward: slices/s of the network alone — the DDPM++ U-Net at its input size for ANDi, DISYRE
    (128² windows), RIAD and IterMask; for the feature methods (one network evaluation per
    slice) the jitted scoring of a batch. PatchCore trains nothing: its backbone and search are
    measured by `benchmarks/throughput_fit.py`.
With `--torch-python` (a Python with torch; it needs nothing else) the DDPM++ methods with
GroupNorm (ANDi, DISYRE, RIAD) also run `benchmarks/torch_ddpmpp.py`, the reference network in
PyTorch, with the same ISA, after a parity check of its output against the Flax network loaded
with its weights (`uad_jax.convert.ddpmpp`). Ratios are jax / torch from the same run.
Takes about 1 min per DDPM++ method and ISA without torch, 2 with it; figures on a shared 2-core
machine vary by ±20 % between runs, so compare within one run.

The AVX2 emulation is partial for jax: XLA's own generated code (fusions: GroupNorm,
elementwise, copies) obeys --xla_cpu_max_isa, but the convolutions and matrix products that XLA
hands to YNNPACK pick their kernels from the CPU itself (CPUID), so on an AVX-512 host they keep
AVX-512 kernels. PyTorch's emulation (ATen and oneDNN caps) is complete. Figures for an AVX2-only
CPU therefore come from running this command on one.
"""

import argparse
import dataclasses
import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import throughput
from configs import disyre as disyre_configs
from uad_jax import methods
from uad_jax.convert import ddpmpp as convert
from uad_jax.engine.config import load_config
from uad_jax.methods.contract import TrainContext

REPO = Path(__file__).resolve().parent.parent
METHODS = ("andi", "disyre", "riad", "itermask", "fae", "reverse_distillation", "uniad")
DDPMPP_METHODS = ("andi", "disyre", "riad", "itermask")
TORCH_TWIN = ("andi", "disyre", "riad")          # GroupNorm DDPM++ (the twin has no BatchNorm)
ONE_PASS_TRAINING = ("andi", "disyre")           # one network pass per training slice
ISA_ENV = {"native": {},
           "avx2": {"XLA_FLAGS": "--xla_cpu_max_isa=AVX2", "ATEN_CPU_CAPABILITY": "avx2",
                    "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def ddpmpp_networks(config, method_name):
  """[(label, DDPMpp)] of a DDPM++ method (IterMask: both stages' networks)."""
  module = importlib.import_module(methods.REGISTRY[method_name])
  if method_name == "itermask":
    return [(stage, module.build_model(config, stage)) for stage in ("first", "ae")]
  return [("net", module.build_model(config))]


def measure_method(method_name, batch, iters, torch_python, xla_flags=""):
  """Runs in the worker: prints one JSON line per measurement."""
  config = throughput.with_batch(load_config(str(REPO / "configs" / f"{method_name}.py")), batch)
  method = methods.get_method(config.method)
  key = jax.random.key(0)

  def report(**row):
    label = f"{throughput.isa()} {xla_flags}".strip()
    print(json.dumps({"method": method_name, "isa": label, **row}), flush=True)

  # DISYRE's feed needs its codebook, prepared from training data; the reference's T1 codebook
  # stands in (the speed does not depend on it).
  artifacts = {"codebook": list(disyre_configs.REFERENCE_T1_CODEBOOK)} if (
      method_name == "disyre") else {}
  states = {}
  for stage in method.stages:
    state = stage.init(config, key, TrainContext(1, artifacts))
    data = throughput.stage_batch(config, stage, artifacts, 240)
    step = jax.jit(functools.partial(stage.train_step, config))
    seconds = throughput.timed(lambda s, d, step=step: step(s, d, key)[1], state, data,
                               repeats=iters)
    report(what=f"train {stage.name}", slices_per_s=batch / seconds,
           size=int(data["image"].shape[1]))
    states[stage.name] = state

  if method_name in DDPMPP_METHODS:
    for label, model in ddpmpp_networks(config, method_name):
      x = jax.random.uniform(jax.random.key(1), (batch, model.image_size, model.image_size,
                                                 model.in_channels))
      t = jnp.full((batch,), 0.3)
      params = model.init(key, x[:1], t[:1])
      fwd = jax.jit(lambda p, x, model=model: model.apply(p, x, t, train=False))
      seconds = throughput.timed(fwd, params, x, repeats=iters)
      report(what=f"forward {label}", slices_per_s=batch / seconds, size=model.image_size)
      if torch_python and method_name in TORCH_TWIN:
        report(what=f"torch {label}", size=model.image_size,
               **torch_twin(model, batch, iters, torch_python))
  else:
    params = method.scoring_params(config, states, artifacts)
    size = config.data.image_size
    images = jnp.asarray(throughput.SyntheticSlices(size, batch).images)[..., None]
    score = jax.jit(functools.partial(method.score, config))
    seconds = throughput.timed(score, params, images, jnp.ones((batch,), bool), key,
                               repeats=iters)
    report(what="forward score", slices_per_s=batch / seconds, size=size)


def twin_spec(model) -> dict:
  """What `benchmarks/torch_ddpmpp.py` builds its network from (JSON-able): the Flax DDPMpp's
  module plan and attributes."""
  return {"plan": [dataclasses.asdict(m) for m in model.plan()], "nf": model.nf,
          "positional": model.embedding_type == "positional", "rescale": model.rescale,
          "attn_emb_dim": model.attn_emb_dim, "image_size": model.image_size,
          "in_channels": model.in_channels}


def torch_twin(model, batch, iters, torch_python):
  """Times the PyTorch reference network of `model` in a subprocess (this process's ISA
  settings), after checking its output against `model` with the same weights."""
  with tempfile.TemporaryDirectory() as tmp:
    spec_file, check_file = Path(tmp) / "spec.json", Path(tmp) / "check.npz"
    spec_file.write_text(json.dumps(twin_spec(model)))
    result = subprocess.run([torch_python, str(REPO / "benchmarks" / "torch_ddpmpp.py"),
                             "--spec", str(spec_file), "--batch", str(batch), "--iters",
                             str(iters), "--check", str(check_file)],
                            check=True, capture_output=True, text=True)
    check = dict(np.load(check_file))
  state = {k[len("param:"):]: v for k, v in check.items() if k.startswith("param:")}
  params = convert.torch_to_flax(state, model, "torch twin")
  with jax.default_matmul_precision("highest"):
    y = model.apply({"params": params}, check["x"].transpose(0, 2, 3, 1), check["t"])
  error = float(np.max(np.abs(np.asarray(y).transpose(0, 3, 1, 2) - check["y"])))
  scale = float(np.max(np.abs(check["y"])))
  if not error <= 1e-4 * max(scale, 1.0):
    raise AssertionError(f"torch twin differs from the Flax network: max |Δ| {error:.3g} "
                         f"(max |y| {scale:.3g})")
  timing = json.loads(result.stdout.strip().splitlines()[-1])
  return {"forward_slices_per_s": batch / timing["forward_s"],
          "train_slices_per_s": batch / timing["train_s"], "torch": timing["torch"],
          "torch_isa": timing["isa"], "max_abs_diff": error}


def run_worker(method, isa, args):
  """The worker's JSON rows for `method` under `isa`'s environment."""
  env = {**os.environ, **ISA_ENV[isa], "PYTHONPATH": str(REPO)}
  if args.xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
  command = [sys.executable, "-m", "benchmarks.networks", "--worker", method, "--batch",
             str(args.batch), "--iters", str(args.iters), f"--xla-flags={args.xla_flags}"]
  if args.torch_python:
    command += ["--torch-python", args.torch_python]
  out = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, check=False)
  if out.returncode:
    print(f"{method} ({isa}) failed:\n{out.stderr[-2000:]}", file=sys.stderr, flush=True)
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def print_table(rows):
  """One line per jax measurement; DDPM++ rows beside the same-run PyTorch figure and ratio."""
  print(f"\n{'method':20s} {'ISA':40s} {'what':14s} {'size':>4s} {'jax sl/s':>9s} "
        f"{'torch sl/s':>10s} {'jax/torch':>9s}")
  for row in rows:
    if row["what"].startswith("torch"):
      continue
    kind, net = row["what"].split()
    twin = next((r for r in rows if r["method"] == row["method"] and r["isa"] == row["isa"]
                 and r["what"] == "torch net"), None)
    # The twin's training step is one network pass per slice, as ANDi's and DISYRE's; RIAD's
    # step makes one per mask subset (its row has no ratio).
    paired = net == "net" or (kind == "train" and row["method"] in ONE_PASS_TRAINING)
    ref = twin and paired and twin[f"{kind}_slices_per_s"]
    ref_text = f"{ref:10.3f} {row['slices_per_s'] / ref:8.2f}x" if ref else ""
    print(f"{row['method']:20s} {row['isa']:40s} {row['what']:14s} {row['size']:4d} "
          f"{row['slices_per_s']:9.3f} {ref_text}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--isa", default="native,avx2")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--iters", type=int, default=5, help="timed calls (best is kept)")
  parser.add_argument("--torch-python", help="a Python with torch, for the reference network")
  parser.add_argument("--xla-flags", default="",
                      help="more XLA_FLAGS for the jax side, e.g. "
                           "--xla_cpu_experimental_ynn_fusion_type= (convolutions in Eigen)")
  parser.add_argument("--worker", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    measure_method(args.worker, args.batch, args.iters, args.torch_python, args.xla_flags)
    return
  rows = []
  for isa in args.isa.split(","):
    for method in args.methods.split(","):
      for row in run_worker(method, isa, args):
        rows.append(row)
        print(json.dumps(row), flush=True)
  print_table(rows)


if __name__ == "__main__":
  main()
