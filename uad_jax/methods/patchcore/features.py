"""PatchCore's local aggregation: backbone feature maps -> one descriptor per patch position.

Reference semantics (spec methods/patchcore.md §4.4): every tapped map is unfolded into k x k
neighbourhoods (stride s, zero padding (k - 1) // 2), each flattened in (channel, dy, dx) order;
the patch tensors of later layers are bilinearly resized (half-pixel centres, no antialiasing) to
the first layer's patch grid; per layer the flattened vector is adaptive-average-pooled to
`pretrain_dim`; the concatenation over layers is adaptive-average-pooled to `target_dim`.
Zero padding counts in every average.

Nothing of that is materialised here. The whole chain is linear in the features, so per layer it
is one convolution whose kernel is the product of the two pooling matrices, and resizing (a map
over positions) commutes with pooling (a map over the feature axis): a layer is pooled at its
own resolution and only its `target_dim` result is resized. For the paper configuration the
kernel is so structured that it reduces to box sums (the closed form of the spec, generalised
to any channel count C): for taps with C and 2C channels, patch size 5, stride 1 and
pretrain_dim = target_dim = 2C, the first layer contributes (box5(f) + f) / 26 per channel
(its two 13-value pooling bins of a channel overlap in the window centre) and the second the
mean of box5 over channel pairs (2c, 2c + 1), / 50.

`descriptors(config, variables, images)` runs the whole extractor of a config: the shared frozen
feature extractor (`uad_jax/networks/feature_extractor.py`: grey slices -> 3 identical channels,
no ImageNet normalisation unless model.normalize, backbone taps `model.layers`) -> `aggregate`.
Resizes are torch's bilinear with align_corners=False (`uad_jax/ops/resize.py`).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uad_jax.networks import backbones, feature_extractor
from uad_jax.ops.resize import resize_bilinear

HIGHEST = jax.lax.Precision.HIGHEST


def patch_grid(size: int, patchsize: int, stride: int) -> int:
  """Patch positions along an axis of `size` (torch.nn.Unfold with padding (k - 1) // 2)."""
  pad = (patchsize - 1) // 2
  return (size + 2 * pad - patchsize) // stride + 1


def adaptive_pool_matrix(length: int, out: int) -> np.ndarray:
  """(length, out) float64 matrix of torch's adaptive_avg_pool1d from `length` to `out` values.

  Bin i averages v[floor(i * length / out) : ceil((i + 1) * length / out)] (bins may overlap).
  """
  m = np.zeros((length, out))
  for i in range(out):
    lo, hi = (i * length) // out, -((-(i + 1) * length) // out)
    m[lo:hi, i] = 1.0 / (hi - lo)
  return m


def uses_closed_form(channels: Sequence[int], patchsize: int, patchstride: int,
                     pretrain_dim: int, target_dim: int) -> bool:
  """Whether the box-sum closed form equals the reference for these settings."""
  return (len(channels) == 2 and channels[1] == 2 * channels[0] and patchsize == 5
          and patchstride == 1 and pretrain_dim == target_dim == channels[1])


def _box_sum(x: jnp.ndarray, size: int) -> jnp.ndarray:
  """size x size window sums per channel, stride 1, zero padding (size - 1) // 2. (B,h,w,C)."""
  pad = (size - 1) // 2
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, size, size, 1), (1, 1, 1, 1),
                               ((0, 0), (pad, size - 1 - pad), (pad, size - 1 - pad), (0, 0)))


def _closed_form(first: jnp.ndarray, second: jnp.ndarray) -> jnp.ndarray:
  a = (_box_sum(first, 5) + first) / 26.0
  s = _box_sum(second, 5)
  b = (s[..., 0::2] + s[..., 1::2]) / 50.0
  b = resize_bilinear(b, first.shape[1], first.shape[2], align_corners=False)
  return jnp.concatenate([a, b], axis=-1)


def pooling_kernels(channels: Sequence[int], patchsize: int, pretrain_dim: int,
                    target_dim: int) -> list[np.ndarray]:
  """Per layer, the (k, k, C, target_dim) float32 conv kernel of unfold + both poolings."""
  final = adaptive_pool_matrix(len(channels) * pretrain_dim, target_dim)
  kernels = []
  for layer, c in enumerate(channels):
    per_layer = adaptive_pool_matrix(c * patchsize * patchsize, pretrain_dim)
    m = per_layer @ final[layer * pretrain_dim:(layer + 1) * pretrain_dim]
    # Row index of m is c * k * k + dy * k + dx (the unfold order); to HWIO.
    kernels.append(m.reshape(c, patchsize, patchsize, target_dim).transpose(1, 2, 0, 3)
                   .astype(np.float32))
  return kernels


def _general(taps: Sequence[jnp.ndarray], patchsize: int, patchstride: int,
             pretrain_dim: int, target_dim: int) -> jnp.ndarray:
  kernels = pooling_kernels([t.shape[-1] for t in taps], patchsize, pretrain_dim, target_dim)
  pad = (patchsize - 1) // 2
  out = None
  for tap, kernel in zip(taps, kernels):
    y = jax.lax.conv_general_dilated(
        tap, jnp.asarray(kernel), (patchstride, patchstride),
        ((pad, patchsize - 1 - pad),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=HIGHEST)
    if out is None:
      out = y
    else:
      out = out + resize_bilinear(y, out.shape[1], out.shape[2], align_corners=False)
  return out


def aggregate(taps: Sequence[jnp.ndarray], *, patchsize: int, patchstride: int,
              pretrain_dim: int, target_dim: int) -> jnp.ndarray:
  """Patch descriptors of backbone taps.

  taps: per layer of `model.layers`, in that order, float32 (B, h_l, w_l, C_l) feature maps.
  Returns float32 (B, h, w, target_dim) on the first layer's patch grid (h, w) (`patch_grid`);
  `reshape(-1, target_dim)` gives the reference's row order b * h * w + i * w + j.
  """
  taps = [jnp.asarray(t, jnp.float32) for t in taps]
  channels = [t.shape[-1] for t in taps]
  if uses_closed_form(channels, patchsize, patchstride, pretrain_dim, target_dim):
    return _closed_form(*taps)
  return _general(taps, patchsize, patchstride, pretrain_dim, target_dim)


def descriptors(config, variables, images: jnp.ndarray) -> jnp.ndarray:
  """Patch descriptors of grey slices.

  images: float32 (B, H, W, 1) in [0, 1]. Returns float32 (B, h, w, model.target_embed_dim).
  """
  m = config.model
  return aggregate(feature_extractor.extract(m, variables, images), patchsize=m.patchsize,
                   patchstride=m.patchstride, pretrain_dim=m.pretrain_embed_dim,
                   target_dim=m.target_embed_dim)


def descriptor_grid(config) -> tuple[int, int]:
  """(h, w) patch grid of one `data.image_size` slice (traced on shapes only)."""
  module = feature_extractor.backbone_module(config.model)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32)
  out = jax.eval_shape(functools.partial(descriptors, config),
                       backbones.abstract_variables(module), images)
  return out.shape[1], out.shape[2]
