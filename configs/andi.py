"""ANDi (Aggregated Normative Diffusion). Default: the paper's settings (methods/andi.md §2.1).

Presets: `configs/andi.py` (paper, 224², 50k steps of 128 slices, scoring steps 125→25),
`configs/andi.py:demo` (bundled demo cohort, small U-Net, minutes on a 2-core CPU),
`configs/andi.py:tiny` (16² toy network for tests and smoke runs; data paths must be given).
"""

import ml_collections

from configs import common


def get_config(preset=None):
  config = ml_collections.ConfigDict()
  config.method = "andi"
  config.seed = 42

  config.data = common.data_config(modality="T1w", image_size=224, batch_size=128)

  config.model = m = ml_collections.ConfigDict()
  m.nonlinearity = "swish"
  m.nf = 32
  m.ch_mult = (1, 1, 1, 2, 3, 4)
  m.num_res_blocks = (1, 1, 1, 2, 4, 2)
  m.attn_resolutions = (14, 7)
  m.attn_emb_dim = 32
  m.rescale = True
  m.embedding_type = "positional"
  m.dropout = 0.1
  m.dropout_at = 14
  m.pyramid = True          # training noise; scoring always uses white noise (eval pyramid=False)
  m.discount = 0.9
  m.vpred = True
  m.ema_rate = 0.9999
  m.num_channels = 1
  m.conv_weight_grad = "auto"  # 3x3 weight gradients in row blocks on one CPU device (faster)

  config.diffusion = d = ml_collections.ConfigDict()
  d.num_latents = 1000
  d.schedule = "cosine"
  d.logsnr_min = -15.0
  d.logsnr_max = 15.0
  d.shift = True
  d.noise_d = 56

  config.optim = o = ml_collections.ConfigDict()
  o.lr = 1e-4
  o.beta1 = 0.9
  o.beta2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01

  config.training = common.training_config(n_iters=50_000, snapshot_freq=2_500, log_freq=50)

  config.sampling = s = ml_collections.ConfigDict()
  s.aggregation = "gmean"   # 'gmean' | 'prob'
  s.start = 125
  s.stop = 25
  s.stride = 1              # beyond the reference: use every k-th step of start..stop
  s.sampler = "ancestral"   # previews: 'ancestral' | 'ddim'
  s.preview_steps = 1000

  config.eval = common.eval_config(thr_start=0.00001, thr_end=0.00005, thr_step=0.000001)
  config.eval.step = 15_000   # the reference scores checkpoint_6 = step 15,000 (andi.md §2.9)

  if preset == "demo":
    # About 4 min of training and 4 min of calibration + evaluation on a 2-core CPU (measured:
    # 31 training slices/s, 112 network evaluations/s at 96²). ch_mult (1, 1, 2, 2) is 1.5x
    # faster than (1, 2, 2, 2); 400 of its steps gave stroke/tumour Dice 0.195/0.106 where 600
    # steps of (1, 2, 2, 2) gave 0.199/0.095 (MS lower: 0.005 vs 0.026). Stride 10 scores 10
    # of the 100 steps 125 -> 25. The bundled demo checkpoint (uad_jax/data/demo/models/andi_T1w,
    # what `python -m uad_jax.demo` scores) is this preset trained 1,200 steps at lr 2e-4 (17 min
    # on 2 cores): tumour Dice 0.21 / AUROC 0.91 raw, 0.41 / 0.97 median-filtered; stroke 0.14.
    config.data.image_size = 96
    config.data.batch_size = 16
    m.nf = 16
    m.ch_mult = (1, 1, 2, 2)
    m.num_res_blocks = (1, 1, 1, 1)
    m.attn_resolutions = (12,)
    m.attn_emb_dim = 16
    m.dropout_at = 12
    config.training.n_iters = 400
    config.training.snapshot_freq = 200
    config.training.log_freq = 20
    config.training.preview_images = 2
    s.preview_steps = 25
    s.stride = 10
    config.eval.split_size = 40
    config.eval.step = -1
    common.use_demo_cohort(config)
  elif preset == "tiny":   # seconds on a CPU: tests and smoke runs (set the data paths)
    config.data.image_size = 16
    config.data.batch_size = 4
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
    s.preview_steps = 2
    s.start = 125
    s.stop = 121
    s.stride = 2
    config.eval.split_size = 4
    config.eval.step = -1
  elif preset not in (None, "", "paper"):
    raise ValueError(f"unknown preset {preset!r} for configs/andi.py; use 'demo', 'tiny' or "
                     "'paper'")
  return config
