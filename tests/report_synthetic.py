"""Synthetic `uad_jax.eval` outputs for the report tests (the real Evaluator and writers).

`make_run` writes one training workdir's evaluation in the layout of `engine/evaluate.py`:
`<workdir>/eval/step_<N>/<cohort>/` with the evaluation module's files and `examples/*.npz`,
`<workdir>/eval/step_<N>/summary.md`, the calibration artifact in `<workdir>/checkpoints/<N>/`
(also recorded in each results.json `info.calibration`, as the engine does) and an (empty)
`<workdir>/tensorboard/`. Volumes are tiny (16 x 16 x 6): an ellipsoid brain,
blob lesions, maps = scanner-dependent noise in the brain plus a method-dependent signal in the
lesions, so scanners differ on purpose.
"""

import json
from pathlib import Path

import numpy as np

from uad_jax import evaluation
from uad_jax.engine.evaluate import EXAMPLES_DIR
from uad_jax.utils.atomic import atomic_write_text

SHAPE = (16, 16, 6)
SCANNERS = ("siteA", "siteB", "siteC")
NOISE = {"siteA": 0.10, "siteB": 0.18, "siteC": 0.28}   # scanner-dependent map noise
SWEEP = (0.1, 1.0, 0.1)
CALIBRATION = ((0.01, 0.55, "target"), (0.05, 0.45, "opt_thr"))
COHORTS = (("test_healthy", None, 9), ("test_tumour", "tumour", 8), ("test_ms", "ms", 7))


def _brain() -> np.ndarray:
  x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
  return (x / 0.9) ** 2 + (y / 0.9) ** 2 + (z / 1.2) ** 2 <= 1.0


def _subject(rng, kind: str | None, signal: float, index: int):
  """(map, mask, brain, image, meta) of one synthetic subject."""
  brain = _brain()
  mask = np.zeros(SHAPE, bool)
  if kind is not None:
    radius = {"tumour": rng.uniform(2.0, 4.0), "ms": rng.uniform(1.0, 2.0)}[kind]
    centre = rng.integers(5, 11, 3) * np.array([1, 1, 0]) + np.array([0, 0, 3])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    mask = (np.linalg.norm(grid - centre, axis=-1) <= radius) & brain
  scanner = SCANNERS[index % len(SCANNERS)]
  age = float(np.round(rng.uniform(6, 89), 1))
  sex = ("F", "M")[index % 2]
  noise = NOISE[scanner] * (1.0 + age / 100.0)
  scores = np.abs(rng.normal(0.0, noise, SHAPE)) + 0.05
  scores[mask] += signal * rng.uniform(0.6, 1.2)
  scores = np.where(brain, scores, 0.0).astype(np.float32)
  image = np.where(brain, rng.uniform(0.3, 1.0, SHAPE), 0.0).astype(np.float32)
  subject = f"sub-{kind or 'healthy'}{index:02d}"
  meta = {"path": f"/data/bids/{subject}/anat/{subject}_T1w.nii.gz", "subject": subject,
          "dataset": "synthetic", "lesion_type": kind, "scanner": scanner, "age": age,
          "sex": sex, "lesion_voxels_uncropped": int(mask.sum()) * 8}
  return scores, mask, brain, image, meta


def make_run(root, method: str = "ANDi", modality: str = "T1w", *, step: int = 5,
             signal: float = 0.8, seed: int = 0, cohorts=COHORTS,
             extra_meta: dict | None = None) -> tuple[Path, dict]:
  """Writes the eval outputs of one run under `root/<method>_<modality>`.

  extra_meta: metadata added to every subject (e.g. a participants.tsv `cohort` column).
  Returns (workdir, {cohort: EvaluationResult}).
  """
  workdir = Path(root) / f"{method}_{modality}"
  step_dir = workdir / "checkpoints" / str(step)
  step_dir.mkdir(parents=True)
  (workdir / "tensorboard").mkdir()
  pairs = [{"key": evaluation.calibration.fpr_key(f), "fpr": f, "thr": t, "source": s,
            "achieved_fpr": f} for f, t, s in CALIBRATION]
  artifact = {"schema": evaluation.calibration.SCHEMA, "pairs": pairs, "checkpoint_step": step}
  atomic_write_text(step_dir / "calibration.json", json.dumps(artifact) + "\n")
  thresholds = evaluation.ThresholdSet.build(SWEEP, [(f, t) for f, t, _ in CALIBRATION])
  out = workdir / "eval" / f"step_{step}"
  rng = np.random.default_rng(seed)
  lines, results = [], {}
  for name, kind, n in cohorts:
    mode = "healthy" if kind is None else "lesion"
    info = {"method": method, "modality": modality, "checkpoint_step": step,
            "checkpoint": str(step_dir), "warnings": [], "cohort": name, "mode": mode,
            "calibration": evaluation.calibration.results_info(artifact)}
    ev = evaluation.Evaluator(mode, thresholds, kernel_size=4, info=info)
    cohort_dir = out / name
    for i in range(n):
      scores, mask, brain, image, meta = _subject(rng, kind, signal, i)
      meta.update(extra_meta or {})
      ev.add(scores, mask, brain, meta)
      k = int(np.argmax(mask.sum((0, 1)))) if mask.any() else SHAPE[2] // 2
      (cohort_dir / EXAMPLES_DIR).mkdir(parents=True, exist_ok=True)
      np.savez_compressed(cohort_dir / EXAMPLES_DIR / f"{meta['subject']}.npz",
                          image=image[..., k], mask=mask[..., k], map=scores[..., k],
                          slice_index=k, path=meta["path"])
    ev.write(cohort_dir, f"{method}_{modality}_{name}")
    results[name] = ev.result()
    lines.append(f"{name}: {mode}, {n} subjects")
  atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
  return workdir, results
