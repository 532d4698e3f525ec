"""The training loop shared by every method.

Plain and visible: the method's artefacts are prepared once (`Method.prepare`), then each
training stage in order: build its data iterator and train state, restore its newest checkpoint
if there is one, then `for step in range(...)`: next batch -> jitted `train_step` over the
device mesh -> scalars, checkpoints and previews at their frequencies. Fitted methods
(`Method.fit`) build their state once instead.
"""

import functools
import logging
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from uad_jax import methods
from uad_jax.data import pipeline
from uad_jax.engine import checkpoints, data_state, run_dir, sharding, summary, workdir_lock
from uad_jax.engine.config import required_path
from uad_jax.errors import TrainingError
from uad_jax.methods.contract import Method, Stage, TrainContext

log = logging.getLogger(__name__)

FIT_STEP = 0   # the checkpoint step of a fitted method's state


def train(config, workdir) -> None:
  """Trains (or fits) `config.method` in `workdir`, resuming from its newest checkpoints.

  The workdir is locked for the run (`workdir_lock`); its `config.json` is written once the
  run got past validation (data, state initialisation, resume) and never replaced.
  """
  workdir = Path(workdir).resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(workdir):
    _train(config, workdir)


def _train(config, workdir: Path) -> None:
  method = methods.get_method(config.method)
  run_dir.check_run_config(workdir, config)
  mesh = sharding.make_mesh()
  lmdb_path = required_path(config, "data.train_lmdb", kind="dir")
  if method.is_fitted:
    fit(config, workdir, method, mesh, lmdb_path)
    return
  artifacts = prepare(config, method, workdir, lmdb_path)
  for index, stage in enumerate(method.stages):
    train_stage(config, method, stage, index, workdir, lmdb_path, artifacts, mesh)


def prepare(config, method: Method, workdir: Path, lmdb_path: Path) -> dict:
  """The method's artefacts from the training data (`WORKDIR/artifacts.json`; computed once)."""
  if method.prepare is None:
    return {}
  artifacts = run_dir.read_artifacts(workdir)
  if not artifacts:
    log.info("preparing %s artefacts from %s", method.name, lmdb_path)
    artifacts = method.prepare(config, lmdb_path)
    run_dir.write_artifacts(workdir, artifacts)
  return artifacts


def stage_rng(config, index: int) -> jax.Array:
  """The root key of training stage `index` (stage 0: the seed's key itself)."""
  key = jax.random.key(config.seed)
  return key if index == 0 else jax.random.fold_in(key, index)


def train_stage(config, method: Method, stage: Stage, index: int, workdir: Path, lmdb_path,
                artifacts: dict, mesh) -> None:
  """Steps 1 .. stage.n_iters of one stage (resumed from its newest checkpoint)."""
  n_iters = stage.n_iters(config)
  store = checkpoints.CheckpointStore(run_dir.checkpoint_dir(workdir, method, stage.name),
                                      config.training.max_to_keep)
  if store.steps() and store.steps()[-1] >= n_iters and store.intact(store.steps()[-1]):
    log.info("stage %s of %s is complete (%s)", stage.name, workdir, store.step_dir(n_iters))
    store.close()
    return
  block = sharding.must_block_every_step(config.training.block_every_step)
  transform = stage.batch_transform(config, artifacts) if stage.batch_transform else None
  train_iter = pipeline.make_train_iterator(
      lmdb_path, global_batch_size=config.data.batch_size, image_size=stage.train_crop(config),
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      worker_count=config.data.worker_count, value_range=stage.value_range(config),
      transform=transform, transform_stream=index)
  steps_per_epoch = math.ceil(train_iter.slices_per_epoch / config.data.batch_size)
  log.info("%s stage %s: %d slices, an epoch is %d steps of %d", method.name, stage.name,
           train_iter.slices_per_epoch, steps_per_epoch, config.data.batch_size)

  init_rng, train_rng, preview_rng = jax.random.split(stage_rng(config, index), 3)
  state = stage.init(config, init_rng, TrainContext(steps_per_epoch, artifacts))
  start_step = 0
  if store.steps():
    start_step, state, saved_data, _ = store.restore(state, method=config.method)
    train_iter.set_state(data_state.local(saved_data))
    log.info("resumed %s stage %s from step %d", workdir, stage.name, start_step)
  state = sharding.replicate(state, mesh)

  repl, batch_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  train_step = jax.jit(functools.partial(stage.train_step, config),
                       in_shardings=(repl, batch_sharded, repl), out_shardings=(repl, repl),
                       donate_argnums=(0,))
  preview = None
  if stage.preview is not None and config.training.preview_images:
    preview = jax.jit(functools.partial(stage.preview, config), out_shardings=repl)
  suffix = "" if len(method.stages) == 1 else f"_{stage.name}"
  writer = summary.SummaryWriter(workdir / "tensorboard" / f"train{suffix}")
  meta = {"method": config.method, "stage": stage.name, "warnings": method.warnings(config)}
  try:
    run_dir.write_run_config(workdir, config)   # validated: data, state and resume are fine
    if start_step == 0:
      writer.config(config)
    _loop(config, stage.name, n_iters, state, start_step, train_iter, train_step, preview,
          store, writer, mesh, block, train_rng, preview_rng, meta)
  finally:
    writer.close()
    store.close()
    train_iter.close()


