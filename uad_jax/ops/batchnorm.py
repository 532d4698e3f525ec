"""BatchNorm with PyTorch's `BatchNorm2d` semantics, trainable or frozen.

Train mode (`use_running_average=False`) normalises with the batch mean and the *biased* batch
variance over every axis but the last, and updates the running statistics as torch does:

  mean ← (1 − m)·mean + m·μ,   var ← (1 − m)·var + m·σ²·n/(n − 1)

with torch's momentum m (0.1 by default) and n the number of values per channel (N·H·W). Flax's
`nn.BatchNorm` updates `var` with the biased σ², which the reference's train-mode fixtures reject
(itermask.md §2.7, fae.md §7). Eval mode normalises with the running statistics. During
`init` the running statistics keep their initial values (0 and 1), as in Flax.

Variable names equal Flax's `nn.BatchNorm` (params `scale`, `bias`; batch_stats `mean`, `var`),
so torch `weight`, `bias`, `running_mean`, `running_var` convert as for any torchvision BN
(`uad_jax/convert/torchvision.py`). The frozen ImageNet backbones use this module in eval mode
(`uad_jax/networks/torchvision_layers.batch_norm`).

Data parallelism: under `jax.jit` over a mesh with the batch axis sharded, the batch mean and
variance are reductions over the global batch, so the statistics are synchronised across devices
(like torch's SyncBatchNorm) and do not depend on the device count. The reference trains on one
GPU; with several it would keep per-device statistics.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d on (..., C) inputs (NHWC: statistics over N, H, W).

  Attributes:
    use_running_average: eval mode (running statistics); may be given at call time instead.
    momentum: torch's momentum, the weight of the new batch statistic (Flax's is 1 − this).
    epsilon: added to the variance (torch: 1e-5).
    dtype: dtype of the output; statistics and normalisation are computed in float32.
  """
  use_running_average: bool | None = None
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    """x: (..., C). Returns x's shape in `dtype`; in train mode updates `batch_stats`."""
    use_running_average = nn.merge_param(
        "use_running_average", self.use_running_average, use_running_average)
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    x32 = jnp.asarray(x, jnp.float32)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      n = math.prod(x.shape[:-1])
      if n < 2:
        raise ValueError(f"BatchNorm in train mode needs more than 1 value per channel, got "
                         f"input shape {x.shape}")
      mean = jnp.mean(x32, axes)
      # Two-pass variance (as torch and Flax's use_fast_variance=False): no E[x²] − μ² cancellation.
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = (1 - m) * running_mean.value + m * mean
        running_var.value = (1 - m) * running_var.value + m * var * (n / (n - 1))
    # Same operation order as Flax's BatchNorm (bit-identical eval mode for the backbones).
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return jnp.asarray(y, self.dtype)
