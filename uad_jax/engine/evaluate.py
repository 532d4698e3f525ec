"""Calibration and evaluation of a checkpoint over the cohorts of a config.

`calibrate`: lesion-validation cohort (lesion mode, Dice-optimal sweep threshold `opt_thr`) and
healthy-validation cohort (thresholds at the target FPRs, and the FPR of `opt_thr`) ->
`<checkpoint step>/calibration.json`.
`evaluate`: every cohort of `config.eval.cohorts` -> the evaluation module's outputs in
`<out>/<cohort>/`, a summary table on stdout.

Volumes are read ahead in a background thread (`iterate_volumes`), scored slice-wise on the
device mesh (`VolumeScorer`) and handed to the evaluator in a second background thread, so disk,
accelerator and the CPU-side metrics overlap.
"""

import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from uad_jax import evaluation, methods
from uad_jax.data.splits import read_split
from uad_jax.data.volume_loader import iterate_volumes
from uad_jax.engine import checkpoints, run_dir, sharding, summary
from uad_jax.engine.config import required_path
from uad_jax.engine.scoring import VolumeScorer
from uad_jax.errors import ConfigError
from uad_jax.methods.contract import TrainContext
from uad_jax.utils.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"
METHOD_CALIBRATION = "method_calibration.json"   # beside calibration.json


def resolve_checkpoint(ckpt, step: int | None) -> tuple[Path, int | None]:
  """`--ckpt` may name a workdir, its `checkpoints/` folder or one step folder inside it."""
  ckpt = Path(ckpt).resolve()
  if (ckpt / "checkpoints").is_dir():
    return ckpt / "checkpoints", step
  if ckpt.name.isdigit() and ckpt.parent.is_dir():
    if step is not None and step != int(ckpt.name):
      raise ConfigError(f"--ckpt {ckpt} names step {ckpt.name} but --step={step}")
    return ckpt.parent, int(ckpt.name)
  if ckpt.is_dir():
    return ckpt, step
  raise ConfigError(f"--ckpt {ckpt}: no such checkpoint directory")


def _abstract_state(config, stage, artifacts, mesh):
  """Shapes, dtypes and (replicated) shardings of a stage's train state, for restoring."""
  repl = sharding.replicated(mesh)
  target = jax.eval_shape(functools.partial(stage.init, config, jax.random.key(0),
                                            TrainContext(1, artifacts)))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), target)


def restore_states(config, method, ckpt, step, mesh):
  """({stage name: state}, step, step directory, meta) of a run's checkpoints.

  The scored (final) stage is restored at `step` (None: its newest readable checkpoint);
  earlier stages (IterMask's first model) at their newest, i.e. their final, checkpoint. A
  fitted method's state is returned under the name 'fit'.
  """
  root, step = resolve_checkpoint(ckpt, step)
  workdir = root.parent
  run_dir.check_run_config(workdir, config, keys=("method",))
  artifacts = run_dir.read_artifacts(workdir)
  states = {}
  stages = method.stages or (None,)
  for stage in stages:
    final = stage is None or stage is method.final_stage
    directory = root if final else run_dir.checkpoint_dir(workdir, method, stage.name)
    store = checkpoints.CheckpointStore(directory, read_only=True)
    target = None if stage is None else _abstract_state(config, stage, artifacts, mesh)
    s, state, _, meta = store.restore(target, step if final else None, method=config.method)
    store.close()
    states["fit" if stage is None else stage.name] = state
    if final:
      step, final_meta = s, meta
  return states, step, root / str(step), final_meta


def scored_step(config, step: int | None) -> int | None:
  """`--step`, else config.eval.step (-1 or absent: None, the newest checkpoint)."""
  if step is not None:
    return step
  configured = config.eval.get("step", -1)
  return None if configured < 0 else configured


