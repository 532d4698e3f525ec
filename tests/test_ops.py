"""Shared ops (`uad_jax/ops/`) against independent numpy implementations of torch's definitions,
and the op fixtures of the reference (checks in `ops_checks.py`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ops_checks
from reference_fixtures import load_area
from uad_jax.ops import gms, resize, ssim
from uad_jax.ops.batchnorm import BatchNorm
from uad_jax.ops.conv_transpose import ConvTranspose

# Fixture kinds of the shared ops, checked by `ops_checks.check_<kind>`.
OP_KINDS = ("gms_ssim", "ssim_train_loss", "ssim_eval_map", "resize_align_corners")


def _rng(seed=0):
  return np.random.default_rng(seed)


# --- BatchNorm ---------------------------------------------------------------------------------

def test_batchnorm_train_mode_matches_torch_rules():
  x = _rng().normal(1.5, 2.0, (3, 5, 4, 6)).astype(np.float32)
  bn = BatchNorm(momentum=0.1, epsilon=1e-5)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(6))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))
  scale = _rng(1).normal(size=6).astype(np.float32)
  bias = _rng(2).normal(size=6).astype(np.float32)
  rm = _rng(3).normal(size=6).astype(np.float32)
  rv = _rng(4).uniform(0.5, 2.0, 6).astype(np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": rm, "var": rv}}
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

  x64 = x.astype(np.float64)
  n = 3 * 5 * 4
  mean = x64.mean((0, 1, 2))
  var = ((x64 - mean) ** 2).sum((0, 1, 2)) / n        # biased: normalisation
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * rm + 0.1 * mean, rtol=1e-6)
  unbiased = var * n / (n - 1)                         # torch's running-variance rule
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * rv + 0.1 * unbiased,
                             rtol=1e-6)
  # The biased update (Flax's nn.BatchNorm) would be distinguishable at this n.
  assert not np.allclose(updates["batch_stats"]["var"], 0.9 * rv + 0.1 * var, rtol=1e-4)


def test_batchnorm_eval_mode_uses_running_stats_and_matches_flax():
  x = _rng().normal(size=(2, 4, 4, 3)).astype(np.float32)
  variables = {"params": {"scale": np.float32([0.5, 2.0, -1.0]),
                          "bias": np.float32([0.1, 0.0, -0.3])},
               "batch_stats": {"mean": np.float32([0.2, -0.1, 1.0]),
                               "var": np.float32([1.5, 0.3, 2.0])}}
  y = BatchNorm(use_running_average=True).apply(variables, x)
  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_allclose(y, (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"]
                             + p["bias"], rtol=1e-6, atol=1e-6)
  flax_y = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
  np.testing.assert_array_equal(y, flax_y)
  # No batch_stats update outside train mode.
  _, updates = BatchNorm().apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(updates["batch_stats"]["var"], s["var"])


def test_batchnorm_rejects_one_value_per_channel():
  bn = BatchNorm()
  x = jnp.ones((1, 1, 1, 2))
  with pytest.raises(ValueError, match="more than 1 value"):
    bn.init(jax.random.key(0), x, use_running_average=False)


# --- SSIM --------------------------------------------------------------------------------------

def _numpy_ssim(x, y, window, padding):
  """float64 SSIM map by direct 2-D windowed sums (B, H, W, C); 'same' zero-pads window // 2."""
  i = np.arange(window)
  g = np.exp(-(i - window // 2) ** 2 / (2 * 1.5 ** 2))
  w2 = np.outer(g, g) / np.outer(g, g).sum()
  x, y = x.astype(np.float64), y.astype(np.float64)
  if padding == "same":
    p = ((0, 0), (window // 2,) * 2, (window // 2,) * 2, (0, 0))
    x, y = np.pad(x, p), np.pad(y, p)
  h, w = x.shape[1] - window + 1, x.shape[2] - window + 1

  def mean(a):
    return sum(w2[dy, dx] * a[:, dy:dy + h, dx:dx + w] for dy in range(window)
               for dx in range(window))

  mx, my = mean(x), mean(y)
  sxx, syy, sxy = mean(x * x) - mx ** 2, mean(y * y) - my ** 2, mean(x * y) - mx * my
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  return (2 * mx * my + c1) * (2 * sxy + c2) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))


@pytest.mark.parametrize("window,padding", [(11, "valid"), (5, "valid"), (11, "same"),
                                            (5, "same")])
def test_ssim_map_matches_numpy(window, padding):
  x = _rng().uniform(size=(2, 20, 18, 3)).astype(np.float32)
  y = np.clip(x + _rng(1).normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
  ours = ssim.ssim_map(x, y, window=window, padding=padding)
  expected = _numpy_ssim(x, y, window, padding)
  assert ours.shape == expected.shape
  np.testing.assert_allclose(ours, expected, atol=2e-6)
  np.testing.assert_allclose(ssim.ssim_loss(x, y, window=window, padding=padding),
                             1 - expected.mean(), atol=1e-6)


def test_ssim_window_and_identity():
  np.testing.assert_allclose(ssim.gaussian_window(5),
                             [0.12007838, 0.23388074, 0.29208170, 0.23388074, 0.12007838],
                             rtol=1e-6)
  x = _rng().uniform(size=(1, 16, 16, 2)).astype(np.float32)
  np.testing.assert_allclose(ssim.ssim_map(x, x, window=5, padding="valid"), 1.0, atol=1e-5)
  with pytest.raises(ValueError, match="padding"):
    ssim.ssim_map(x, x, window=5, padding="reflect")


# --- GMS ---------------------------------------------------------------------------------------

def _numpy_gms(u, v):
  """float64 GMS of (B, H, W, 1) images by explicit Prewitt sums."""
  def magnitude(x):
    x = x[..., 0].astype(np.float64)
    h, w = x.shape[1] - 2, x.shape[2] - 2
    gx = sum(x[:, r:r + h, 2:2 + w] - x[:, r:r + h, 0:w] for r in range(3)) / 3
    gy = sum(x[:, 0:h, c:c + w] - x[:, 2:2 + h, c:c + w] for c in range(3)) / 3
    return np.sqrt(gx ** 2 + gy ** 2 + 1e-12)
  gu, gv = magnitude(u), magnitude(v)
  return ((2 * gu * gv + 0.0026) / (gu ** 2 + gv ** 2 + 0.0026))[..., None]


def test_gms_matches_numpy_and_scales():
  u = _rng().uniform(size=(2, 32, 32, 1)).astype(np.float32)
  v = np.clip(u + _rng(1).normal(0, 0.05, u.shape), 0, 1).astype(np.float32)
  np.testing.assert_allclose(gms.gms_map(u, v), _numpy_gms(u, v), atol=2e-6)
  pooled = [u, v]
  losses, total = [], 0.0
  for s in range(4):
    if s:
      pooled = [p.reshape(2, p.shape[1] // 2, 2, p.shape[2] // 2, 2, 1).mean((2, 4))
                for p in pooled]
    m = _numpy_gms(*pooled)
    losses.append((1 - m).mean())
    total = total + np.asarray(resize.resize_bilinear(m.astype(np.float32), 32, 32,
                                                      align_corners=False))
  np.testing.assert_allclose(gms.msgms_loss(u, v), np.mean(losses), atol=1e-6)
  np.testing.assert_allclose(gms.msgms_score(u, v), (1 - total) / 4, atol=2e-6)


# --- Resize ------------------------------------------------------------------------------------

def _numpy_resize(x, height, width, align_corners):
  """Bilinear resize by torch's per-pixel formula (B, h, w, C): source positions in float32 as
  torch computes them, interpolation in float64."""
  def positions(n, m):
    i, f = np.arange(m, dtype=np.float32), np.float32
    if align_corners:
      src = i * (f(n - 1) / f(m - 1) if m > 1 else f(0))
    else:
      src = np.maximum((i + f(0.5)) * (f(n) / f(m)) - f(0.5), f(0))
    i0 = np.minimum(np.floor(src).astype(int), n - 1)
    return i0, np.minimum(i0 + 1, n - 1), src.astype(np.float64) - i0

  y0, y1, wy = positions(x.shape[1], height)
  x0, x1, wx = positions(x.shape[2], width)
  x = x.astype(np.float64)
  wy, wx = wy[None, :, None, None], wx[None, None, :, None]
  top = (1 - wx) * x[:, y0][:, :, x0] + wx * x[:, y0][:, :, x1]
  bottom = (1 - wx) * x[:, y1][:, :, x0] + wx * x[:, y1][:, :, x1]
  return (1 - wy) * top + wy * bottom


@pytest.mark.parametrize("align_corners", [True, False])
@pytest.mark.parametrize("size,target", [((12, 12), (24, 24)), ((56, 56), (224, 224)),
                                         ((80, 80), (10, 10)), ((7, 9), (15, 20)),
                                         ((5, 6), (1, 3))])
def test_resize_matches_torch_formula(align_corners, size, target):
  x = _rng().normal(size=(2, *size, 3)).astype(np.float32)
  ours = resize.resize_bilinear(x, *target, align_corners=align_corners)
  np.testing.assert_allclose(ours, _numpy_resize(x, *target, align_corners), atol=2e-6)


def test_resize_half_pixel_matches_jax_image_and_identity():
  x = _rng().normal(size=(1, 26, 13, 2)).astype(np.float32)
  expected = jax.image.resize(x, (1, 224, 50, 2), "bilinear", antialias=False)
  np.testing.assert_allclose(resize.resize_bilinear(x, 224, 50, align_corners=False), expected,
                             atol=1e-5)
  assert resize.resize_bilinear(x, 26, 13, align_corners=True) is x
  rows = resize.interpolation_matrix(9, 4, align_corners=True)
  np.testing.assert_allclose(rows.sum(1), 1.0, rtol=1e-6)


# --- Reference op fixtures ---------------------------------------------------------------------

OP_FIXTURES = [fx for area in ("riad", "fae") for fx in load_area(area)
               if fx.kind in OP_KINDS]


@pytest.mark.parametrize("fx", OP_FIXTURES, ids=repr)
def test_op_fixture(fx):
  getattr(ops_checks, f"check_{fx.kind}")(fx)


def test_every_op_kind_has_a_fixture():
  assert {fx.kind for fx in OP_FIXTURES} == set(OP_KINDS)


# --- ConvTranspose -----------------------------------------------------------------------------

def _numpy_conv_transpose(x, weight, bias, stride, padding, output_padding):
  """torch's ConvTranspose2d by scatter-add: x (B, H, W, I) NHWC, weight (I, O, kh, kw)."""
  b, h, w, _ = x.shape
  _, o, kh, kw = weight.shape
  full = np.zeros((b, (h - 1) * stride + kh + output_padding,
                   (w - 1) * stride + kw + output_padding, o))
  for iy in range(h):
    for ix in range(w):
      # (B, I) x (I, O, kh, kw) -> (B, kh, kw, O), added at the kernel's footprint.
      full[:, iy * stride:iy * stride + kh, ix * stride:ix * stride + kw] += np.einsum(
          "bi,iokl->bklo", x[:, iy, ix].astype(np.float64), weight)
  out = full[:, padding:full.shape[1] - padding, padding:full.shape[2] - padding]
  return out + (0 if bias is None else bias)


@pytest.mark.parametrize("kernel,stride,padding,output_padding,use_bias", [
    (2, 2, 0, 0, False),   # RD decoder
    (6, 2, 2, 0, False),   # FAE decoder
    (7, 2, 2, 0, False),   # FAE dec_4 (3 -> 7)
    (3, 2, 1, 1, True),
    (4, 3, 0, 2, True),
    (5, 1, 3, 0, True),
    (2, 3, 2, 1, True),    # padding > kernel - 1: the equivalent convolution crops
])
def test_conv_transpose_matches_scatter_add(kernel, stride, padding, output_padding, use_bias):
  x = _rng().normal(size=(2, 3, 4, 5)).astype(np.float32)
  module = ConvTranspose(6, kernel, stride, padding, output_padding, use_bias=use_bias,
                         precision=jax.lax.Precision.HIGHEST)
  params = module.init(jax.random.key(0), x)["params"]
  bound = 1 / np.sqrt(6 * kernel * kernel)   # torch's default init range
  assert np.abs(params["kernel"]).max() <= bound
  assert params["kernel"].shape == (kernel, kernel, 5, 6)
  weight = _rng(1).normal(size=(5, 6, kernel, kernel)).astype(np.float32)   # torch layout
  bias = _rng(2).normal(size=6).astype(np.float32) if use_bias else None
  params = {"kernel": weight.transpose(2, 3, 0, 1)} | ({"bias": bias} if use_bias else {})
  ours = module.apply({"params": params}, x)
  expected = _numpy_conv_transpose(x, weight, bias, stride, padding, output_padding)
  assert ours.shape == expected.shape == (
      2, 2 * stride - 2 * padding + kernel + output_padding,
      3 * stride - 2 * padding + kernel + output_padding, 6)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_conv_transpose_rejects_output_padding_of_stride():
  with pytest.raises(ValueError, match="output_padding"):
    ConvTranspose(2, 3, 2, output_padding=2).init(jax.random.key(0), jnp.ones((1, 4, 4, 1)))
