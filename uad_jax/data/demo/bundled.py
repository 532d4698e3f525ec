"""Bundled demo checkpoints: small models trained by the project's own command, shipped in
`uad_jax/data/demo/models/<method>_<modality>/`, which `python -m uad_jax.demo` evaluates
instead of training (unless `--retrain`).

A bundle is a trimmed training workdir: `config.json`, `artifacts.json` (if the method prepares
any), the newest checkpoint of every stage (with its digest, without calibrations), the
TensorBoard training events (the training curve) and `BUNDLE.json` (the command that trained it,
the machine, the date, the uad_jax commit). Made from a finished run with

  python -m uad_jax.data.demo.bundled --workdir demo/runs/andi_T1w \
      --command "python -m uad_jax.train --config configs/andi.py:demo --workdir W"
"""

import argparse
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from uad_jax.engine import checkpoints, run_dir
from uad_jax.errors import ConfigError
from uad_jax.report.training import BUNDLE_FILE
from uad_jax.utils import cpu
from uad_jax.utils.atomic import atomic_path

MODELS_DIR = Path(__file__).resolve().parent / "models"


def bundle_dir(method: str, modality: str) -> Path | None:
  """The bundled checkpoint of `method` on `modality`, or None."""
  path = MODELS_DIR / f"{method}_{modality}"
  return path if (path / BUNDLE_FILE).is_file() else None


def install(method: str, modality: str, workdir: Path) -> dict | None:
  """Copies the bundled checkpoint into `workdir` (which must hold no checkpoint yet); returns
  its BUNDLE.json, or None when there is no bundle or the workdir already has a run."""
  src = bundle_dir(method, modality)
  workdir = Path(workdir)
  if src is None or (workdir / "config.json").exists():
    return None
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with atomic_path(workdir) as tmp:
    shutil.copytree(src, tmp)
  return json.loads((workdir / BUNDLE_FILE).read_text())


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True, cwd=Path(__file__).parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def make_bundle(workdir: Path, command: str, out: Path | None = None) -> Path:
  """Writes the bundle of the finished run `workdir` (default: into MODELS_DIR)."""
  workdir = Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  name = f"{config['method']}_{config['data']['modality']}"
  out = Path(out) if out else MODELS_DIR / name
  stores = [workdir / "checkpoints"] + sorted(workdir.glob("stages/*/checkpoints"))
  with atomic_path(out) as tmp:
    tmp.mkdir(parents=True)
    shutil.copy2(workdir / "config.json", tmp / "config.json")
    if (workdir / run_dir.ARTIFACTS).is_file():
      shutil.copy2(workdir / run_dir.ARTIFACTS, tmp / run_dir.ARTIFACTS)
    for store_dir in stores:
      if not store_dir.is_dir():
        continue
      store = checkpoints.CheckpointStore(store_dir, read_only=True)
      steps = store.steps()
      store.close()
      if not steps:
        raise ConfigError(f"{store_dir}: no checkpoint to bundle")
      dst = tmp / store_dir.relative_to(workdir) / str(steps[-1])
      shutil.copytree(store_dir / str(steps[-1]), dst,
                      ignore=shutil.ignore_patterns("calibration.json",
                                                    "method_calibration.json"))
    for events in workdir.glob("tensorboard/train*"):
      shutil.copytree(events, tmp / events.relative_to(workdir))
    info = {"method": config["method"], "modality": config["data"]["modality"],
            "command": command, "machine": f"{cpu.model_name()} ({cpu.vector_isa()}), {_cores()} cores",
            "date": time.strftime("%Y-%m-%d"), "uad_jax_commit": _commit()}
    (tmp / BUNDLE_FILE).write_text(json.dumps(info, indent=2) + "\n")
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m uad_jax.data.demo.bundled",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="a finished training workdir")
  parser.add_argument("--command", required=True, help="the command that trained it")
  parser.add_argument("--out", default=None, help=f"bundle folder (default {MODELS_DIR}/NAME)")
  args = parser.parse_args(argv)
  print(make_bundle(Path(args.workdir), args.command, args.out))


if __name__ == "__main__":
  main()
