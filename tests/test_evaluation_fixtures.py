"""Parity of uad_jax.evaluation with the reference's own numbers (fixtures in evaluation/).

Every fixture of the area runs, dispatched on its `kind`; an unknown kind fails.
"""

import numpy as np
import pytest

from reference_fixtures import load_area
from uad_jax.errors import EvaluationError
from uad_jax.evaluation import Calibrator, Evaluator, ThresholdSet, median_filter_3d, metrics
from uad_jax.evaluation.outputs import reference_csv_text

FIXTURES = load_area("evaluation")


def _tol(fx, name):
  """Tolerance of an output: an override whose name starts with `name`, else the default."""
  for key, tol in fx.meta.get("tolerance_overrides", {}).items():
    if key.split(" ")[0] == name:
      return tol
  return fx.tolerance


def _close(fx, name, actual, expected=None, tol_name=None):
  expected = fx.outputs[name] if expected is None else expected
  tol = _tol(fx, tol_name or name)
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64),
                             rtol=tol["rtol"], atol=tol["atol"], equal_nan=True,
                             err_msg=f"{fx.name}: {name}")


def _subjects(fx):
  """Per subject (H, W, Z) map and (H, W, Z) label as evaluate() sees them."""
  maps, labels = fx.inputs["maps"], fx.inputs["labels"]
  return [(maps[i, 0], labels[i]) for i in range(maps.shape[0])]


def _threshold_set(fx, with_sweep=True):
  ev = fx.meta["config"]["eval"]
  sweep = (ev["thr_start"], ev["thr_end"], ev["thr_step"]) if with_sweep else None
  return ThresholdSet.build(sweep, list(zip(ev["fpr"], ev["thr_fpr"])))


def _kernel(fx):
  return fx.meta["config"]["postprocessing"]["kernel_size"]


def _check_maps_mf(fx):
  if "maps_mf" in fx.outputs:
    for i, (m, _) in enumerate(_subjects(fx)):
      np.testing.assert_array_equal(median_filter_3d(m, _kernel(fx)), fx.outputs["maps_mf"][i],
                                    err_msg=f"{fx.name}: maps_mf[{i}]")


def run_lesion(fx, tmp_path):
  ev = Evaluator("lesion", _threshold_set(fx), kernel_size=_kernel(fx))
  for i, (m, lab) in enumerate(_subjects(fx)):
    ev.add(m, lab, meta={"path": f"sub-{i}"})
  res = ev.result()
  keys = fx.meta["keys"]
  assert list(res.thresholds.sweep_keys) == keys["sweep"]
  assert list(res.thresholds.fpr_keys) == keys["fpr"]
  _close(fx, "sweep_thresholds", res.thresholds.sweep_values)
  n_sweep = len(keys["sweep"])
  for p in ("raw", "mf"):
    rows = res.reference_rows(p)
    assert [k for k, _ in rows] == keys["csv_rows"]
    values = np.array([v for _, v in rows])
    _close(fx, f"csv_{p}", values[:-1], fx.outputs[f"csv_{p}"][:-1])
    _close(fx, f"csv_{p}", values[-1:], fx.outputs[f"csv_{p}"][-1:], tol_name="AUPRC")
    _close(fx, "aux_auprc_unnormalised", values[-1], fx.outputs["aux_auprc_unnormalised"][
        ("raw", "mf").index(p)])
    dice = res.per_subject[p]["dice"]
    _close(fx, f"subject_dice_sweep_{p}", dice[:n_sweep])
    _close(fx, f"subject_dice_fpr_{p}", dice[n_sweep:])
    # The CSV text is the reference's byte for byte except the last digits of AUPRC.
    ours = reference_csv_text(rows).splitlines()
    theirs = fx.meta["csv_text"][p].splitlines()
    assert ours[:-1] == theirs[:-1]
    assert ours[-1].startswith("AUPRC,") and theirs[-1].startswith("AUPRC,")
  _check_maps_mf(fx)
  paths = ev.write(tmp_path, "out")
  assert paths["csv_raw"].read_text().splitlines()[:-1] == \
      fx.meta["csv_text"]["raw"].splitlines()[:-1]


