"""Reading the outputs of `python -m uad_jax.eval` (layout: `uad_jax/engine/evaluate.py`).

Each `--runs` entry may name a training workdir (its newest `eval/step_<N>` is used), an
`eval/step_<N>` folder, a single cohort folder, or any folder above them (every `results.json`
below it is one cohort evaluation). Cohorts that share a parent folder form one *run* (one
method, modality and checkpoint); runs are labelled by their method, plus the workdir's name
when two runs of the same method and modality are combined.

Calibrated thresholds get a *role* that names them across runs: `opt_thr` for the
lesion-validation Dice-optimal threshold (the paper's "Estimate"), otherwise the `FPR-<fpr>`
key of the target (e.g. `FPR-0.01`). The roles come from the calibration pairs recorded in
`results.json` (`info.calibration.pairs`, written by the engine); outputs written before that
fall back to `calibration.json` next to the checkpoint (`info.checkpoint`); without either,
every key is its own role.
"""

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd

from uad_jax.engine.run_dir import EVAL_IN_PROGRESS
from uad_jax.errors import DataError
from uad_jax.evaluation import calibration
from uad_jax.evaluation.outputs import POSTPROCS

RESULTS_NAME = "results.json"
RESULTS_SCHEMA = "uad_jax.evaluation.results/1"
EXAMPLES_DIR = "examples"
# Identifier columns the report adds to every per-subject row; metadata columns with these
# names (e.g. a `cohort` column of participants.tsv) are kept as `meta_<name>`.
ID_COLUMNS = ("run", "method", "modality", "cohort", "mode", "postproc")
# Per-subject metadata the bias analysis stratifies on (None/NaN where unknown).
META_COLUMNS = ("subject", "scanner", "age", "sex", "lesion_type")
# Per-subject voxel AP and AUROC of lesion cohorts (subjects.csv).
RANKING_COLUMNS = ("ap", "auroc")
_TEXT_COLUMNS = ("subject_path", "subject", "dataset", "lesion_type", "scanner", "sex",
                 "best_key")
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass(frozen=True)
class CalibratedThreshold:
  """One `FPR-<fpr>` threshold of an evaluation.

  Attributes:
    role: name across runs: 'opt_thr' or the key of a target FPR (e.g. 'FPR-0.01').
    key: the results key (e.g. 'FPR-0.01177').
    fpr: the healthy-validation FPR the key names.
    value: the threshold (compared in float32 by the evaluator).
  """
  role: str
  key: str
  fpr: float
  value: float


