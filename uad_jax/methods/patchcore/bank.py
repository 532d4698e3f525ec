"""PatchCore memory-bank building ("training"): stream descriptors, select the coreset, resume.

One pass over the training slices in the seeded random order of the training pipeline
(`make_train_iterator`, epoch 0), optionally only its first `model.max_train_slices` positions
(a seeded random subset, spec §7.5). Batches of `data.batch_size` slices run through the frozen
backbone data-parallel over the mesh; `model.coreset_block_slices` slices of descriptors form one
block of the streaming greedy coreset (`coreset.py`), which then discards them. So memory is
bounded by one block and the selection, whatever the size of the training set.

Every random draw derives from the run's key and is stored with the bank: the backbone init (demo),
the projection W and the start rows. A long build saves its streaming state to
`<workdir>/fit_state/` (orbax, atomic) every `training.fit_state_minutes`, resumes from it, and
deletes it once the bank is complete.
Bank building is single-process (spec §7.6); devices of that process share the backbone work.
"""

import functools
import logging
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from uad_jax.data import pipeline
from uad_jax.data.lmdb_source import SliceDataSource
from uad_jax.engine import sharding
from uad_jax.errors import ConfigError
from uad_jax.methods.patchcore import coreset, features
from uad_jax.networks import feature_extractor

log = logging.getLogger(__name__)

FIT_STATE_DIR = "fit_state"


