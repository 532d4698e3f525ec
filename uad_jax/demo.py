"""The quickstart's main job: the bundled demo cohort, end to end.

  python -m uad_jax.demo [--out demo] [--methods all | andi,patchcore,...] [--modality T1w]
      [--retrain]

1. generates the synthetic demo cohort (`uad_jax.data.demo`) in `<out>/cohort`;
2. builds the training slice database (`<out>/lmdb/train_<modality>`);
3. per method: trains (or fits) its `demo` preset (`<out>/runs/<method>_<modality>`) or, where
   the project bundles a demo checkpoint trained by its own command
   (`uad_jax/data/demo/models/`, see `uad_jax.data.demo.bundled`), starts from that one unless
   `--retrain`; calibrates the thresholds on the validation cohorts and evaluates every test
   cohort;
4. writes the results report (`<out>/report`, ranking every method against the intensity and
   z-score baselines), prints where it is and how long each method took.

By default every registered method runs (the bundled checkpoints make that fit in the
quickstart's half hour on 2 CPU cores); `--methods` picks a subset, `--retrain` trains every
method from its preset (1.4-7.5 minutes per method, ANDi about 10; about an hour in all).

Every step is resumable: re-running skips what is complete (the cohort, the database, finished
training, an existing calibration) and redoes the rest.
"""

import logging as std_logging
import shutil
import time
from pathlib import Path

from absl import flags, logging

from configs import common
from uad_jax import cli, methods
from uad_jax.data.demo import bundled
from uad_jax.data.demo import cohort as demo_cohort
from uad_jax.data.demo.prepare import ensure_database
from uad_jax.engine import checkpoints, evaluate, run_dir, trainer
from uad_jax.engine.config import REPO_ROOT, load_config
from uad_jax.errors import ConfigError
from uad_jax.evaluation.calibration import ARTIFACT_NAME
from uad_jax.report import write_report
from uad_jax.report.training import BUNDLE_FILE

_OUT = flags.DEFINE_string("out", common.DEMO_ROOT, "output folder of the whole demo")
_METHODS = flags.DEFINE_list("methods", ["all"],
                             "methods to run (their configs' demo preset), or 'all'")
_MODALITY = flags.DEFINE_enum("modality", "T1w", ["T1w", "T2w"], "contrast to train on")
_RETRAIN = flags.DEFINE_bool("retrain", False, "train every method from its demo preset "
                             "instead of starting from the bundled demo checkpoints")


def run_method(method: str, root: Path, modality: str, retrain: bool) -> Path:
  """Train (or install the bundled checkpoint), calibrate and evaluate one method's demo
  preset; returns its workdir."""
  config = load_config(str(REPO_ROOT / "configs" / f"{method}.py") + ":demo")
  config.data.modality = modality
  common.use_demo_cohort(config, str(root))
  workdir = root / "runs" / f"{method}_{modality}"
  if retrain and (workdir / BUNDLE_FILE).is_file():   # a copy of the bundle: train afresh
    print(f"== {method}: --retrain: removing the installed bundled checkpoint in {workdir}")
    shutil.rmtree(workdir)
  bundle = None if retrain else bundled.install(method, modality, workdir)
  if bundle:
    print(f"\n== {method}: the bundled demo checkpoint (trained by `{bundle['command']}` on "
          f"{bundle['machine']}, {bundle['date']}) in {workdir}; --retrain trains it here")
  else:
    what = ("fitting" if methods.get_method(method).is_fitted
            else f"training ({config.training.n_iters} steps)")
    print(f"\n== {method}: {what} in {workdir}")
  trainer.train(config, workdir)
  store = checkpoints.CheckpointStore(run_dir.checkpoint_dir(workdir), read_only=True)
  step = evaluate.scored_step(config, None)
  step_dir = store.step_dir(store.steps()[-1] if step is None else step)
  store.close()
  if not (step_dir / ARTIFACT_NAME).is_file():
    print(f"== {method}: calibrating thresholds on the validation cohorts")
    evaluate.calibrate(config, workdir)
  print(f"== {method}: evaluating the test cohorts")
  evaluate.evaluate(config, workdir)
  return workdir


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax and jax are chatty at INFO
  std_logging.getLogger("uad_jax").setLevel(std_logging.INFO)
  root = Path(_OUT.value).resolve()
  modality = _MODALITY.value
  names = list(methods.METHODS) if _METHODS.value == ["all"] else _METHODS.value
  unknown = sorted(set(names) - set(methods.METHODS))
  if unknown:
    raise ConfigError(f"--methods: unknown {unknown}; choose from {list(methods.METHODS)} or "
                      "'all'")
  print(f"== demo cohort in {root / 'cohort'}")
  splits = demo_cohort.generate(root / "cohort")
  print(f"== training slice database in {root / 'lmdb'}")
  ensure_database(splits[f"train_{modality}"], root / "lmdb" / f"train_{modality}")
  workdirs, minutes = [], {}
  for name in names:
    start = time.perf_counter()
    workdirs.append(run_method(name, root, modality, _RETRAIN.value))
    minutes[name] = (time.perf_counter() - start) / 60
  report = write_report(workdirs, root / "report")
  print(f"\n== report: {report.index}")
  print("== minutes per method (train or fit, calibrate, evaluate; resumed steps are skipped): "
        + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()))


if __name__ == "__main__":
  cli.run_absl(main, prog="uad_jax.demo", config_flag=None)