@dataclasses.dataclass(frozen=True)
class CohortResult:
  """The evaluation outputs of one cohort of one run.

  Attributes:
    directory: the cohort folder (holds results.json).
    run: label of the run in every table (method, or method and workdir name).
    method, modality, cohort, mode: from `results.json` `info` ('lesion' | 'healthy').
    step: checkpoint step (None if unknown).
    workdir: the training workdir (`<workdir>/eval/step_<N>/<cohort>`) if it has
      `checkpoints/` or `tensorboard/`, else None.
    results: the `results.json` document.
    calibrated: the calibrated thresholds, in results order.
  """
  directory: Path
  run: str
  method: str
  modality: str
  cohort: str
  mode: str
  step: int | None
  workdir: Path | None
  results: dict
  calibrated: tuple[CalibratedThreshold, ...]

  @property
  def roles(self) -> tuple[str, ...]:
    return tuple(c.role for c in self.calibrated)

  @property
  def sweep(self) -> tuple[list[str], np.ndarray]:
    """(keys, float64 thresholds) of the threshold sweep."""
    s = self.results["thresholds"]["sweep"]
    return list(s["keys"]), np.asarray(s["values"], np.float64)

  def summary(self, postproc: str) -> dict:
    """The cohort metrics of `results.json` for 'raw' or 'mf' maps."""
    return self.results[postproc]

  @functools.cached_property
  def subjects(self) -> pd.DataFrame:
    """`subjects.csv` with identifier columns, roles instead of FPR keys and, per role,
    `fp_voxels@<role>`; one row per subject x postproc. Lesion cohorts: `ap`, `auroc` (the
    subject's voxel AP/AUROC; NaN in outputs written before they were stored)."""
    return _subject_rows(self)

  @functools.cached_property
  def pooled_counts(self) -> pd.DataFrame:
    """Per (postproc, threshold_key) the voxel counts summed over subjects: `pred_voxels`,
    `tp_voxels`, `fp_voxels` (from `subject_metrics.csv`)."""
    long = self._subject_metrics
    counts = long[long["metric"].isin(("pred_voxels", "tp_voxels", "fp_voxels"))]
    return counts.pivot_table(index=["postproc", "threshold_key"], columns="metric",
                              values="value", aggfunc="sum", sort=False)

  @functools.cached_property
  def _subject_metrics(self) -> pd.DataFrame:
    path = self.directory / "subject_metrics.csv"
    table = _read_csv(path, {"subject_path": str, "metric": str, "threshold_key": str,
                             "postproc": str})
    _require_columns(table, path, ("subject_path", "metric", "threshold_key", "postproc",
                                   "value"))
    table["threshold_key"] = table["threshold_key"].fillna("")
    return table

  def examples(self) -> dict[str, Path]:
    """subject_path -> the `examples/<subject>.npz` file (image, mask, map of one slice)."""
    out = {}
    for f in sorted((self.directory / EXAMPLES_DIR).glob("*.npz")):
      with np.load(f) as z:
        if "path" not in z:
          raise DataError(f"{f}: example without a 'path' entry")
        out[str(z["path"])] = f
    return out


def find_result_dirs(paths) -> list[Path]:
  """Cohort folders (holding results.json) named by or below `paths`, in a stable order."""
  found = []
  for p in map(Path, paths):
    if not p.is_dir():
      raise DataError(f"--runs {p}: no such directory")
    if (p / RESULTS_NAME).is_file():
      dirs = [p]
    elif (p / "eval").is_dir() and not list(p.glob(RESULTS_NAME)):
      steps = [d for d in (p / "eval").iterdir() if d.is_dir() and _STEP_DIR.match(d.name)]
      if not steps:
        raise DataError(f"--runs {p}: workdir without eval/step_<N> folders; run "
                        "`python -m uad_jax.eval` first")
      newest = max(steps, key=lambda d: int(_STEP_DIR.match(d.name).group(1)))
      dirs = sorted(f.parent for f in newest.glob(f"*/{RESULTS_NAME}"))
    else:
      dirs = sorted(f.parent for f in p.rglob(RESULTS_NAME))
    if not dirs:
      raise DataError(f"--runs {p}: no {RESULTS_NAME} found (expected the output of "
                      "`python -m uad_jax.eval`)")
    for parent in sorted({d.parent for d in dirs}):
      if (parent / EVAL_IN_PROGRESS).is_file():
        raise DataError(f"{parent}: the evaluation is incomplete ({EVAL_IN_PROGRESS}: in progress "
                        "or interrupted); run `python -m uad_jax.eval` again")
    found += [d.resolve() for d in dirs]
  duplicates = sorted({str(d) for d in found if found.count(d) > 1})
  if duplicates:
    raise DataError(f"cohort folders named twice by --runs: {duplicates}")
  return found