def plan(config, num_database_slices: int) -> dict:
  """Sizes of the build: slices used, descriptors, K, blocks and their budgets (JSON-able)."""
  m = config.model
  n = num_database_slices
  if m.max_train_slices < 0 or m.max_bank_size < 0:
    raise ConfigError("model.max_train_slices and model.max_bank_size must be >= 0 (0: no limit)")
  used = min(n, m.max_train_slices) if m.max_train_slices else n
  h, w = features.descriptor_grid(config)
  batch = config.data.batch_size
  block_batches = max(1, m.coreset_block_slices // batch)
  block_slices = block_batches * batch
  block_valid = [min(block_slices, used - s) for s in range(0, used, block_slices)]
  num_rows = used * h * w
  k = coreset.coreset_size(num_rows, m.sample_size, m.max_bank_size)
  if k < 1:
    raise ConfigError(f"model.sample_size={m.sample_size} of {num_rows} descriptors selects no "
                      "bank row; use more training slices or a larger fraction")
  return {"database_slices": n, "train_slices": used, "grid": [h, w],
          "descriptors_per_slice": h * w, "num_descriptors": num_rows, "coreset_size": k,
          "batch_size": batch, "block_batches": block_batches, "block_slices": block_slices,
          "block_valid_slices": block_valid,
          "block_budgets": coreset.block_budgets([v * h * w for v in block_valid],
                                                 m.sample_size, k)}


class _FitState:
  """The streaming state under `<workdir>/fit_state/` (newest only; orbax renames atomically)."""

  def __init__(self, workdir):
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(Path(workdir).resolve() / FIT_STATE_DIR,
                                          options=options, item_names=("state", "meta"))

  def save(self, blocks_done: int, state: dict, meta: dict) -> None:
    self._manager.save(blocks_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def restore(self, target: dict, fingerprint: dict):
    """(blocks_done, state, meta) of the newest saved state, or None. A state saved for another
    plan or seed is refused."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    meta = restored["meta"]
    if meta["fingerprint"] != fingerprint:
      raise ConfigError(f"{self._manager.directory} holds a bank build of another plan "
                        f"({meta['fingerprint']}, this run {fingerprint}); use a new --workdir")
    return step, restored["state"], meta

  def close(self):
    self._manager.close()


def build(config, lmdb_path, mesh, rng: jax.Array, writer, workdir):
  """Builds the memory bank; returns (state, meta) for the engine's checkpoint (see `fit`)."""
  if jax.process_count() > 1:
    raise ConfigError("PatchCore bank building is single-process (every process would build its "
                      "own bank, spec §7.6); run uad_jax.train without --num_processes")
  m = config.model
  if config.data.batch_size % mesh.size:
    raise ConfigError(f"data.batch_size={config.data.batch_size} must be a multiple of the "
                      f"{mesh.size} devices")
  t_start = time.perf_counter()
  backbone_key, projection_key, start_key = jax.random.split(rng, 3)
  _, variables, info = feature_extractor.load_frozen_backbone(config.model, backbone_key)
  warnings = [info["warning"]] if info["warning"] else []
  for text in warnings:
    log.warning("\n%s\n%s\n%s", "!" * 80, text, "!" * 80)
    writer.text(0, "warnings", text)

  p = plan(config, len(SliceDataSource(lmdb_path)))
  h, w = p["grid"]
  dim = m.target_embed_dim
  projection = coreset.random_projection(projection_key, dim, m.projection_dim)
  first_rows = p["block_valid_slices"][0] * h * w
  start = jax.random.choice(start_key, first_rows, (min(m.num_starting_points, first_rows),),
                            replace=False).astype(jnp.int32)
  selection = coreset.empty_selection(p["coreset_size"], projection.shape[0], dim)
  fingerprint = {"seed": config.seed, "lmdb": str(Path(lmdb_path).resolve()),
                 "plan": dict(p)}
  log.info("PatchCore bank: %d of %d training slices, %d descriptors of %d-d, K=%d, %d blocks "
           "of %d slices", p["train_slices"], p["database_slices"], p["num_descriptors"], dim,
           p["coreset_size"], len(p["block_budgets"]), p["block_slices"])

  fit_state = _FitState(workdir)
  train_iter = pipeline.make_train_iterator(
      lmdb_path, global_batch_size=config.data.batch_size, image_size=config.data.image_size,
      seed=config.seed, worker_count=config.data.worker_count)
  repl = sharding.replicated(mesh)
  extract = jax.jit(functools.partial(features.descriptors, config),
                    in_shardings=(repl, sharding.batch_sharded(mesh)), out_shardings=repl)
  select = jax.jit(coreset.select_from_block, donate_argnums=(0,))
  variables = sharding.replicate(variables, mesh)

  blocks_done, radii, timings = 0, [], {"descriptors_s": 0.0, "coreset_s": 0.0}
  resumed = fit_state.restore(
      {"selection": selection, "projection": projection, "start_indices": start}, fingerprint)
  if resumed is not None:
    blocks_done, saved, saved_meta = resumed
    selection, projection, start = saved["selection"], saved["projection"], saved["start_indices"]
    radii, timings = saved_meta["block_radii"], saved_meta["timings"]
    train_iter.set_state(saved_meta["iterator_state"].encode())
    log.info("resuming the bank build after block %d of %d", blocks_done, len(p["block_budgets"]))

  bar = tqdm(total=p["train_slices"], initial=sum(p["block_valid_slices"][:blocks_done]),
             desc="patchcore bank", unit="slice", dynamic_ncols=True)
  last_save = time.perf_counter()
  try:
    for j in range(blocks_done, len(p["block_budgets"])):
      valid = p["block_valid_slices"][j]
      t0 = time.perf_counter()
      parts = []
      for _ in range(-(-valid // p["batch_size"])):
        parts.append(extract(variables, sharding.global_batch(next(train_iter), mesh)["image"]))
      block = jnp.concatenate(parts).reshape(-1, dim)
      pad = p["block_slices"] * h * w - block.shape[0]
      block = jnp.pad(block, ((0, pad), (0, 0)))   # one shape for every block: one compilation
      jax.block_until_ready(block)
      t1 = time.perf_counter()
      selection, _, radius = select(selection, coreset.project(block, projection), block,
                                    valid * h * w, p["block_budgets"][j], start)
      radii.append(float(radius))
      t2 = time.perf_counter()
      timings["descriptors_s"] += t1 - t0   # read + backbone + aggregation
      timings["coreset_s"] += t2 - t1
      bar.update(valid)
      writer.scalars(j + 1, {"fit/descriptors_per_s": valid * h * w / (t2 - t0),
                             "fit/bank_rows": int(selection["count"]),
                             "fit/block_radius": radii[-1]})
      last = j + 1 == len(p["block_budgets"])
      if not last and time.perf_counter() - last_save > 60 * config.training.fit_state_minutes:
        fit_state.save(j + 1, {"selection": selection, "projection": projection,
                               "start_indices": start},
                       {"fingerprint": fingerprint, "block_radii": radii, "timings": timings,
                        "iterator_state": train_iter.get_state().decode()})
        last_save = time.perf_counter()
  finally:
    bar.close()
    train_iter.close()
    fit_state.close()
  # The engine stores the finished bank next; the streaming state (bank-sized) is no longer needed.
  shutil.rmtree(Path(workdir).resolve() / FIT_STATE_DIR, ignore_errors=True)

  k = p["coreset_size"]
  bank = selection["rows"][:k]
  timings["total_s"] = time.perf_counter() - t_start
  meta = {
      "seed": config.seed,
      "warnings": warnings,
      "backbone": info,
      "plan": p,
      "subsampling": (f"first {p['train_slices']} of {p['database_slices']} slices of the seeded "
                      f"random training order (seed {config.seed})"
                      if p["train_slices"] < p["database_slices"] else "none (all slices)"),
      "coreset": {"algorithm": "streaming greedy k-center (uad_jax.methods.patchcore.coreset)",
                  "sample_size": m.sample_size, "max_bank_size": m.max_bank_size,
                  "projection_dim": int(projection.shape[0]),
                  "start_indices": np.asarray(start).tolist(),
                  "coverage_radius_bound": max(radii), "block_radii": radii},
      "timings": timings,
      "descriptors_per_s": p["num_descriptors"] / max(timings["descriptors_s"]
                                                      + timings["coreset_s"], 1e-9),
  }
  log.info("PatchCore bank: K=%d rows in %.1f s (descriptors %.1f s, coreset %.1f s); coverage "
           "radius <= %.4g (projected)", k, timings["total_s"], timings["descriptors_s"],
           timings["coreset_s"], max(radii))
  state = {"backbone": variables, "bank": bank, "projection": projection,
           "start_indices": start}
  return state, meta
