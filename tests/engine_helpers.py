"""A tiny cohort, its slice database and the `tiny` ANDi config, for the engine tests."""

from pathlib import Path

from configs import common
from data_helpers import make_cohort, write_csv
from uad_jax.data.lmdb_writer import write_slice_database
from uad_jax.engine.config import REPO_ROOT, load_config

SHAPE = (20, 20, 4)


def tiny_cohort(root: Path) -> dict:
  """Split CSVs of a tiny T1w cohort (healthy train/val/test, lesion val/test) and its LMDB."""
  root = Path(root)
  csvs = {}
  for name, n, lesion in (("train", 4, False), ("val_healthy", 2, False),
                          ("val_lesion", 2, True), ("test_healthy", 2, False),
                          ("test_lesion", 2, True)):
    paths = make_cohort(root / name, n, shape=SHAPE, lesion=lesion)
    csvs[name] = write_csv(root / f"{name}.csv", paths)
  write_slice_database(csvs["train"], root / "lmdb", progress=False)
  csvs["lmdb"] = root / "lmdb"
  return csvs


def cohort_config(method: str, cohort: dict, preset: str = "tiny"):
  """configs/<method>.py:<preset> pointed at the tiny `cohort` (two test cohorts)."""
  config = load_config(str(REPO_ROOT / "configs" / f"{method}.py") + f":{preset}")
  config.data.train_lmdb = str(cohort["lmdb"])
  config.eval.val_healthy_csv = str(cohort["val_healthy"])
  config.eval.val_lesion_csv = str(cohort["val_lesion"])
  with config.unlocked():
    config.eval.cohorts["healthy"] = common.cohort(str(cohort["test_healthy"]), lesion=False)
    config.eval.cohorts["lesion"] = common.cohort(str(cohort["test_lesion"]), lesion=True)
  return config


def tiny_config(cohort: dict, **training):
  """configs/andi.py:tiny pointed at `cohort`; `training` overrides config.training."""
  config = cohort_config("andi", cohort)
  for k, v in training.items():
    config.training[k] = v
  return config
