"""Conv and BatchNorm with torchvision's semantics, shared by the frozen ImageNet backbones.

* Padding is explicit and symmetric, (k - 1) // 2 on each side as torchvision's
  `Conv2d(padding=k // 2)`: Flax's 'SAME' pads stride-2 layers asymmetrically ((0, 1) for a
  3x3 conv on an even input) and shifts every feature map by a pixel. TF-trained weights
  (EfficientNet-Lite) ask for exactly that 'SAME' instead (`tf_same`).
* BatchNorm always uses the running statistics (backbones are frozen feature extractors) with
  torchvision's epsilon: the project's torch-semantics BatchNorm (`uad_jax/ops/batchnorm.py`)
  fixed to eval mode.
* Kernels are initialised like torchvision (`kaiming_normal_(mode='fan_out')`, gain sqrt(2)),
  which only matters for the demo preset's random backbone.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from uad_jax.ops.batchnorm import BatchNorm

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), untruncated.
TORCHVISION_CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int, stride: int = 1, *, groups: int = 1, use_bias: bool = False,
         dtype=jnp.float32, precision=None, tf_same: bool = False,
         name: str | None = None) -> nn.Conv:
  """A k x k conv, stride s, symmetric zero padding (k - 1) // 2, no bias unless asked.

  tf_same: TensorFlow's 'SAME' padding instead (output ceil(n / s); the odd pixel of padding at
  the end), for networks trained in TensorFlow (EfficientNet-Lite).
  """
  p = (kernel - 1) // 2
  padding = "SAME" if tf_same else ((p, p), (p, p))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, precision=precision,
                 kernel_init=TORCHVISION_CONV_INIT, name=name)


def batch_norm(epsilon: float, *, dtype=jnp.float32, name: str | None = None) -> BatchNorm:
  """Inference-mode BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias, running stats."""
  return BatchNorm(use_running_average=True, epsilon=epsilon, dtype=dtype, name=name)