class ScoringRun:
  """What every cohort of one calibrate/evaluate call shares: the restored states, the
  method's artefacts and calibration, the scorer."""

  def __init__(self, config, ckpt, step, *, calibrate_method: bool = False):
    self.config = config
    self.method = methods.get_method(config.method)
    self.mesh = sharding.make_mesh()
    states, self.step, self.step_dir, self.meta = restore_states(
        config, self.method, ckpt, scored_step(config, step), self.mesh)
    self.rng = jax.random.fold_in(jax.random.key(config.seed), 0x5C0E)
    artifacts = dict(run_dir.read_artifacts(self.step_dir.parents[1]))
    self.info = {"method": config.method, "modality": config.data.modality,
                 "checkpoint_step": self.step, "checkpoint": str(self.step_dir),
                 "warnings": list(self.meta.get("warnings", []))}
    if self.method.calibrate is not None:
      values = self._method_calibration(states, artifacts, calibrate_method)
      artifacts.update(values)
      self.info["method_calibration"] = values
    for w in self.info["warnings"]:
      log.warning("checkpoint %s: %s", self.step_dir, w)
    params = self.method.scoring_params(config, states, artifacts)
    self.scorer = VolumeScorer(config, self.method, params, self.mesh, self.rng)

  def _method_calibration(self, states, artifacts, compute: bool) -> dict:
    """The method-level calibration (e.g. IterMask's validation_thr): computed by
    `--calibrate` and stored beside the checkpoint, else read from there."""
    path = self.step_dir / METHOD_CALIBRATION
    if compute:
      params = self.method.scoring_params(self.config, states, artifacts)
      log.info("calibrating %s's own parameters", self.config.method)
      values = self.method.calibrate(self.config, params, self.mesh,
                                     jax.random.fold_in(self.rng, 0xCA1))
      if jax.process_index() == 0:
        atomic_write_text(path, json.dumps(values, indent=2) + "\n")
      return values
    if not path.is_file():
      raise ConfigError(f"{path} is missing: {self.config.method} needs its calibration; run "
                        f"`python -m uad_jax.eval --config ... --ckpt ... --calibrate` first")
    return json.loads(path.read_text())

  def score_cohort(self, csv, *, lesion: bool, consume, examples_dir: Path | None = None,
                   writer=None, tag: str = ""):
    """Scores every volume of `csv` and calls `consume(scores, labels, brain, meta)` on each
    ((H, W, Z) arrays, reference layout) in a background thread, in CSV order."""
    records = read_split(csv)
    if not records:
      raise ConfigError(f"{csv}: no subject")
    for r in records:
      if r.modality and r.modality != self.config.data.modality:
        raise ConfigError(f"{csv}: {r.path} is {r.modality} but config.data.modality is "
                          f"{self.config.data.modality}")
    volumes = iterate_volumes(records, image_size=self.config.data.image_size,
                              require_masks=lesion,
                              clip_percentiles=self.config.data.clip_percentiles)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
      pending = None
      for i, vol in enumerate(volumes):
        maps = self.scorer(vol.image, key_index=i)
        if examples_dir is not None:
          save_example(examples_dir, vol, maps)
        if writer is not None and i < 4:
          writer.images(self.step, f"{tag}/{vol.record.subject}",
                        example_panel(vol.image, vol.mask, maps))
        meta = dict(vol.record.meta, path=str(vol.record.path), subject=vol.record.subject,
                    lesion_voxels_uncropped=vol.lesion_voxels_uncropped)
        args = (np.moveaxis(maps, 0, -1), np.moveaxis(vol.mask, 0, -1),
                np.moveaxis(vol.image > 0, 0, -1), meta)
        if pending is not None:
          pending.result()   # at most one subject in the evaluator's hands: bounded memory
        pending = pool.submit(consume, *args)
      if pending is not None:
        pending.result()


def example_slice(mask: np.ndarray, image: np.ndarray) -> int:
  """The slice with the largest lesion area, or (no lesion) the one with the most brain."""
  area = mask.reshape(mask.shape[0], -1).sum(axis=1)
  if not area.any():
    area = (image > 0).reshape(image.shape[0], -1).sum(axis=1)
  return int(np.argmax(area))


