"""A threshold sweep derived from the healthy validation scores when a config sets none."""

import json

import ml_collections
import numpy as np
import pytest

from engine_helpers import cohort_config, tiny_cohort
from uad_jax import evaluation
from uad_jax.engine import evaluate, trainer
from uad_jax.errors import ConfigError


def test_derived_sweep_spans_the_healthy_upper_tail():
  scores = np.linspace(0.0, 2.0, 200_000, dtype=np.float32).reshape(100, 100, 20)
  calibrator = evaluation.Calibrator()
  calibrator.add(scores)
  start, end, step = calibrator.derived_sweep()
  # FPR 0.5 is the median (1.0), FPR 1e-4 the 99.99th percentile (~2.0): up to ~4.0.
  assert start <= 1.0 < start + step
  assert step == pytest.approx(float(f"{(2 * 2.0 - 1.0) / 50:.2g}"))
  assert end == pytest.approx(start + 50 * step) and end >= 3.9
  keys, _ = evaluation.thresholds.sweep_grid(start, end, step)
  assert 50 <= len(keys) <= 51


def test_sweep_of_config_or_calibration():
  config = ml_collections.ConfigDict({"thr_start": 0.1, "thr_end": 0.5, "thr_step": 0.1})
  assert evaluation.calibration.sweep_of(config, None) == (0.1, 0.5, 0.1)
  config.thr_step = 0.0
  assert evaluation.calibration.sweep_of(config, {"sweep": [0.0, 1.0, 0.02]}) == (0.0, 1.0, 0.02)
  with pytest.raises(ConfigError, match="--calibrate"):
    evaluation.calibration.sweep_of(config, {"sweep": None})


def test_calibrate_derives_and_evaluate_uses_the_sweep(tmp_path):
  cohort = tiny_cohort(tmp_path / "cohort")
  config = cohort_config("intensity", cohort)
  config.eval.thr_start = config.eval.thr_end = config.eval.thr_step = 0.0
  trainer.train(config, tmp_path / "run")
  doc = json.loads(evaluate.calibrate(config, tmp_path / "run").read_text())
  start, end, step = doc["sweep"]
  assert 0 < step and start < end
  evaluate.evaluate(config, tmp_path / "run", out=str(tmp_path / "eval"), cohorts=["lesion"])
  result = json.loads((tmp_path / "eval" / "lesion" / "results.json").read_text())
  keys, _ = evaluation.thresholds.sweep_grid(start, end, step)
  assert result["info"]["calibration"]["sweep"] == doc["sweep"]
  assert result["raw"]["best_mean_dice"]["key"] in keys
