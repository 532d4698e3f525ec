"""The training loop shared by every gradient-trained method.

Plain and visible: build the data iterator and the train state, restore the newest checkpoint
of `workdir` if there is one, then `for step in range(...)`: next batch -> jitted `train_step`
over the device mesh -> scalars, checkpoints and previews at their frequencies.
"""

import functools
import json
import logging
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from uad_jax import methods
from uad_jax.data import pipeline
from uad_jax.engine import checkpoints, data_state, sharding, summary
from uad_jax.engine.config import required_path
from uad_jax.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)


FIT_STEP = 0   # the checkpoint step of a fitted method's state


def image_shape(config) -> tuple[int, int, int]:
  """(H, W, C) of one model input slice."""
  return (config.data.image_size, config.data.image_size, 1)


def checkpoint_dir(workdir) -> Path:
  return Path(workdir) / "checkpoints"


def write_run_config(workdir: Path, config) -> None:
  """Stores the config of the run (JSON); a resumed run with a different model is an error."""
  path = workdir / "config.json"
  text = json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
  if path.exists():
    old = json.loads(path.read_text())
    if old.get("method") != config.method or old.get("model") != json.loads(text).get("model"):
      raise ValueError(f"{workdir} holds a run of a different method/model ({path}); "
                       "use a new --workdir")
  if jax.process_index() == 0:
    atomic_write_text(path, text)


def train(config, workdir) -> None:
  """Trains `config.method` in `workdir`, resuming from its newest checkpoint."""
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  method = methods.get_method(config.method)
  mesh = sharding.make_mesh()
  if methods.kind(method) == "fit":
    fit(config, workdir, method, mesh)
    return
  block = sharding.must_block_every_step(config.training.block_every_step)
  write_run_config(workdir, config)

  train_iter = pipeline.make_train_iterator(
      required_path(config, "data.train_lmdb", kind="dir"),
      global_batch_size=config.data.batch_size, image_size=config.data.image_size,
      seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.worker_count)

  init_rng, train_rng, preview_rng = jax.random.split(jax.random.key(config.seed), 3)
  state = method.init_state(config, init_rng, image_shape(config))
  store = checkpoints.CheckpointStore(checkpoint_dir(workdir), config.training.max_to_keep)
  start_step = 0
  if store.steps():
    start_step, state, saved_data, _ = store.restore(state)
    train_iter.set_state(data_state.local(saved_data))
    log.info("resumed %s from step %d", workdir, start_step)
  state = sharding.replicate(state, mesh)

  train_step = jax.jit(
      functools.partial(method.train_step, config),
      in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh),
                    sharding.replicated(mesh)),
      out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)),
      donate_argnums=(0,))
  sample = getattr(method, "sample", None)
  if sample is not None:
    sample = jax.jit(functools.partial(sample, config),
                     static_argnames=("num_images",), out_shardings=sharding.replicated(mesh))

  writer = summary.SummaryWriter(workdir / "tensorboard" / "train")
  try:
    if start_step == 0:
      writer.config(config)
    _loop(config, state, start_step, train_iter, train_step, sample, store, writer, mesh, block,
          train_rng, preview_rng)
  finally:
    writer.close()
    store.close()
    train_iter.close()


def fit(config, workdir: Path, method, mesh) -> None:
  """A fitted method (no gradient steps): `method.fit` builds its scoring state from the
  training slices; stored as checkpoint step 0. A workdir that has it is left as it is."""
  write_run_config(workdir, config)
  store = checkpoints.CheckpointStore(checkpoint_dir(workdir), config.training.max_to_keep)
  writer = summary.SummaryWriter(workdir / "tensorboard" / "train")
  try:
    if store.steps():
      log.info("%s is already fitted (checkpoint %s)", workdir, store.step_dir(store.steps()[-1]))
      return
    writer.config(config)
    state, meta = method.fit(config, required_path(config, "data.train_lmdb", kind="dir"), mesh,
                             jax.random.key(config.seed), writer, workdir)
    store.save(FIT_STEP, state, {}, dict(meta, step=FIT_STEP, method=config.method))
  finally:
    writer.close()
    store.close()


def _loop(config, state, start_step, train_iter, train_step, sample, store, writer, mesh, block,
          train_rng, preview_rng):
  """Steps start_step+1 .. n_iters with logging, checkpoints and previews."""
  n_iters = config.training.n_iters
  bar = tqdm(total=n_iters, initial=start_step, desc=f"train {config.method}",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  window, window_start = [], time.perf_counter()
  for step in range(start_step + 1, n_iters + 1):
    batch = sharding.global_batch(next(train_iter), mesh)
    state, metrics = train_step(state, batch, jax.random.fold_in(train_rng, step))
    if block:
      jax.block_until_ready(metrics)
    window.append(metrics)
    bar.update(1)

    if step % config.training.log_freq == 0 or step == n_iters:
      window = jax.device_get(window)
      elapsed = time.perf_counter() - window_start
      scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      scalars.setdefault("lr", config.optim.lr)
      scalars["slices_per_s"] = len(window) * config.data.batch_size / elapsed
      scalars["step_time_s"] = elapsed / len(window)
      writer.scalars(step, scalars)
      bar.set_postfix(loss=f"{scalars['loss']:.4g}", slices_s=f"{scalars['slices_per_s']:.1f}")
      window, window_start = [], time.perf_counter()

    if step % config.training.snapshot_freq == 0 or step == n_iters:
      store.save(step, state, data_state.gather(train_iter.get_state()),
                 {"step": step, "method": config.method})
      if sample is not None and config.training.preview_images:
        images = sample(state.ema_params, jax.random.fold_in(preview_rng, step),
                        num_images=config.training.preview_images)
        writer.images(step, "samples", jax.device_get(images))
      writer.flush()
      if not window:
        window_start = time.perf_counter()   # keep checkpoint/preview time out of slices/s
  bar.close()
