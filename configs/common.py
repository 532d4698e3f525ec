"""Config blocks shared by every method (data, training loop, evaluation protocol).

Paths left empty in the paper presets must be set on the command line, e.g.
`--config.data.train_lmdb=/data/lmdb/train_T1w --config.eval.cohorts.brats.csv=/data/brats_T1w.csv`
(a cohort named only on the command line is added, in lesion mode unless
`--config.eval.cohorts.NAME.lesion=false`; see `uad_jax/cli.py`).
"""

import ml_collections

DEMO_ROOT = "demo"   # where `python -m uad_jax.demo` writes the cohort and its LMDBs
DEMO_COHORTS = (("test_healthy", False), ("test_tumour", True), ("test_ms", True),
                ("test_stroke", True))


def data_config(modality="T1w", image_size=224, batch_size=128):
  c = ml_collections.ConfigDict()
  c.modality = modality          # 'T1w' | 'T2w'; must match the `_T1w`/`_T2w` file names
  c.image_size = image_size      # centre crop / zero pad of every slice (data.md §6)
  c.batch_size = batch_size      # global batch (slices), split over processes and devices
  c.train_lmdb = ""              # LMDB directory built by `python -m uad_jax.data.create_lmdb`
  c.worker_count = 0             # grain worker processes (0 is fastest on 2 cores)
  c.clip_percentiles = ml_collections.FieldReference(None, field_type=tuple)  # e.g. (1, 99)
  return c


def training_config(n_iters, snapshot_freq, log_freq):
  c = ml_collections.ConfigDict()
  c.n_iters = n_iters
  c.snapshot_freq = snapshot_freq   # checkpoint (and preview) every this many steps, and at the end
  c.log_freq = log_freq             # scalars to TensorBoard every this many steps
  c.max_to_keep = 0                 # 0 keeps every checkpoint (the paper scores an early one)
  c.block_every_step = False        # wait for each step (always on for multi-device CPU runs)
  c.preview_images = 3              # samples/reconstructions written to TensorBoard at snapshots
  c.compute_dtype = "float32"       # 'float32' | 'bfloat16' (parameters stay float32)
  return c


def eval_config(thr_start, thr_end, thr_step, split_size=155):
  c = ml_collections.ConfigDict()
  c.step = -1                       # checkpoint step to score (-1: the newest; --step overrides)
  c.split_size = split_size         # slices per chunk of a scoring call (padded, sharded)
  c.thr_start = thr_start           # threshold sweep: numpy.arange(thr_start, thr_end, thr_step);
                                    # thr_step 0: derived from the healthy validation scores at
                                    # calibration (stored in calibration.json)
  c.thr_end = thr_end
  c.thr_step = thr_step
  c.fpr_targets = (0.01,)           # calibration targets on healthy validation brain voxels;
                                    # the FPR of the lesion-validation Dice-optimal threshold is added
  c.kernel_size = 4                 # 3-D median filter (postprocessing.kernel_size)
  c.val_healthy_csv = ""            # healthy validation volumes (calibration)
  c.val_lesion_csv = ""             # lesion validation volumes (Dice-optimal threshold)
  c.cohorts = ml_collections.ConfigDict()   # name -> {csv, lesion}; scored by `uad_jax.eval`
  c.save_examples = True            # per subject the slice of largest lesion (for the report)
  return c


def cohort(csv="", lesion=True):
  return ml_collections.ConfigDict({"csv": csv, "lesion": lesion})


def use_demo_cohort(config, root=DEMO_ROOT):
  """Points data and evaluation paths of `config` at the bundled demo cohort under `root`.

  The threshold sweep of a demo model is derived from its healthy-validation scores at
  calibration (thr_step 0): no hand-tuned range, on whatever score scale a short run reaches.
  """
  config.eval.thr_start, config.eval.thr_end, config.eval.thr_step = 0.0, 0.0, 0.0
  m = config.data.modality
  config.data.train_lmdb = f"{root}/lmdb/train_{m}"
  config.eval.val_healthy_csv = f"{root}/cohort/splits/val_healthy_{m}.csv"
  config.eval.val_lesion_csv = f"{root}/cohort/splits/val_lesion_{m}.csv"
  for name, lesion in DEMO_COHORTS:
    config.eval.cohorts[name] = cohort(f"{root}/cohort/splits/{name}_{m}.csv", lesion)
  return config