def run_healthy(fx, tmp_path):
  ev = Evaluator("healthy", _threshold_set(fx), kernel_size=_kernel(fx))
  for i, (m, lab) in enumerate(_subjects(fx)):
    # The fixture's labels are the reference's healthy-mode labels (background OR lesion).
    ev.add(m, lab, meta={"path": f"sub-{i}"})
  res = ev.result()
  keys = fx.meta["keys"]
  assert list(res.thresholds.fpr_keys) == keys["fpr"]
  n_sweep = len(res.thresholds.sweep_keys)
  for p in ("raw", "mf"):
    rows = res.reference_rows(p)
    assert [k for k, _ in rows] == keys["csv_rows"]
    _close(fx, f"csv_{p}", [v for _, v in rows])
    assert reference_csv_text(rows) == fx.meta["csv_text"][p]
    subject_fpr = metrics.round_fpr(res.per_subject[p]["fp_voxels"][n_sweep:],
                                    [s["eval_voxels"] for s in res.subjects])
    _close(fx, f"subject_fpr_{p}", subject_fpr)
  _close(fx, "aux_brain_voxels", [s["eval_voxels"] for s in res.subjects])
  _check_maps_mf(fx)
  paths = ev.write(tmp_path, "out")
  assert paths["csv_mf"].read_text() == fx.meta["csv_text"]["mf"]


def run_calc_thr(fx, tmp_path):
  fprs = fx.meta["keys"]["fpr_targets"]
  cal = Calibrator()
  for m, lab in _subjects(fx):
    cal.add(m, lab)
  np.testing.assert_array_equal(cal.thresholds(fprs), fx.outputs["thr_at_fpr"])
  np.testing.assert_array_equal(cal.thresholds(fprs, drop_intermediate=False),
                                fx.outputs["aux_thr_at_fpr_full_curve"])
  assert cal.n_voxels == fx.outputs["aux_n_brain_voxels"][0]
  _close(fx, "opt_fpr", [cal.fpr_at(fx.meta["config"]["eval"]["opt_thr"])])
  # The whole thinned ROC curve of scikit-learn, and the array API on the pooled maps.
  values, counts = cal._table()
  fpr, thr = metrics.roc_curve_all_negative(values, counts)
  _close(fx, "aux_roc_fpr", fpr)
  _close(fx, "aux_roc_thresholds", thr)
  np.testing.assert_array_equal(
      metrics.threshold_at_fpr(fx.inputs["maps"][:, 0], fx.inputs["labels"], fprs),
      fx.outputs["thr_at_fpr"])


def run_median_filter(fx, tmp_path):
  for name, volumes in fx.inputs.items():
    for k in fx.meta["config"]["kernel_sizes"]:
      expected = fx.outputs[f"{name}_k{k}"]
      for i in range(volumes.shape[0]):
        np.testing.assert_array_equal(median_filter_3d(volumes[i], k), expected[i],
                                      err_msg=f"{fx.name}: {name}[{i}] k={k}")


def run_expected_error(fx, tmp_path):
  err = fx.meta["expected_error"]
  assert err["type"] == "ValueError" and not err["files_written"]
  ev = Evaluator(fx.meta["mode"], _threshold_set(fx), kernel_size=_kernel(fx))
  for m, lab in _subjects(fx):
    ev.add(m, lab)
  with pytest.raises(ValueError, match="constant") as info:
    ev.write(tmp_path, "out")
  assert isinstance(info.value, EvaluationError)
  assert not list(tmp_path.iterdir())


RUNNERS = {
    "lesion_mode": run_lesion,
    "edge_endpoint_grid": run_lesion,
    "edge_nan_ties": run_lesion,
    "healthy_mode": run_healthy,
    "edge_healthy_nan": run_healthy,
    "calc_thr": run_calc_thr,
    "median_filter": run_median_filter,
    "edge_constant_cohort": run_expected_error,
}


class _ReadTracking(dict):
  """The fixture's outputs, remembering which were read (every one must be compared)."""

  def __init__(self, outputs):
    super().__init__(outputs)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda f: f.name)
def test_reference_fixture(fx, tmp_path):
  assert fx.kind in RUNNERS, f"{fx.name}: unknown fixture kind {fx.kind!r}"
  fx.outputs = _ReadTracking(fx.outputs)
  RUNNERS[fx.kind](fx, tmp_path)
  assert not set(fx.outputs) - fx.outputs.read, \
      f"{fx.name}: outputs never compared: {sorted(set(fx.outputs) - fx.outputs.read)}"
