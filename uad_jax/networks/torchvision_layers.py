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

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from uad_jax.ops.batchnorm import BatchNorm

# torchvision: nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu"), untruncated.
TORCHVISION_CONV_INIT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _pads(n: int, kernel: int, stride: int, tf_same: bool) -> tuple[int, int]:
  if not tf_same:
    return (kernel - 1) // 2, (kernel - 1) // 2
  total = max((-(-n // stride) - 1) * stride + kernel - n, 0)   # TF 'SAME': ceil(n / s) out
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """k x k depthwise conv (one filter per channel, no bias) as a sum of k² shifted products.

  Same parameter as nn.Conv(C, feature_group_count=C): `kernel` (k, k, 1, C), so weights convert
  alike. XLA:CPU runs grouped convolutions 4-24x slower than these products (EfficientNet-Lite0
  layers at batch 32, e.g. 56x56x144 3x3: 0.39 s vs 0.040 s; 28x28x144 5x5/2: 0.032 vs 0.0045 s;
  float32 results equal to 3e-6).
  """
  kernel_size: int
  stride: int = 1
  tf_same: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.stride
    c = x.shape[-1]
    kernel = self.param("kernel", TORCHVISION_CONV_INIT, (k, k, 1, c), jnp.float32)
    x = jnp.asarray(x, self.dtype)
    w = jnp.asarray(kernel[:, :, 0], self.dtype)
    x = jnp.pad(x, ((0, 0), _pads(x.shape[1], k, s, self.tf_same),
                    _pads(x.shape[2], k, s, self.tf_same), (0, 0)))
    b, h, wd, _ = x.shape
    oh, ow = (h - k) // s + 1, (wd - k) // s + 1
    out = 0
    for i in range(k):
      for j in range(k):
        tap = jax.lax.slice(x, (0, i, j, 0), (b, i + s * (oh - 1) + 1, j + s * (ow - 1) + 1, c),
                            (1, s, s, 1))
        out = out + tap * w[i, j]
    return out


def conv(features: int, kernel: int, stride: int = 1, *, groups: int = 1, use_bias: bool = False,
         dtype=jnp.float32, precision=None, tf_same: bool = False,
         name: str | None = None) -> nn.Module:
  """A k x k conv, stride s, symmetric zero padding (k - 1) // 2, no bias unless asked.

  tf_same: TensorFlow's 'SAME' padding instead (output ceil(n / s); the odd pixel of padding at
  the end), for networks trained in TensorFlow (EfficientNet-Lite).
  A depthwise conv (groups == features, no bias) is a `DepthwiseConv` (elementwise products:
  `precision` does not apply).
  """
  if groups > 1 and groups == features and not use_bias:
    return DepthwiseConv(kernel, stride, tf_same, dtype=dtype, name=name)
  p = (kernel - 1) // 2
  padding = "SAME" if tf_same else ((p, p), (p, p))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, precision=precision,
                 kernel_init=TORCHVISION_CONV_INIT, name=name)


def batch_norm(epsilon: float, *, dtype=jnp.float32, name: str | None = None) -> BatchNorm:
  """Inference-mode BatchNorm: (x - mean) / sqrt(var + eps) * scale + bias, running stats."""
  return BatchNorm(use_running_average=True, epsilon=epsilon, dtype=dtype, name=name)
