"""The reference DDPM++ U-Net in PyTorch (NCHW) and its speed, for same-run comparisons.

Run by `benchmarks/networks.py` with a Python that has torch (it imports nothing of uad_jax, so
torch need not share the project's environment):

  TORCH_PYTHON benchmarks/torch_ddpmpp.py --spec SPEC.json --batch 4 [--iters 3] [--check OUT.npz]

SPEC.json: the Flax network's module plan (`DDPMpp.plan()`) and attributes. The modules carry the
reference's names (`all_modules.{i}...`, spec `methods/andi.md` §2.6), so the state_dict loads
through `uad_jax.convert.ddpmpp.torch_to_flax`: `--check` saves it with one forward (eval mode)
for the caller to compare with the Flax network. As in the reference, the up blocks upsample the
skip before the 1×1 Conv_2; attention is PyTorch's CPU scaled_dot_product_attention with the
causal mask (the reference's CPU harness, spec §5); dropout is on in training. GroupNorm variant
only (ANDi, DISYRE, RIAD). Prints one JSON line: torch version, ATen's CPU capability (set
ATEN_CPU_CAPABILITY=avx2 and ONEDNN_MAX_CPU_ISA=AVX2 to emulate an AVX2-only CPU), threads, and
the best seconds per forward (no_grad, eval) and per training step (v-prediction-style MSE,
backward, AdamW, EMA update, as the reference's step).
"""

import argparse
import json
import math
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def _group_norm(c):
  return nn.GroupNorm(min(c // 4, 32), c, eps=1e-6)  # the reference's groups (num_groups)


class ResBlock(nn.Module):
  """ResnetBlockBigGANpp with the reference's parameter names (GroupNorm_0, Conv_0, emb_layers,
  out_layers = [GN, Dropout, conv], Conv_2)."""

  def __init__(self, c_in, c_out, mode, dropout, temb_dim, rescale):
    super().__init__()
    self.mode, self.rescale = mode, rescale
    self.GroupNorm_0 = _group_norm(c_in)
    self.Conv_0 = nn.Conv2d(c_in, c_out, 3, padding=1)
    self.emb_layers = (nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, 2 * c_out))
                       if temb_dim else None)
    self.out_layers = nn.Sequential(_group_norm(c_out), nn.Dropout(dropout),
                                    nn.Conv2d(c_out, c_out, 3, padding=1))
    self.Conv_2 = nn.Conv2d(c_in, c_out, 1) if c_in != c_out or mode != "plain" else None

  def forward(self, x, temb):
    h = F.silu(self.GroupNorm_0(x))
    if self.mode == "down":
      h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    h = self.Conv_0(h)
    if self.mode == "up":
      h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
    h = self.out_layers[0](h)
    if self.emb_layers is not None:
      scale, shift = self.emb_layers(temb)[:, :, None, None].chunk(2, dim=1)
      h = h * (1 + scale) + shift
    h = self.out_layers[2](self.out_layers[1](h))
    if self.Conv_2 is not None:
      x = self.Conv_2(x)
    return (x + h) / math.sqrt(2.0) if self.rescale else x + h


class CausalSelfAttention(nn.Module):
  """GN → proj_in → qkv (no bias) → causal SDPA over the raster of pixels → proj_out."""

  def __init__(self, c, head_dim, dropout, rescale):
    super().__init__()
    self.heads, self.rescale = c // head_dim, rescale
    self.norm = _group_norm(c)
    self.proj_in = nn.Linear(c, c)
    self.qkv = nn.Linear(c, 3 * c, bias=False)
    self.proj_out = nn.Linear(c, c)
    self.dropout = nn.Dropout(dropout)

  def forward(self, x):
    b, c, hgt, wid = x.shape
    h = self.norm(x).flatten(2).transpose(1, 2)                       # (B, L, C)
    q, k, v = self.qkv(self.proj_in(h)).chunk(3, dim=-1)
    q, k, v = (a.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2) for a in (q, k, v))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # (B, heads, L, d)
    a = self.dropout(self.proj_out(a.transpose(1, 2).reshape(b, -1, c)))
    out = x + a.transpose(1, 2).reshape(b, c, hgt, wid)
    return out / math.sqrt(2.0) if self.rescale else out


class DDPMpp(nn.Module):
  """f(x, t): x (B, C, H, W), t (B,) -> (B, C_out, H, W), for the spec of a Flax `DDPMpp`."""

  def __init__(self, spec):
    super().__init__()
    self.nf = spec["nf"]
    self.plan = [argparse.Namespace(**m) for m in spec["plan"]]
    temb_dim = 4 * self.nf if spec["positional"] else 0
    modules = []
    for m in self.plan:
      if m.kind == "temb_dense":
        modules.append(nn.Linear(m.c_in, m.c_out))
      elif m.kind == "conv":
        modules.append(nn.Conv2d(m.c_in, m.c_out, 3, padding=1))
      elif m.kind == "resblock":
        modules.append(ResBlock(m.c_in, m.c_out, m.mode, m.dropout, temb_dim, spec["rescale"]))
      elif m.kind == "attn":
        modules.append(CausalSelfAttention(m.c_out, spec["attn_emb_dim"], m.dropout,
                                           spec["rescale"]))
      else:
        modules.append(_group_norm(m.c_out))
    self.all_modules = nn.ModuleList(modules)

  def forward(self, x, t):
    temb = None
    half = self.nf // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    h, skips = x, []
    for m, module in zip(self.plan, self.all_modules):
      if m.kind == "temb_dense":
        temb = module(emb)
        emb = F.silu(temb)
        continue
      if m.kind == "resblock":
        if m.pop_skip:
          h = torch.cat([h, skips.pop()], dim=1)
        h = module(h, temb)
      elif m.kind == "norm":
        h = F.silu(module(h))
      else:
        h = module(h)
      if m.push_skip:
        skips.append(h)
    return h


def best_seconds(fn, iters):
  fn()
  best = float("inf")
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--spec", required=True)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--check", help="save state_dict, input and eval-mode output here (.npz)")
  args = parser.parse_args()
  with open(args.spec) as f:
    spec = json.load(f)
  torch.manual_seed(0)
  model = DDPMpp(spec)
  size, c = spec["image_size"], spec["in_channels"]
  x = torch.rand(args.batch, c, size, size) * 2 - 1
  t = torch.rand(args.batch)
  model.eval()
  if args.check:
    for p in model.parameters():  # non-zero everywhere (the zero-initialised layers too)
      p.data.normal_(0.0, 0.05)
    with torch.no_grad():
      y = model(x[:1], t[:1])
    np.savez(args.check, x=x[:1].numpy(), t=t[:1].numpy(), y=y.numpy(),
             **{"param:" + k: v.numpy() for k, v in model.state_dict().items()})

  def forward():
    with torch.no_grad():
      model(x, t)

  forward_s = best_seconds(forward, args.iters)
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
  ema = [p.detach().clone() for p in model.parameters()]
  target = torch.randn_like(x)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(model(x, t), target)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
      params = [p.detach() for p in model.parameters()]
      torch._foreach_lerp_(ema, params, 1.0 - 0.9999)

  train_s = best_seconds(train_step, args.iters)
  print(json.dumps({"torch": torch.__version__, "isa": torch.backends.cpu.get_cpu_capability(),
                    "threads": torch.get_num_threads(), "forward_s": forward_s,
                    "train_s": train_s}))


if __name__ == "__main__":
  main()
