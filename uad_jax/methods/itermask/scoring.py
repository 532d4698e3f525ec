"""IterMask's iterative mask shrinking at scoring time (`models/IterMask/eval_iter.py`).

Per chunk of slices X (±3 scale): the first model's squared error selects an initial mask (per
slice the pixels above the k-th smallest error, about 60 % of the brain); then the masked AE
inpaints the mask, pixels whose inpainting error is at most `validation_thr` leave it, and this
repeats while the mask shrinks by at least 10 % per pass. Each slice stops on its own (its map
is frozen from the AE pass made with its last accepted mask) but the whole chunk keeps running
until its slowest slice stops (spec `methods/itermask.md` §3). The loop is a `lax.while_loop`
(data-dependent length) under `jit`, capped at `max_passes` AE passes.
"""

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """initial_fraction: share of the brain in the first mask (reference 0.6); stop_ratio: a
  slice stops once its mask shrinks by less than this share (0.1); max_passes: cap on the AE
  passes of a chunk (the reference has none; its loop ends by itself, in at most about
  log(0.6·brain pixels)/log(1/0.9) + 2 passes); trace: AE passes whose inputs/outputs are kept
  (0 in production; parity tests)."""
  initial_fraction: float = 0.6
  stop_ratio: float = 0.1
  max_passes: int = 200
  trace: int = 0


def kth_smallest_threshold(errors: jnp.ndarray, brain: jnp.ndarray, fraction: float):
  """Per slice the k-th smallest (1-based) of its H·W errors, k = int(H·W − fraction·nb) in
  float32 with truncation (nb = brain pixels), as the reference; errors, brain (S, H, W).
  Returns (S,) float32: about `fraction` of the brain lies strictly above it."""
  s, h, w = errors.shape
  nb = brain.reshape(s, -1).sum(axis=1)
  k = (jnp.float32(h * w) - jnp.float32(fraction) * nb).astype(jnp.int32)
  ordered = jnp.sort(errors.reshape(s, -1), axis=1)
  return jnp.take_along_axis(ordered, (k - 1)[:, None], axis=1)[:, 0]


def _shrink(prev, new, active, stop_ratio):
  """(stop, active'): slices whose mask shrank by < stop_ratio (0/0, an empty mask, counts as
  −1, so they stop) among the active ones."""
  before = prev.sum(axis=(1, 2))
  after = new.sum(axis=(1, 2))
  ratio = jnp.where(before == 0, -1.0, (before - after) / jnp.where(before == 0, 1.0, before))
  stop = (ratio < stop_ratio) & active
  return stop, active & ~stop


def iterative_maps(first_fn: Callable, ae_fn: Callable, x: jnp.ndarray, valid: jnp.ndarray,
                   condition: jnp.ndarray, validation_thr, noise_of_pass: Callable,
                   settings: LoopSettings) -> dict:
  """The scoring loop on one chunk.

  Args:
    first_fn: condition (S, H, W, 1) -> first-model reconstruction (S, H, W, 1).
    ae_fn: (S, H, W, 2) [masked image, condition] -> AE reconstruction (S, H, W, 1).
    x: (S, H, W, 1) float32 slices in the ±3 scale (background −3).
    valid: (S,) bool, False on padding rows (treated as slices without brain: they stop at
      once with map 0 and never keep the loop running).
    condition: `high_frequency_condition(x)`.
    validation_thr: scalar, the calibrated error threshold of the passes after the first.
    noise_of_pass: j (int32 scalar, 0-based AE pass) -> N(0, 1) noise (S, H, W, 1).
  Returns {'maps': (S, H, W) float32, (x − final)² on the brain, 0 elsewhere; 'passes': int32,
    AE passes made; 'first_output': (S, H, W, 1)} and, with settings.trace = T > 0,
    'trace_masks' (T, S, H, W) / 'trace_inputs' (T, S, H, W, 2) / 'trace_outputs'
    (T, S, H, W, 1): the masks, inputs and outputs of the first T AE passes.
  """
  x = x[..., 0]
  brain = ((x > -3.0) & valid[:, None, None]).astype(jnp.float32)
  first_output = first_fn(condition)
  errors = jnp.square(x - first_output[..., 0]) * brain
  thr0 = kth_smallest_threshold(errors, brain, settings.initial_fraction)
  mask = (errors > thr0[:, None, None]).astype(jnp.float32) * brain
  _, active = _shrink(brain, mask, jnp.ones(x.shape[:1], bool), settings.stop_ratio)
  # Slices that stop at j = 0 keep final = 0: map x² on their brain (0 on empty slices; up to 9
  # on slices of 1-2 brain pixels, where the truncated k stops them — reference behaviour).
  final = jnp.zeros_like(x)
  thr = jnp.asarray(validation_thr, jnp.float32)

  def cond(carry):
    j, _, active, _, _ = carry[:5]
    return jnp.any(active) & (j < settings.max_passes)

  def body(carry):
    j, mask, active, final, pred, *trace = carry
    masked = (1.0 - mask) * x + mask * noise_of_pass(j)[..., 0]
    inputs = jnp.stack([masked, condition[..., 0]], axis=-1)
    pred = ae_fn(inputs)[..., 0]
    errors = jnp.square(x - (mask * pred + (1.0 - mask) * x))
    new = (errors > thr).astype(jnp.float32) * brain
    stop, still = _shrink(mask, new, active, settings.stop_ratio)
    final = jnp.where(stop[:, None, None], pred, final)
    if trace:
      slot = jnp.minimum(j, settings.trace - 1)
      trace = [t.at[slot].set(jnp.where(j < settings.trace, v, t[slot]))
               for t, v in zip(trace, (mask, inputs, pred[..., None]))]
    return (j + 1, new, still, final, pred, *trace)

  trace = []
  if settings.trace:
    trace = [jnp.zeros((settings.trace,) + x.shape + c, jnp.float32) for c in ((), (2,), (1,))]
  carry = (jnp.int32(0), mask, active, final, jnp.zeros_like(x), *trace)
  passes, _, active, final, pred, *trace = jax.lax.while_loop(cond, body, carry)
  # At the cap, slices still shrinking take the last reconstruction (never reached by a loop that
  # ends by itself: max_passes is above the reference's bound).
  final = jnp.where(active[:, None, None], pred, final)
  out = {"maps": jnp.square(x - final) * brain, "passes": passes, "first_output": first_output}
  if trace:
    out["trace_masks"], out["trace_inputs"], out["trace_outputs"] = trace
  return out