def save_example(directory: Path, vol, maps: np.ndarray) -> None:
  """Stores image, mask and map of the example slice of one subject (for reports)."""
  k = example_slice(vol.mask, vol.image)
  directory.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(directory / f"{vol.record.subject}.npz", image=vol.image[k],
                      mask=vol.mask[k], map=maps[k], slice_index=k, path=str(vol.record.path))


def example_panel(image, mask, maps) -> np.ndarray:
  """(3, H, W) display images of the example slice: input, lesion mask, anomaly map."""
  k = example_slice(mask, image)
  return np.stack([image[k], mask[k].astype(np.float32), summary.to_unit_range(maps[k:k + 1])[0]])


def calibrate(config, ckpt, step: int | None = None) -> Path:
  """Writes `calibration.json` next to the checkpoint; returns its path.

  The healthy validation cohort is scored first: its thresholds at the FPR targets, and, when
  the config sets no sweep (eval.thr_step 0), the derived sweep on which the lesion validation
  cohort then finds its Dice-optimal threshold `opt_thr`.
  """
  run = ScoringRun(config, ckpt, step, calibrate_method=True)
  csv = required_path(config, "eval.val_healthy_csv")
  calibrator = evaluation.Calibrator()
  log.info("calibration: healthy validation %s", csv)
  run.score_cohort(csv, lesion=False, consume=calibrator.add)
  derived = None if config.eval.thr_step else calibrator.derived_sweep()
  if derived:
    log.info("threshold sweep derived from the healthy validation scores: %s", derived)
  lesion_result = None
  if config.eval.val_lesion_csv:
    lesion_csv = required_path(config, "eval.val_lesion_csv")
    thresholds = evaluation.ThresholdSet.build(
        evaluation.calibration.sweep_of(config.eval, {"sweep": derived}), [])
    ev = evaluation.Evaluator("lesion", thresholds, kernel_size=config.eval.kernel_size,
                              info=dict(run.info, cohort="val_lesion"))
    log.info("calibration: lesion validation %s", lesion_csv)
    run.score_cohort(lesion_csv, lesion=True, consume=ev.add)
    lesion_result = ev.result()
  if jax.process_index() != 0:
    return run.step_dir / evaluation.calibration.ARTIFACT_NAME
  path = calibrator.write(run.step_dir, config.eval.fpr_targets, lesion_result=lesion_result,
                          validation_csv=csv, checkpoint_step=run.step, method=config.method,
                          modality=config.data.modality, warnings=run.info["warnings"],
                          sweep=derived)
  print(f"calibrated thresholds written to {path}")
  for p in json.loads(path.read_text())["pairs"]:
    print(f"  {p['key']:>14}: threshold {p['thr']:.6g} ({p['source']}, "
          f"achieved FPR {p['achieved_fpr']})")
  return path