def load_cohorts(paths) -> list[CohortResult]:
  """Every cohort evaluation named by `paths` (see the module docstring)."""
  raw = [_read_results(d) for d in find_result_dirs(paths)]
  # A run = the cohorts of one parent folder; label = method, disambiguated when needed.
  runs: dict[Path, tuple[str, str]] = {}
  scorings: dict[Path, tuple] = {}
  for directory, doc in raw:
    info = doc["info"]
    key = (info["method"], info["modality"])
    if runs.setdefault(directory.parent, key) != key:
      raise DataError(f"{directory.parent}: cohorts of different runs in one folder "
                      f"({runs[directory.parent]} and {key})")
    scored = (info.get("checkpoint"), json.dumps(info.get("calibration"), sort_keys=True))
    if scorings.setdefault(directory.parent, scored) != scored:
      raise DataError(f"{directory.parent}: cohorts of different evaluations in one folder (other "
                      f"checkpoint or calibration at {directory.name}); evaluate them again")
  labels = {}
  for parent, (method, modality) in runs.items():
    same = [p for p, k in runs.items() if k == (method, modality)]
    labels[parent] = method if len(same) == 1 else f"{method} ({_run_name(parent)})"
  names = list(labels.values())
  clashes = sorted({lab for lab in names if names.count(lab) > 1})
  if clashes:
    raise DataError(f"runs cannot be told apart (same method, modality and workdir name): "
                    f"{clashes}; pass them in separate reports")
  cohorts = [_cohort(directory, doc, labels[directory.parent]) for directory, doc in raw]
  seen = {}
  for c in cohorts:
    k = (c.run, c.modality, c.cohort)
    if k in seen:
      raise DataError(f"cohort {c.cohort} of {c.run} {c.modality} found twice: {seen[k]} and "
                      f"{c.directory}")
    seen[k] = c.directory
  return sorted(cohorts, key=lambda c: (c.modality, c.run, c.mode != "healthy", c.cohort))


def subject_table(cohorts) -> pd.DataFrame:
  """Per-subject rows (subject x postproc) of every cohort, one frame (see `CohortResult`)."""
  return pd.concat([c.subjects for c in cohorts], ignore_index=True)


def _run_name(step_parent: Path) -> str:
  """The workdir name of `<workdir>/eval/step_<N>`, else the folder's own name."""
  if _STEP_DIR.match(step_parent.name) and step_parent.parent.name == "eval":
    return step_parent.parent.parent.name
  return step_parent.name


def _read_results(directory: Path) -> tuple[Path, dict]:
  path = directory / RESULTS_NAME
  try:
    doc = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None
  if doc.get("schema") != RESULTS_SCHEMA:
    raise DataError(f"{path}: schema {doc.get('schema')!r}, expected {RESULTS_SCHEMA!r}")
  info = doc.get("info", {})
  missing = [k for k in ("method", "modality", "cohort") if not info.get(k)]
  if missing:
    raise DataError(f"{path}: info lacks {missing} (written by `python -m uad_jax.eval`?)")
  if doc.get("mode") not in ("lesion", "healthy"):
    raise DataError(f"{path}: mode {doc.get('mode')!r}, expected 'lesion' or 'healthy'")
  for p in POSTPROCS:
    if p not in doc:
      raise DataError(f"{path}: no {p!r} section")
  return directory, doc


def _cohort(directory: Path, doc: dict, run: str) -> CohortResult:
  info = doc["info"]
  step = info.get("checkpoint_step")
  workdir = None
  parent = directory.parent
  if _STEP_DIR.match(parent.name) and parent.parent.name == "eval":
    root = parent.parent.parent
    if (root / "checkpoints").is_dir() or (root / "tensorboard").is_dir():
      workdir = root
    if step is None:
      step = int(_STEP_DIR.match(parent.name).group(1))
  return CohortResult(directory=directory, run=run, method=info["method"],
                      modality=info["modality"], cohort=info["cohort"], mode=doc["mode"],
                      step=None if step is None else int(step), workdir=workdir, results=doc,
                      calibrated=_calibrated(doc))


def _calibration_pairs(info: dict) -> list[dict]:
  """The calibration pairs (key, fpr, thr, source, ...) an evaluation used: from its info,
  else (older outputs) from the artifact next to its checkpoint, else none."""
  recorded = info.get("calibration")
  if recorded is not None:
    return recorded.get("pairs") or []
  checkpoint = info.get("checkpoint")
  artifact = Path(checkpoint) / calibration.ARTIFACT_NAME if checkpoint else None
  if artifact is not None and artifact.is_file():
    return json.loads(artifact.read_text()).get("pairs", [])
  return []


