"""Shared evaluation of anomaly maps: the reference protocol (evaluation.md), streamed.

Every method hands its `(H, W, Z)` maps (reference layout, slice axis last) to an `Evaluator`
(lesion or healthy cohorts) or a `Calibrator` (healthy validation -> thresholds artifact).
"""

from uad_jax.evaluation.calibration import Calibrator, load_artifact, load_thresholds
from uad_jax.evaluation.evaluator import EvaluationResult, Evaluator, subject_auroc
from uad_jax.evaluation.metrics import (auroc, average_precision, dice_per_threshold,
                                        threshold_at_fpr)
from uad_jax.evaluation.outputs import write_outputs
from uad_jax.evaluation.postprocess import median_filter_3d
from uad_jax.evaluation.thresholds import ThresholdSet, sweep_grid

__all__ = [
    "Calibrator", "EvaluationResult", "Evaluator", "ThresholdSet", "auroc", "average_precision",
    "dice_per_threshold", "load_artifact", "load_thresholds", "median_filter_3d",
    "subject_auroc", "sweep_grid", "threshold_at_fpr", "write_outputs",
]