def fit(config, workdir: Path, method: Method, mesh, lmdb_path: Path) -> None:
  """A fitted method (no gradient steps): `method.fit` builds its scoring state from the
  training slices; stored as checkpoint step 0. A workdir that has it is left as it is."""
  store = checkpoints.CheckpointStore(run_dir.checkpoint_dir(workdir),
                                      config.training.max_to_keep)
  writer = summary.SummaryWriter(workdir / "tensorboard" / "train")
  try:
    if store.steps():
      log.info("%s is already fitted (checkpoint %s)", workdir, store.step_dir(store.steps()[-1]))
      return
    writer.config(config)
    state, meta = method.fit(config, lmdb_path, mesh, jax.random.key(config.seed), writer,
                             workdir)
    run_dir.write_run_config(workdir, config)
    store.save(FIT_STEP, state, {}, dict(meta, step=FIT_STEP, method=config.method))
  finally:
    writer.close()
    store.close()


def _check_finite(stage: str, window: list, first_step: int, train_iter) -> None:
  """A TrainingError at the first step of `window` (host metrics of steps first_step, ...)
  with a non-finite value, naming the slices of its batch; nothing is saved after it."""
  for step, metrics in enumerate(window, start=first_step):
    bad = {k: float(v) for k, v in metrics.items() if not np.all(np.isfinite(v))}
    if bad:
      raise TrainingError(
          f"stage {stage}: non-finite training metrics {bad} at step {step} (batch of "
          f"{train_iter.describe_batch(step - 1)}); training stopped, the last checkpoint "
          f"before step {step} is kept")


def _params_finite(state) -> bool:
  leaves = [x for x in jax.tree.leaves(state.params) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(jax.device_get(functools.reduce(
      jnp.logical_and, [jnp.isfinite(x).all() for x in leaves], jnp.bool_(True))))


def _loop(config, stage_name, n_iters, state, start_step, train_iter, train_step, preview,
          store, writer, mesh, block, train_rng, preview_rng, meta):
  """Steps start_step+1 .. n_iters with logging, checkpoints and previews."""
  bar = tqdm(total=n_iters, initial=start_step, desc=f"train {config.method} {stage_name}",
             disable=jax.process_index() != 0, dynamic_ncols=True)
  window, window_start, window_first = [], time.perf_counter(), start_step + 1
  for step in range(start_step + 1, n_iters + 1):
    batch = sharding.global_batch(next(train_iter), mesh)
    state, metrics = train_step(state, batch, jax.random.fold_in(train_rng, step))
    if block:
      jax.block_until_ready(metrics)
    window.append(metrics)
    bar.update(1)

    snapshot = step % config.training.snapshot_freq == 0 or step == n_iters
    log_now = step % config.training.log_freq == 0 or step == n_iters
    if snapshot or log_now:   # never log or save past a non-finite step
      window = jax.device_get(window)
      _check_finite(stage_name, window, window_first, train_iter)
    if log_now:
      elapsed = time.perf_counter() - window_start
      scalars = {k: float(np.mean([m[k] for m in window])) for k in window[0]}
      scalars["lr"] = float(state.learning_rate(step))   # the rate this step applied
      scalars["slices_per_s"] = len(window) * config.data.batch_size / elapsed
      scalars["step_time_s"] = elapsed / len(window)
      writer.scalars(step, scalars)
      bar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4g}",
                      slices_s=f"{scalars['slices_per_s']:.1f}")
      window, window_start, window_first = [], time.perf_counter(), step + 1

    if snapshot:
      if not _params_finite(state):
        raise TrainingError(f"stage {stage_name}: parameters became non-finite at step {step} "
                            f"(batch of {train_iter.describe_batch(step - 1)}); training "
                            f"stopped, the last checkpoint before step {step} is kept")
      store.save(step, state, data_state.gather(train_iter.get_state()), dict(meta, step=step))
      if preview is not None:
        images = preview(state, batch, jax.random.fold_in(preview_rng, step))
        for tag, value in jax.device_get(images).items():
          writer.images(step, tag, value)
      writer.flush()
      if not window:
        window_start = time.perf_counter()   # keep checkpoint/preview time out of slices/s
  bar.close()