def _calibrated(doc: dict) -> tuple[CalibratedThreshold, ...]:
  """The FPR keys of a result with their roles (see the module docstring)."""
  fpr = doc["thresholds"]["fpr"]
  pairs = _calibration_pairs(doc["info"])
  out = []
  for key, target, value in zip(fpr["keys"], fpr["targets"], fpr["thresholds"]):
    # A repeated key keeps the later pair's threshold (ThresholdSet.build): match the last.
    source = [p.get("source") for p in pairs
              if p.get("key") == key and np.float32(p.get("thr")) == np.float32(value)]
    role = "opt_thr" if source and source[-1] == "opt_thr" else key
    out.append(CalibratedThreshold(role, key, float(target), float(value)))
  return tuple(out)


def _read_csv(path: Path, dtypes: dict) -> pd.DataFrame:
  if not path.is_file():
    raise DataError(f"{path}: missing (incomplete `python -m uad_jax.eval` output)")
  header = pd.read_csv(path, nrows=0).columns
  return pd.read_csv(path, dtype={k: v for k, v in dtypes.items() if k in header})


def _require_columns(table: pd.DataFrame, path: Path, columns) -> None:
  missing = [c for c in columns if c not in table.columns]
  if missing:
    raise DataError(f"{path}: missing columns {missing}")


def _subject_rows(c: CohortResult) -> pd.DataFrame:
  path = c.directory / "subjects.csv"
  table = _read_csv(path, {k: str for k in _TEXT_COLUMNS})
  needed = ["subject_path", "postproc", "lesion_voxels", "eval_voxels", "lesions",
            "subject_score"]
  for t in c.calibrated:
    needed += [f"fpr@{t.key}", f"lesions_hit@{t.key}", f"fp_components@{t.key}"]
    if c.mode == "lesion":
      needed.append(f"dice@{t.key}")
  if c.mode == "lesion":
    needed.append("dice_best")
  _require_columns(table, path, needed)
  table = table.rename(columns={k: f"meta_{k}" for k in ID_COLUMNS if k in table.columns
                                and k != "postproc"})
  for k in META_COLUMNS:
    if k not in table.columns:
      table[k] = None
  if c.mode == "lesion":
    for k in RANKING_COLUMNS:   # outputs written before they were stored: unknown
      if k not in table.columns:
        table[k] = np.nan
  if "lesion_voxels_uncropped" in table.columns:
    size = table["lesion_voxels_uncropped"].astype(float).fillna(table["lesion_voxels"])
  else:
    size = table["lesion_voxels"].astype(float)
  table["lesion_size"] = size
  table["age"] = pd.to_numeric(table["age"], errors="coerce")
  # fp voxels per calibrated key: exact counts from the long table (for pooled FPRs).
  long = c._subject_metrics  # pylint: disable=protected-access
  fp = long[(long["metric"] == "fp_voxels") & long["threshold_key"].isin(
      [t.key for t in c.calibrated])]
  fp = fp.pivot_table(index=["subject_path", "postproc"], columns="threshold_key",
                      values="value", aggfunc="first")
  renames = {}
  for t in c.calibrated:
    fp_column = f"fp_voxels@{t.key}"
    renames.update({f"{m}@{t.key}": f"{m}@{t.role}"
                    for m in ("dice", "fpr", "pred_voxels", "lesions_hit", "fp_components")})
    renames[fp_column] = f"fp_voxels@{t.role}"
    table[fp_column] = fp[t.key].reindex(
        pd.MultiIndex.from_frame(table[["subject_path", "postproc"]])).to_numpy()
  table = table.rename(columns=renames)
  ids = pd.DataFrame({"run": c.run, "method": c.method, "modality": c.modality,
                      "cohort": c.cohort, "mode": c.mode}, index=table.index)
  return pd.concat([ids, table], axis=1)