def evaluate(config, ckpt, step: int | None = None, out: str | None = None,
             cohorts: list[str] | None = None) -> dict:
  """Scores every cohort (or the named ones); returns {cohort: EvaluationResult}."""
  run = ScoringRun(config, ckpt, step)
  calibrated = evaluation.load_artifact(run.step_dir)
  thresholds = evaluation.ThresholdSet.build(
      evaluation.calibration.sweep_of(config.eval, calibrated),
      evaluation.calibration.threshold_pairs(calibrated))
  names = list(config.eval.cohorts.keys()) if cohorts is None else cohorts
  if not names:
    raise ConfigError("config.eval.cohorts is empty: nothing to evaluate")
  unknown = [n for n in names if n not in config.eval.cohorts]
  if unknown:
    raise ConfigError(f"unknown cohorts {unknown}; config.eval.cohorts has "
                      f"{list(config.eval.cohorts.keys())}")
  out_dir = Path(out) if out else run.step_dir.parents[1] / "eval" / f"step_{run.step}"
  marker = _begin_outputs(out_dir, names, run.info)
  writer = summary.SummaryWriter(run.step_dir.parents[1] / "tensorboard" / "eval")
  results = {}
  for name in names:
    cohort = config.eval.cohorts[name]
    csv = required_path(config, f"eval.cohorts.{name}.csv")
    mode = "lesion" if cohort.lesion else "healthy"
    # The calibration travels with the results: threshold roles without the checkpoint.
    info = dict(run.info, cohort=name, csv=str(csv), mode=mode,
                calibration=evaluation.calibration.results_info(calibrated))
    ev = evaluation.Evaluator(mode, thresholds, kernel_size=config.eval.kernel_size, info=info)
    log.info("evaluating %s (%s mode): %s", name, mode, csv)
    with _output_dir(out_dir / name) as tmp:
      run.score_cohort(csv, lesion=cohort.lesion, consume=ev.add,
                       examples_dir=tmp / EXAMPLES_DIR if tmp and config.eval.save_examples
                       else None, writer=writer, tag=f"eval/{name}")
      results[name] = ev.result()
      if tmp:
        evaluation.write_outputs(results[name], tmp,
                                 f"{config.method}_{config.data.modality}_{name}")
        if run.info["warnings"]:   # beside the reference-format CSVs, which have no room for it
          atomic_write_text(tmp / "WARNINGS.txt", "\n".join(run.info["warnings"]) + "\n")
  writer.close()
  if jax.process_index() == 0:
    table = summary_table(results)
    atomic_write_text(out_dir / "summary.md", table + "\n")
    marker.unlink()   # complete
    print(table)
    print(f"\nresults written to {out_dir}")
  return results


def _begin_outputs(out_dir: Path, names: list[str], info: dict) -> Path:
  """Marks `out_dir` as an evaluation in progress (process 0) and invalidates what an earlier
  evaluation left there (every cohort folder and summary.md), so that an interrupted run never
  leaves old and new cohorts side by side looking complete. Returns the marker's path."""
  marker = out_dir / run_dir.EVAL_IN_PROGRESS
  if jax.process_index() != 0:
    return marker
  out_dir.mkdir(parents=True, exist_ok=True)
  atomic_write_text(marker, json.dumps(
      {"pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cohorts": names,
       "checkpoint": info["checkpoint"]}, indent=2) + "\n")
  old = [d for d in out_dir.iterdir() if (d / run_dir.EVAL_RESULTS).is_file()]
  for d in old:
    shutil.rmtree(d)
  (out_dir / "summary.md").unlink(missing_ok=True)
  if old:
    log.info("removed the outputs of an earlier evaluation in %s: %s", out_dir,
             sorted(d.name for d in old))
  return marker


@contextlib.contextmanager
def _output_dir(path: Path):
  """Process 0: a fresh temporary folder renamed to `path` when complete. Others: None."""
  if jax.process_index() != 0:
    yield None
    return
  with atomic_path(path) as tmp:
    tmp.mkdir(parents=True)
    yield tmp


def summary_table(results: dict) -> str:
  """Markdown table: per cohort the headline metrics of raw and median-filtered maps, after
  the run's warnings (e.g. random backbone weights)."""
  fpr_keys = next(iter(results.values())).thresholds.fpr_keys
  head = ["cohort", "mode", "n", "maps", "best Dice (thr)"] + [
      f"Dice/FPR @{k}" for k in fpr_keys] + ["AUPRC", "AUROC"]
  warnings = sorted({w for r in results.values() for w in r.info.get("warnings", [])})
  rows = [f"> **WARNING:** {w}\n" for w in warnings]
  rows += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.4f}"
  for name, r in results.items():
    for p in ("raw", "mf"):
      s = r.summary[p]
      if r.mode == "lesion":
        best = s["best_mean_dice"]
        best_text = f"{fmt(best['value'])} ({best['key']})" if best else "n/a"
        cells = [fmt(s["dice_mean"][k]) for k in fpr_keys] + [fmt(s["auprc"]), fmt(s["auroc"])]
      else:
        best_text = "–"
        cells = [fmt(s["fpr"][k]) for k in fpr_keys] + ["–", "–"]
      rows.append("| " + " | ".join([name, r.mode, str(len(r.subjects)), p, best_text] + cells)
                  + " |")
  return "\n".join(rows)
