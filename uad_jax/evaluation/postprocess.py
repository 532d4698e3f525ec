"""3-D median filter of anomaly maps (evaluation.md §4, reference `utils/helpers.py`).

`median_filter_3d(v, k)` returns what `scipy.ndimage.median_filter(v, size=k)` returns: window
offsets `-(k//2) .. k - k//2 - 1` along each axis (asymmetric for even k: -2..+1 for k = 4),
`reflect` borders (half-sample symmetric, repeated when an axis is shorter than the window),
output = element of rank `k³ // 2` of the sorted window (the upper median for even k³).

For k = 2 and 4 (k = 4 is the reference's setting for every method) a faster exact path is
used: the volume is cut into tiles; a tile whose padded input is constant gets that constant
(the background); otherwise the sorted windows are built with Batcher odd-even merge networks
of elementwise min/max (sort along Z, merge along Y, merge along X), and the median is selected
from the last two sorted halves by `min_i max(a_i, b_{r-i})`. Min/max only move values, so the
result is an element of the input, equal to scipy's (bit for bit, up to the sign of a zero
when +0 and -0 are tied in a window). About 10x faster than scipy on a 224×224×155 map with a
zero background (benchmarks/evaluation.py).
"""

import numpy as np
import scipy.ndimage

from uad_jax.errors import EvaluationError

_FAST_KERNELS = (2, 4)
_TILE = (32, 32, 32)


def median_filter_3d(volume, kernel_size: int = 4) -> np.ndarray:
  """Median filter of one volume, identical to `scipy.ndimage.median_filter(size=k)`.

  Args:
    volume: (H, W, Z) map in the reference layout (slice axis last), any real dtype, no NaN.
    kernel_size: k, the window is k×k×k.
  Returns:
    (H, W, Z) array of the input's dtype (a new array).
  """
  v = np.asarray(volume)
  if v.ndim != 3:
    raise EvaluationError(f"median filter: expected a 3-D (H, W, Z) volume, got shape {v.shape}")
  if int(kernel_size) != kernel_size or kernel_size < 1:
    raise EvaluationError(f"median filter: kernel_size must be a positive integer, got "
                          f"{kernel_size}")
  if np.issubdtype(v.dtype, np.floating) and np.isnan(v).any():
    raise EvaluationError("median filter: the volume contains NaN")
  if kernel_size not in _FAST_KERNELS or v.dtype == bool or v.size == 0:
    return scipy.ndimage.median_filter(v, size=kernel_size)
  return _median_filter_tiled(v, kernel_size)


def _median_filter_tiled(v: np.ndarray, k: int) -> np.ndarray:
  before, after = k // 2, k - k // 2 - 1
  # numpy's 'symmetric' padding is scipy's 'reflect' (also when repeated on short axes).
  padded = np.pad(v, [(before, after)] * 3, mode="symmetric")
  out = np.empty_like(v)
  for x0 in range(0, v.shape[0], _TILE[0]):
    for y0 in range(0, v.shape[1], _TILE[1]):
      for z0 in range(0, v.shape[2], _TILE[2]):
        x1, y1, z1 = (min(s + t, n) for s, t, n in zip((x0, y0, z0), _TILE, v.shape))
        tile = padded[x0:x1 + k - 1, y0:y1 + k - 1, z0:z1 + k - 1]
        lo = tile.min()
        if lo == tile.max():
          out[x0:x1, y0:y1, z0:z1] = lo
        else:
          out[x0:x1, y0:y1, z0:z1] = _median_of_tile(np.ascontiguousarray(tile), k)
  return out


def _median_of_tile(tile: np.ndarray, k: int) -> np.ndarray:
  """Median of every k³ window of a padded tile (tile shape = output shape + k - 1)."""
  lists = _merge_windows([tile], 2, k)      # sorted k-lists along Z
  lists = _merge_windows(lists, 1, k)       # sorted k²-lists along Y
  lists = _merge_windows(lists, 0, k // 2)  # sorted k³/2-lists along X
  n = lists[0].shape[0] - k // 2
  return _select(_shift(lists, 0, 0, n), _shift(lists, 0, k // 2, n))


def _merge_windows(lists: list[np.ndarray], axis: int, k: int) -> list[np.ndarray]:
  """Sorted lists of the elements in windows of k neighbours along `axis` (k a power of two).

  Each doubling merges the lists at offset 0 and `width`, so windows share their halves; the
  axis shrinks by k - 1.
  """
  width = 1
  while width < k:
    n = lists[0].shape[axis] - width
    lists = _merge(_shift(lists, axis, 0, n), _shift(lists, axis, width, n))
    width *= 2
  return lists


def _shift(lists, axis, start, n):
  index = [slice(None)] * 3
  index[axis] = slice(start, start + n)
  return [a[tuple(index)] for a in lists]


def _merge(a: list, b: list) -> list:
  """Batcher's odd-even merge of two elementwise-sorted lists of equal power-of-two length."""
  if len(a) == 1:
    return [np.minimum(a[0], b[0]), np.maximum(a[0], b[0])]
  even = _merge(a[0::2], b[0::2])
  odd = _merge(a[1::2], b[1::2])
  out = [even[0]]
  for e, o in zip(even[1:], odd[:-1]):
    out += [np.minimum(o, e), np.maximum(o, e)]
  return out + [odd[-1]]


def _select(a: list, b: list) -> np.ndarray:
  """Element of rank m (0-based) of the union of two sorted m-lists: min_i max(a_i, b_{m-1-i})."""
  m = len(a)
  result = np.maximum(a[0], b[m - 1])
  for i in range(1, m):
    np.minimum(result, np.maximum(a[i], b[m - 1 - i]), out=result)
  return result
