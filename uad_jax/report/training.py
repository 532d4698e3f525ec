"""How each run's model was trained, for the report's "Models" table.

Read from the training workdir: `config.json` (batch, slice size), the TensorBoard training
scalars of every stage (`tensorboard/train*`: steps, wall time as the sum of `step_time_s` over
the logged windows, the last loss) and, for a bundled demo checkpoint, `BUNDLE.json`
(`uad_jax.data.demo.bundled`: the command that trained it, where and when).
"""

import json
import logging
from pathlib import Path

from tensorboard.backend.event_processing import event_accumulator

from uad_jax import methods

log = logging.getLogger(__name__)

BUNDLE_FILE = "BUNDLE.json"   # in a workdir installed from a bundled demo checkpoint


def stage_curves(workdir: Path) -> dict[str, dict]:
  """Per training event folder (`train`, `train_<stage>`): {'steps': last logged step,
  'seconds': training wall time, 'loss': [(step, value), ...]} ({} without events)."""
  out = {}
  for folder in sorted(Path(workdir).glob("tensorboard/train*")):
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    if "step_time_s" not in tags:
      continue
    times = acc.Scalars("step_time_s")
    seconds, previous = 0.0, 0
    for e in times:   # each value is the mean step time of the window ending at e.step
      seconds += e.value * (e.step - previous)
      previous = e.step
    loss = [(e.step, e.value) for e in acc.Scalars("loss")] if "loss" in tags else []
    out[folder.name] = {"steps": times[-1].step, "seconds": seconds, "loss": loss}
  return out


def describe(workdir: Path) -> dict:
  """One row of the Models table: method, training (steps x batch at size, per stage),
  minutes, last loss, origin (bundled demo checkpoint or trained in this workdir)."""
  workdir = Path(workdir)
  config = json.loads((workdir / "config.json").read_text())
  method = config["method"]
  size, batch = config["data"]["image_size"], config["data"]["batch_size"]
  registered = methods.get_method(method)
  stages = registered.stages or ()
  names = ["train"] if len(stages) <= 1 else [f"train_{s.name}" for s in stages]
  found = stage_curves(workdir)
  curves = {n: found[n] for n in names if n in found}
  if registered.is_fitted:
    training, minutes, loss = "fitted (one pass over the training slices)", "–", "–"
  elif curves:
    parts = [f"{c['steps']} steps" + ("" if name == "train" else f" ({name[6:]})")
             for name, c in curves.items()]
    training = f"{' + '.join(parts)} of {batch} slices at {size}²"
    minutes = f"{sum(c['seconds'] for c in curves.values()) / 60:.1f}"
    last = list(curves.values())[-1]["loss"]
    loss = f"{last[-1][1]:.4g}" if last else "–"
  else:
    training, minutes, loss = "unknown (no training events)", "–", "–"
  bundle = workdir / BUNDLE_FILE
  if bundle.is_file():
    b = json.loads(bundle.read_text())
    origin = (f"bundled demo checkpoint, trained by `{b['command']}` on {b['machine']} "
              f"({b['date']})")
  else:
    origin = "trained in this workdir"
  return {"method": method, "modality": config["data"]["modality"], "training": training,
          "training minutes": minutes, "last loss": loss, "origin": origin}
