"""Threshold sets: the reference's sweep grid and the `FPR-<fpr>` keys (evaluation.md §5.1, §5.3).

Two kinds of threshold with different comparison precision [PITFALL, spec §5.1]:
- sweep thresholds are numpy float64 (or int64) scalars, so the reference evaluates
  `map > t` in float64 (float32 map values promoted);
- `thr_fpr` / `opt_thr` are plain Python floats from the config (NEP 50 weak scalars), so the
  comparison happens in float32 against `float32(thr)`.
Both become one float32 *cutoff* per key such that, for every float32 voxel value `x`,
`x > cutoff` (float32) gives exactly the reference's decision. Counting is then done once per
volume for all keys together.
"""

import dataclasses
import math
from typing import Sequence

import numpy as np

from uad_jax.errors import ConfigError


def sweep_grid(thr_start, thr_end, thr_step) -> tuple[list[str], np.ndarray]:
  """The reference sweep: `[round(t, 7) for t in numpy.arange(start, end, step)]`.

  numpy `arange` semantics on purpose: the float64 length `ceil((end - start) / step)` can
  include the end point (ANDi: 41 keys up to 5e-05; PatchCore: 31 keys up to 0.9). Integer
  arguments (UniAD: 100, 150, 5) give an int64 grid and keys "100", "105", ...

  Returns (keys, values): keys are `str()` of the rounded numpy scalars ("1e-05", "0.35",
  "0.0"); values are float64 (or int64 for an integer grid), shape (T,).
  """
  if not thr_step or (thr_end - thr_start) / thr_step <= 0:
    raise ConfigError(f"empty threshold sweep: thr_start={thr_start}, thr_end={thr_end}, "
                      f"thr_step={thr_step}")
  rounded = [round(t, 7) for t in np.arange(thr_start, thr_end, thr_step)]
  return [str(t) for t in rounded], np.array(rounded)


def float32_cutoffs(values) -> np.ndarray:
  """Float32 cutoffs equivalent to a float64 (or integer) comparison `x > t` of float32 `x`.

  The cutoff is the largest float32 <= t: for float32 x, `x > t` holds exactly when
  `x > cutoff`. values: (T,) float64 / int64 -> (T,) float32.
  """
  t = np.asarray(values, np.float64)
  with np.errstate(over="ignore"):
    c = t.astype(np.float32)
  above = c.astype(np.float64) > t
  c[above] = np.nextafter(c[above], np.float32(-np.inf))
  return c


def fpr_key(fpr) -> str:
  """`"FPR-<fpr>"` as the reference spells it (`str` of the config's float)."""
  return f"FPR-{fpr}"


@dataclasses.dataclass(frozen=True, eq=False)
class ThresholdSet:
  """Every threshold of one evaluation, in the reference's CSV row order.

  Attributes:
    sweep_keys: sweep keys ("0.01", ...), (T_s,).
    sweep_values: the sweep thresholds, float64 or int64, (T_s,).
    fpr_keys: distinct `FPR-<fpr>` keys in first-occurrence order, (T_f,).
    fpr_targets: the FPR each key names (float), (T_f,).
    fpr_values: the threshold of each key (float, compared in float32), (T_f,).
  """
  sweep_keys: tuple[str, ...] = ()
  sweep_values: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
  fpr_keys: tuple[str, ...] = ()
  fpr_targets: tuple[float, ...] = ()
  fpr_values: tuple[float, ...] = ()

  @classmethod
  def build(cls, sweep: Sequence[float] | None = None,
            fpr_pairs: Sequence[tuple[float, float]] = ()) -> "ThresholdSet":
    """sweep: `(thr_start, thr_end, thr_step)` or None; fpr_pairs: `(fpr, thr)` pairs.

    Pairs are the reference's `zip(eval.fpr, eval.thr_fpr)` (or what
    `calibration.load_thresholds` returns). A repeated fpr reproduces the reference's dict
    semantics [PITFALL, spec §8.1]: the later threshold wins, the key keeps its first position.
    """
    keys, values = ([], np.zeros(0)) if sweep is None else sweep_grid(*sweep)
    by_key: dict[str, tuple[float, float]] = {}
    for fpr, thr in fpr_pairs:
      thr = float(thr)
      if not math.isfinite(thr):
        raise ConfigError(f"threshold for FPR {fpr} is not finite: {thr}")
      by_key[fpr_key(fpr)] = (float(fpr), thr)
    return cls(tuple(keys), values, tuple(by_key),
               tuple(f for f, _ in by_key.values()), tuple(t for _, t in by_key.values()))

  @property
  def keys(self) -> tuple[str, ...]:
    """Sweep keys then FPR keys, (T,)."""
    return self.sweep_keys + self.fpr_keys

  @property
  def cutoffs(self) -> np.ndarray:
    """(T,) float32 cutoffs in `keys` order: a voxel is predicted iff `x > cutoff`."""
    sweep = float32_cutoffs(self.sweep_values)
    fpr = np.array(self.fpr_values, np.float32)   # float32(thr): the weak-scalar compare
    return np.concatenate([sweep, fpr])

  def threshold_of(self, key: str) -> float:
    """The threshold a key names (float64 sweep value or the configured FPR threshold)."""
    if key in self.sweep_keys:
      return self.sweep_values[self.sweep_keys.index(key)].item()
    return self.fpr_values[self.fpr_keys.index(key)]

  def __len__(self) -> int:
    return len(self.sweep_keys) + len(self.fpr_keys)
