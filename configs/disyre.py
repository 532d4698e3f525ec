"""DISYRE. Default: the paper's settings (methods/disyre.md §2.1, `Disyre_config`/`Disyre_eval`).

Presets: `configs/disyre.py` (paper: 128² training patches = network input, 100k steps of 64
slices, scoring of 224² slices with 16 windows × 4 conditionings), `configs/disyre.py:demo`
(bundled 2 mm demo cohort, sizes scaled, small U-Net, minutes on a 2-core CPU),
`configs/disyre.py:tiny` (toy network for tests and smoke runs; data paths must be given).
"""

import ml_collections

from configs import common

# The reference's T1 codebook (`Disyre_config`; k-means of its training set). Setting
# data.codebook to it skips the k-means of `Method.prepare`.
REFERENCE_T1_CODEBOOK = (0.6079509, 0.07953554, 0.4649098, 0.78062236, 0.31114596)


def get_config(preset=None):
  config = ml_collections.ConfigDict()
  config.method = "disyre"
  config.seed = 42

  # data.image_size is the evaluation crop (the reference's data.load_size, 224); the network
  # input is data.patch_size (the reference's data.image_size, 128): training patches and
  # scoring windows.
  config.data = data = common.data_config(modality="T1w", image_size=224, batch_size=64)
  data.patch_size = 128
  data.anom_patch_size = 64        # 'dag' anomaly window; shape sizes scale with it / 64
  data.p_anomaly = 1.0             # probability of each of the texture and the bias step
  data.no_anom_in_background = True
  data.shape_dataset = ""          # CSV (column Path) of 3-D NIfTI masks; "" = squares/spheres
  data.codebook = ()               # () = k-means of the training data (Method.prepare)
  data.codebook_voxels = 10_000_000   # voxel budget of that k-means (slices subsampled)

  config.augment = a = ml_collections.ConfigDict()
  a.p_elastic = 0.1
  a.p_rotation = 0.1
  a.p_scale = 0.1
  a.p_brightness = 0.15
  a.p_gamma = 0.15
  a.p_inverted_gamma = 0.15
  a.p_noise = 0.15
  a.p_blur = 0.15

  config.model = m = ml_collections.ConfigDict()
  m.nonlinearity = "swish"
  m.nf = 64
  m.ch_mult = (1, 2, 2, 4, 4)
  m.num_res_blocks = (1, 1, 2, 4, 2)
  m.attn_resolutions = (16, 8)
  m.attn_emb_dim = 64
  m.rescale = True
  m.embedding_type = "positional"   # of the raw integer severity label (as a float)
  m.dropout = 0.1
  m.dropout_at = 8
  m.ema_rate = 0.9999
  m.num_channels = 1
  m.conv_weight_grad = "auto"

  config.diffusion = d = ml_collections.ConfigDict()   # severity -> label lookup (§2.5)
  d.num_latents = 100
  d.beta_min = 0.1
  d.beta_max = 20.0

  config.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"
  o.lr = 1e-4
  o.beta1 = 0.9
  o.beta2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01
  o.schedule = "constant"
  o.grad_clip_norm = 0.0

  config.training = common.training_config(n_iters=100_000, snapshot_freq=5_000, log_freq=50)

  config.sampling = s = ml_collections.ConfigDict()
  s.n_steps = 4            # conditionings arange(N, 0, -N // n_steps) - 1 = 99, 74, 49, 24
  s.window_step = 0.25     # window step as a fraction of the window (75 % overlap)

  config.eval = common.eval_config(thr_start=0.001, thr_end=0.1, thr_step=0.001)
  config.eval.step = 100_000       # the reference scores checkpoint_20
  config.eval.sw_batch_size = 310  # windows per network call when scoring (155 slices: 2 each)
  # Memory: at 224² a call of 64 windows peaked at 23 GB on a CPU (OOM on 24 GB); 16 windows per
  # call need 5.3 GB: on a CPU use --config.eval.sw_batch_size=16 (the maps do not change).

  if preset == "demo":
    # The 2 mm demo grid halves the paper's pixel sizes: 120² slices, eval crop 96 (≈ 224 at
    # 1 mm without the empty border), 64² patches/windows (128 / 2), 32² anomaly patches (64 / 2,
    # shape sizes scale with it). Scoring: window step 0.5 (4 windows of a 96² slice instead of
    # 9 at 0.25) and 2 conditionings (n_steps 2: t = 99, 49) — documented deviations from the
    # paper's 16 × 4 window forwards per slice, for the 10-minute budget on 2 cores.
    data.image_size = 96
    data.patch_size = 64
    data.anom_patch_size = 32
    data.batch_size = 16
    data.codebook_voxels = 500_000
    m.nf = 16
    m.ch_mult = (1, 2, 2, 2)
    m.num_res_blocks = (1, 1, 1, 1)
    m.attn_resolutions = (8,)
    m.attn_emb_dim = 16
    m.dropout_at = 8
    o.lr = 3e-4
    config.training.n_iters = 600
    config.training.snapshot_freq = 300
    config.training.log_freq = 20
    config.training.preview_images = 3
    s.n_steps = 2
    s.window_step = 0.5
    config.eval.step = 600
    config.eval.split_size = 40
    config.eval.sw_batch_size = 64
    common.use_demo_cohort(config)
  elif preset == "tiny":   # seconds on a CPU: tests and smoke runs (set the data paths)
    data.image_size = 24
    data.patch_size = 16
    data.anom_patch_size = 8
    data.batch_size = 4
    data.codebook_voxels = 20_000
    m.nf = 8
    m.ch_mult = (1, 2)
    m.num_res_blocks = (1, 1)
    m.attn_resolutions = (8,)
    m.attn_emb_dim = 8
    m.dropout_at = 8
    config.training.n_iters = 4
    config.training.snapshot_freq = 2
    config.training.log_freq = 1
    config.training.preview_images = 1
    config.eval.step = 4
    config.eval.split_size = 4
    config.eval.sw_batch_size = 16
  elif preset not in (None, "", "paper"):
    raise ValueError(f"unknown preset {preset!r} for configs/disyre.py; use 'demo', 'tiny' or "
                     "'paper'")
  return config
