"""Checks of the shared ops against the reference's op fixtures, one `check_<kind>(fx)` per kind.

Method area tests (riad, fae, ...) dispatch these kinds here; `test_ops.py` runs them on every
op fixture. Fixture arrays are NCHW; the ops take NHWC.
"""

import jax.numpy as jnp
import numpy as np

from uad_jax.ops import gms, resize, ssim


def nhwc(a: np.ndarray) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -3, -1)


def nchw(a) -> np.ndarray:
  return np.moveaxis(np.asarray(a), -1, -3)


def _inputs(fx) -> list[np.ndarray]:
  """The fixture's inputs in their recorded order."""
  return [fx.inputs[name] for name, *_ in fx.meta["inputs"]]


def _assert_close(fx, name, ours, expected):
  np.testing.assert_allclose(np.asarray(ours), expected, err_msg=f"{fx!r} output {name}",
                             **fx.tolerance)


def _check_window(fx, name, expected):
  """A (w, w) output is the normalised 2-D Gaussian window."""
  g = ssim.gaussian_window(expected.shape[0])
  _assert_close(fx, name, np.outer(g, g), expected)


def check_ssim_train_loss(fx):
  """FAE's training loss: 1 − mean SSIM, window `config.model.window_size`, 'valid'."""
  window = fx.meta["config"]["model"]["window_size"]
  features, reconstruction = (nhwc(a) for a in _inputs(fx))
  for name, *_ in fx.meta["outputs"]:
    expected = fx.outputs[name]
    if expected.ndim == 2:
      _check_window(fx, name, expected)
    else:
      _assert_close(fx, name, ssim.ssim_loss(features, reconstruction, window=window), expected)


def check_ssim_eval_map(fx):
  """FAE's scoring map: −SSIM(R, F) per pixel and channel, window 11 zero-padded ('same')."""
  window = fx.meta["config"]["model"]["window_size"]
  features, reconstruction = (nhwc(a) for a in _inputs(fx))
  for name, *_ in fx.meta["outputs"]:
    expected = fx.outputs[name]
    if expected.ndim == 2:
      _check_window(fx, name, expected)
    else:
      ours = -ssim.ssim_map(reconstruction, features, window=window, padding="same")
      _assert_close(fx, name, nchw(ours), expected)


def check_gms_ssim(fx):
  """RIAD's MSGMS score map and training-loss terms (SSIM window 11 'valid') of (u, v).

  The sidecar's notes say the SSIM is zero-padded, but its stored `ssim_loss` is the valid-map
  value (riad.md §2.4: 0.434850 valid, 0.444203 padded).
  """
  u, v = (nhwc(a) for a in _inputs(fx))
  l2 = jnp.mean(jnp.square(u - v))
  msgms = gms.msgms_loss(u, v)
  ssim_loss = ssim.ssim_loss(u, v, window=11)
  ours = {"msgms_score": lambda: nchw(gms.msgms_score(u, v)), "msgms_loss": lambda: msgms,
          "ssim_loss": lambda: ssim_loss, "l2_loss": lambda: l2,
          "total_loss": lambda: l2 + msgms + ssim_loss}
  for name, *_ in fx.meta["outputs"]:
    assert name in ours, f"{fx!r}: unknown output {name!r}"
    _assert_close(fx, name, ours[name](), fx.outputs[name])


def check_resize_align_corners(fx):
  """Bilinear align_corners=True resize of each input to the size of the output at its index."""
  assert len(fx.meta["inputs"]) == len(fx.meta["outputs"]), fx
  for x, (name, shape, *_) in zip(_inputs(fx), fx.meta["outputs"]):
    ours = resize.resize_bilinear(nhwc(x), *shape[-2:], align_corners=True)
    _assert_close(fx, name, nchw(ours), fx.outputs[name])
