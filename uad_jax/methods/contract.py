"""The method contract: what a method module hands the engine (`METHOD = Method(...)`).

A method is pure functions; the engine (data, sharding, loop, checkpoints, logging, calibration,
evaluation) calls them and owns everything else. Shapes are NHWC, images float32.

Gradient-trained methods list one or more `Stage`s, trained in order by `uad_jax.train` (IterMask
trains a first model, then a masked AE; every other method has one stage). Each stage has its own
train state, data feed and checkpoints; scoring gets the states of all stages. Fitted methods
(PatchCore) give `fit` instead of stages.

Host-side randomness (masks, augmentation, synthetic anomalies) enters through
`Stage.batch_transform`, called by the grain pipeline with a `numpy.random.Generator` seeded by
(seed, stage, global batch index, process): a resumed run sees exactly the same batches.
Device-side randomness enters as the `rng` key of `train_step` and `score`.
"""

import dataclasses
from typing import Any, Callable, Optional

import numpy as np

ScoreFn = Callable[..., Any]   # (config, params, images (B,H,W,1), valid (B,), rng) -> (B,H,W)


@dataclasses.dataclass(frozen=True)
class TrainContext:
  """What a stage's `init` may need to know about the run.

  steps_per_epoch: global batches per pass over the training slices, ceil(N / global batch)
    (epoch-based learning-rate schedules, e.g. torch's StepLR stepped once per epoch).
  artifacts: the method's prepared artefacts (`Method.prepare`), e.g. DISYRE's codebook.
  """
  steps_per_epoch: int = 1
  artifacts: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage of a gradient-trained method.

  name: names the stage's checkpoint folder when the method has several stages.
  init(config, rng, ctx: TrainContext) -> engine.train_state.TrainState (optimiser included).
  train_step(config, state, batch, rng) -> (state, {name: scalar}): pure, jitted over the mesh;
    `batch` is the dict the feed produces (after `batch_transform`), sharded on its leading axis.
  batch_transform(config, artifacts) -> f(batch: dict of numpy arrays, rng: np.random.Generator)
    -> dict of numpy arrays (leading axis = local batch): host-side per-batch transform run in the
    data pipeline (None: the cropped slices as they are, {"image": (B, S, S, 1)}).
  train_crop(config) -> int | None: centre crop/pad of the stored slices before the transform
    (None keeps the stored size; default: data.image_size).
  value_range(config) -> (lo, hi): the feed maps [0, 1] slices to [lo, hi] (default (0, 1)).
  preview(config, state, batch, rng) -> {tag: (N, H, W) float32 in [0, 1]}: images written to
    TensorBoard at every snapshot (e.g. inputs beside reconstructions), or None.
  n_iters(config) -> int: optimiser steps of the stage (default training.n_iters).
  """
  name: str
  init: Callable[..., Any]
  train_step: Callable[..., Any]
  batch_transform: Optional[Callable[..., Callable[[dict, np.random.Generator], dict]]] = None
  train_crop: Callable[[Any], Optional[int]] = lambda config: config.data.image_size
  value_range: Callable[[Any], tuple[float, float]] = lambda config: (0.0, 1.0)
  preview: Optional[Callable[..., dict]] = None
  n_iters: Callable[[Any], int] = lambda config: config.training.n_iters


@dataclasses.dataclass(frozen=True)
class Method:
  """A registered method.

  name: `config.method`.
  score(config, params, images, valid, rng) -> maps: images (B, H, W, 1) float32 in [0, 1]
    (centre-cropped slices, data.image_size), valid (B,) bool (False: padding the engine added to
    fill the compiled batch), maps (B, H, W) float32, 0 on background. Pure, jitted over the mesh.
  scoring_params(config, states: {stage name: state}, artifacts: dict) -> params pytree given to
    `score` (e.g. the EMA weights; several networks for IterMask; artefacts such as a threshold).
  stages: training stages (gradient-trained methods), in training order.
  fit(config, lmdb_path, mesh, rng, writer, workdir) -> (state pytree, meta dict): fitted methods
    (no gradient steps); stored as checkpoint step 0.
  scoring_mode: 'slice' (slices scored independently: only slices with brain are sent, padded to
    a fixed batch) or 'chunk' (every slice of the volume, in order, in chunks of
    eval.split_size slices; the chunk is the unit the method computes over, e.g. RIAD's
    per-chunk minimum; padding is marked by `valid`).
  place_params(params, mesh) -> params on the mesh (default: replicated).
  prepare(config, lmdb_path) -> dict: artefacts computed from the training data before training
    (JSON-able; stored as WORKDIR/artifacts.json, e.g. DISYRE's k-means intensity codebook).
  calibrate(config, params, mesh, rng) -> dict: method-level calibration after training, run by
    `uad_jax.eval --calibrate` before the thresholds (JSON-able; stored beside the checkpoint as
    method_calibration.json and merged into `artifacts`, e.g. IterMask's validation_thr).
  network_evaluations(config) -> float: network evaluations per scored slice (benchmarks).
  warnings(config) -> list[str]: warnings stored with every checkpoint and copied into every
    output (e.g. a randomly initialised backbone).
  """
  name: str
  score: ScoreFn
  scoring_params: Callable[..., Any]
  stages: tuple[Stage, ...] = ()
  fit: Optional[Callable[..., Any]] = None
  scoring_mode: str = "slice"
  place_params: Optional[Callable[..., Any]] = None
  prepare: Optional[Callable[..., dict]] = None
  calibrate: Optional[Callable[..., dict]] = None
  network_evaluations: Callable[[Any], float] = lambda config: 1.0
  warnings: Callable[[Any], list] = lambda config: []

  def __post_init__(self):
    if (self.fit is None) == (not self.stages):
      raise ValueError(f"method {self.name}: give either training stages or fit, not both")
    if self.scoring_mode not in ("slice", "chunk"):
      raise ValueError(f"method {self.name}: scoring_mode {self.scoring_mode!r}")

  @property
  def is_fitted(self) -> bool:
    return self.fit is not None

  @property
  def final_stage(self) -> Stage:
    return self.stages[-1]
