"""PatchCore parts: reference fixtures (dispatch on kind), aggregation against a literal unfold +
adaptive pooling, exact kNN against brute force, one-shot and streaming coreset."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reference_fixtures import load_area
from uad_jax.methods.patchcore import coreset, features as pf, knn, method as patchcore
from uad_jax.ops.resize import resize_bilinear

FIXTURES = load_area("patchcore")


def _nhwc(a):
  return np.asarray(a).transpose(0, 2, 3, 1)


def _aggregate_fixture_taps(fx):
  m = fx.meta["config"]["model"]
  taps = [_nhwc(fx.inputs[f"feat_{layer}"]) for layer in m["layers"]]
  for layer, tap in zip(m["layers"], taps):
    assert tap.shape[3] == fx.meta["config"]["channels"][layer]
    assert list(tap.shape[1:3]) == fx.meta["config"]["tap_spatial"][layer]
  out = pf.aggregate(taps, patchsize=m["patchsize"], patchstride=m["patchstride"],
                     pretrain_dim=m["pretrain_embed_dim"], target_dim=m["target_embed_dim"])
  return taps, np.asarray(out)


def _check_aggregation(fx):
  taps, out = _aggregate_fixture_taps(fx)
  m = fx.meta["config"]["model"]
  shapes = fx.outputs["patch_shapes"]
  assert [list(s) for s in shapes] == [
      [pf.patch_grid(t.shape[a], m["patchsize"], m["patchstride"]) for a in (1, 2)] for t in taps]
  assert out.shape[1:3] == tuple(shapes[0])
  np.testing.assert_allclose(out.reshape(-1, out.shape[-1]), fx.outputs["descriptors"],
                             **fx.tolerance)


def _check_coreset(fx):
  cfg = fx.meta["config"]
  features = fx.inputs["features"]
  k = cfg["coreset_size"]
  assert k == coreset.coreset_size(cfg["n_features"], cfg["model"]["sample_size"])
  assert fx.inputs["projection_weight"].shape == (
      cfg["model"]["dimension_to_project_features_to"], cfg["feature_dim"])
  assert fx.inputs["start_points"].shape == (cfg["model"]["number_of_starting_points"],)
  indices = coreset.greedy_coreset(features, k, jnp.asarray(fx.inputs["projection_weight"]),
                                   fx.inputs["start_points"])
  np.testing.assert_array_equal(indices, fx.outputs["coreset_indices"])
  np.testing.assert_array_equal(features[indices], fx.outputs["bank"])


def _check_knn_anomaly_map(fx):
  cfg = fx.meta["config"]
  _, desc = _aggregate_fixture_taps(fx)
  n, h, w, d = desc.shape
  np.testing.assert_allclose(desc.reshape(-1, d), fx.outputs["descriptors"], **fx.tolerance)
  image = fx.inputs["image"]                              # (V, S, 1, H, W)
  v, s = image.shape[:2]
  images = image.reshape(v * s, *image.shape[2:]).transpose(0, 2, 3, 1)
  bank = fx.inputs["bank"]
  split = cfg["eval"]["split_size"]
  for num_shards, chunk_rows in ((1, knn.CHUNK_ROWS), (3, 4)):   # several chunks and shards
    layout = knn.layout_bank(bank, num_shards, chunk_rows)
    params = {"bank_rows": layout["rows"], "bank_sq_norms": layout["sq_norms"]}
    scores, index, maps = [], [], []
    for c in range(0, n, split):                          # the reference's slice chunks
      dist, idx = jax.jit(knn.search)(jnp.asarray(desc[c:c + split].reshape(-1, d)),
                                      params["bank_rows"], params["bank_sq_norms"])
      sc = dist[:, 0].reshape(-1, h, w)
      scores.append(np.asarray(sc))
      index.append(np.asarray(idx[:, 0]))
      maps.append(np.asarray(patchcore.anomaly_maps(sc, jnp.asarray(images[c:c + split]))))
    scores, index, maps = map(np.concatenate, (scores, index, maps))
    np.testing.assert_array_equal(index, fx.outputs["nn_index"])
    np.testing.assert_allclose(scores, fx.outputs["patch_scores"], **fx.tolerance)
    np.testing.assert_allclose(scores.reshape(n, -1).max(axis=1), fx.outputs["image_scores"],
                               **fx.tolerance)
    up = np.asarray(resize_bilinear(jnp.asarray(scores)[..., None], *images.shape[1:3],
                                    align_corners=False))
    np.testing.assert_allclose(up[..., 0], fx.outputs["map_upsampled"][:, 0], **fx.tolerance)
    volume = maps.reshape(v, s, *maps.shape[1:]).transpose(0, 2, 3, 1)[:, None]
    np.testing.assert_allclose(volume, fx.outputs["anomaly_volume"], **fx.tolerance)
    assert not volume[..., image.reshape(v * s, -1).max(axis=1) == 0].any()


CHECKS = {"feature_aggregation": _check_aggregation,
          "feature_aggregation_odd": _check_aggregation,
          "coreset": _check_coreset,
          "knn_anomaly_map": _check_knn_anomaly_map}


@pytest.mark.parametrize("fx", FIXTURES, ids=lambda f: f.name)
def test_reference_fixture(fx):
  if fx.kind not in CHECKS:
    pytest.fail(f"{fx}: unknown patchcore fixture kind {fx.kind!r}")
  CHECKS[fx.kind](fx)


# --- aggregation against a literal implementation -------------------------------------------

def _torch_bilinear(x, height, width):
  """torch F.interpolate(mode='bilinear', align_corners=False) of (B, h, w, F), in numpy."""
  def axis(out, size):
    src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), size - 1)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, src - i0
  y0, y1, ly = axis(height, x.shape[1])
  x0, x1, lx = axis(width, x.shape[2])
  wx = lx[None, None, :, None]
  top = x[:, y0][:, :, x0] * (1 - wx) + x[:, y0][:, :, x1] * wx
  bot = x[:, y1][:, :, x0] * (1 - wx) + x[:, y1][:, :, x1] * wx
  return top * (1 - ly)[None, :, None, None] + bot * ly[None, :, None, None]


def _adaptive_avg_pool(v, out):
  length = v.shape[-1]
  return np.stack([v[..., (i * length) // out:-((-(i + 1) * length) // out)].mean(-1)
                   for i in range(out)], axis=-1)


def _literal_aggregate(taps, k, stride, pre, target):
  """The reference's unfold -> resize -> pool -> concat -> pool, float64, nothing fused."""
  pad = (k - 1) // 2
  layers = []
  for f in taps:
    b, hh, ww, c = f.shape
    fp = np.pad(f.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    gh, gw = (hh + 2 * pad - k) // stride + 1, (ww + 2 * pad - k) // stride + 1
    u = np.empty((b, gh, gw, c, k, k))
    for i in range(gh):
      for j in range(gw):
        window = fp[:, i * stride:i * stride + k, j * stride:j * stride + k]
        u[:, i, j] = window.transpose(0, 3, 1, 2)
    layers.append(u.reshape(b, gh, gw, c * k * k))
  gh, gw = layers[0].shape[1:3]
  pooled = [_adaptive_avg_pool(_torch_bilinear(u, gh, gw), pre) for u in layers]
  return _adaptive_avg_pool(np.concatenate(pooled, -1), target)


@pytest.mark.parametrize("case", [
    # (channels, map sizes, patchsize, stride, pretrain, target, closed form?): the closed form
    # (C, 2C) at the tap sizes of a 64x64 input (8x8, 4x4), then general paths incl. stride 2,
    # three layers, and (C, 2C) channels with other dims.
    ((8, 16), (8, 4), 5, 1, 16, 16, True),
    ((5, 7), (7, 4), 3, 1, 11, 9, False),
    ((6, 4, 3), (9, 5, 3), 3, 2, 10, 13, False),
    ((8, 16), (6, 3), 5, 1, 24, 16, False),
])
def test_aggregation_equals_literal_unfold_and_pooling(case):
  channels, sizes, k, stride, pre, target, closed = case
  rng = np.random.default_rng(sum(channels))
  taps = [rng.uniform(0, 2, (2, s, s, c)).astype(np.float32) for c, s in zip(channels, sizes)]
  assert pf.uses_closed_form(channels, k, stride, pre, target) == closed
  want = _literal_aggregate(taps, k, stride, pre, target)
  got = np.asarray(pf.aggregate(taps, patchsize=k, patchstride=stride, pretrain_dim=pre,
                                target_dim=target))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  if closed:   # the general path computes the same
    general = pf._general(taps, k, stride, pre, target)  # pylint: disable=protected-access
    np.testing.assert_allclose(np.asarray(general), want, rtol=1e-5, atol=1e-6)


def test_adaptive_pool_matrix_bins_overlap_like_torch():
  m = pf.adaptive_pool_matrix(25, 2)            # 12.5 values per bin: both take the centre
  np.testing.assert_array_equal(m[:, 0] > 0, np.arange(25) < 13)
  np.testing.assert_array_equal(m[:, 1] > 0, np.arange(25) >= 12)
  np.testing.assert_allclose(m.sum(axis=0), 1.0)


# --- exact kNN -------------------------------------------------------------------------------

@pytest.mark.parametrize("num_shards,chunk_rows,k,query_tile", [
    (1, 2048, 1, 8192), (4, 5, 1, 16), (3, 7, 3, 8192), (2, 64, 4, 7)])
def test_search_equals_brute_force(num_shards, chunk_rows, k, query_tile):
  rng = np.random.default_rng(k + num_shards)
  bank = rng.normal(size=(53, 12)).astype(np.float32)
  queries = rng.normal(size=(40, 12)).astype(np.float32)
  queries[:3] = bank[[5, 17, 52]]                 # exact hits: distance 0 at the right row
  layout = knn.layout_bank(bank, num_shards, chunk_rows)
  assert layout["rows"].shape[1] == num_shards
  assert np.isinf(layout["sq_norms"]).sum() == layout["sq_norms"].size - len(bank)
  search = jax.jit(knn.search, static_argnames=("k", "query_tile"))
  dist, index = search(queries, layout["rows"], layout["sq_norms"], k=k, query_tile=query_tile)
  d64 = ((queries[:, None].astype(np.float64) - bank[None]) ** 2).sum(-1)
  want = np.argsort(d64, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.asarray(index), want)
  np.testing.assert_allclose(np.asarray(dist), np.take_along_axis(d64, want, 1), rtol=1e-5,
                             atol=1e-5)
  # Exact hits: the expansion leaves only float32 cancellation (spec §7.7), never a negative.
  assert (np.asarray(index[:3, 0]) == [5, 17, 52]).all()
  assert (0 <= np.asarray(dist[:3, 0])).all()
  assert (np.asarray(dist[:3, 0]) <= 1e-6 * (queries[:3] ** 2).sum(1)).all()


def test_search_scans_only_the_requested_chunks():
  bank = np.arange(40, dtype=np.float32).reshape(20, 2)
  layout = knn.layout_bank(bank, 1, 4)           # 5 chunks of 4 rows
  query = np.array([[38.0, 39.0]], np.float32)   # == bank[19], in the last chunk
  _, index = knn.search(query, layout["rows"], layout["sq_norms"], num_chunks=2)
  assert int(index[0, 0]) == 7                   # nearest among rows 0..7


# --- coreset ---------------------------------------------------------------------------------

def _clusters(rng, n, dim, centres=30):
  c = rng.normal(size=(centres, dim)) * 4
  return (c[rng.integers(0, centres, n)] + rng.normal(size=(n, dim)) * rng.uniform(
      0.2, 1.5, (n, 1))).astype(np.float32)


def test_one_block_is_the_one_shot_greedy():
  rng = np.random.default_rng(3)
  x = _clusters(rng, 600, 20)
  w = coreset.random_projection(jax.random.key(0), 20, 8)
  start = np.array([4, 99, 3, 500], np.int32)
  one_shot = coreset.greedy_coreset(x, 25, w, start)
  # Independent replay of the reference loop in float64.
  z = x.astype(np.float64) @ np.asarray(w, np.float64).T
  dist = lambda a, b: np.sqrt(np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 0))
  r = dist(z, z[start]).mean(1)
  want = []
  for _ in range(25):
    want.append(int(np.argmax(r)))
    r = np.minimum(r, dist(z, z[want[-1:]])[:, 0])
  np.testing.assert_array_equal(one_shot, want)


def test_streaming_budgets_sum_to_k_and_radius_bound_holds():
  rng = np.random.default_rng(5)
  x = _clusters(rng, 3000, 16)
  w = coreset.random_projection(jax.random.key(1), 16, 16)
  assert np.array_equal(np.asarray(w), np.eye(16))       # D == d: no projection (reference)
  k = coreset.coreset_size(len(x), 0.03)
  blocks = [700, 700, 700, 700, 200]
  budgets = coreset.block_budgets(blocks, 0.03, k)
  assert sum(budgets) == k == 90 and budgets == [21, 21, 21, 21, 6]
  assert coreset.block_budgets(blocks, 0.03, 45) == [10, 11, 10, 11, 3]   # a cap
  sel = coreset.empty_selection(k, 16, 16, chunk_rows=32)
  z = coreset.project(jnp.asarray(x), w)
  start = jnp.arange(10, dtype=jnp.int32)
  select = jax.jit(coreset.select_from_block)
  offset, radii, picked = 0, [], []
  for rows, budget in zip(blocks, budgets):
    pad = 700 - rows
    bz = jnp.pad(z[offset:offset + rows], ((0, pad), (0, 0)))
    sel, picks, radius = select(sel, bz, bz, rows, budget, start)
    picked += (offset + np.asarray(picks[:budget])).tolist()
    radii.append(float(radius))
    offset += rows
  assert int(sel["count"]) == k and len(set(picked)) == k
  np.testing.assert_array_equal(np.asarray(sel["rows"][:k]), x[picked])
  streaming = coreset.coverage_radius(z, z[np.array(picked)])
  assert streaming <= max(radii) * (1 + 1e-5)
  one_shot = coreset.greedy_coreset(x, k, w, np.asarray(start))
  reference = coreset.coverage_radius(z, z[one_shot])
  # Streaming is no better than one-shot greedy's 2-approximation allows, and close to it here.
  assert reference / 2 <= streaming <= 1.5 * reference, (streaming, reference)


def test_coreset_size_is_the_reference_int_and_capped():
  assert coreset.coreset_size(784 * 1000, 0.01) == 7840
  assert coreset.coreset_size(361_424_000, 0.01) == 3_614_240
  assert coreset.coreset_size(784 * 1000, 0.01, max_size=5000) == 5000
