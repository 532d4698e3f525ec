"""grain training pipeline: shapes, value ranges, seeded epochs, sharding, resumable state."""

import hashlib
import json
import pickle

import numpy as np
import pytest

from data_helpers import make_cohort, write_csv
from uad_jax.data import SliceDataSource, make_train_iterator, write_slice_database
from uad_jax.data.pipeline import EpochShuffle
from uad_jax.data.volumes import center_crop_pad
from uad_jax.errors import ConfigError

N_SLICES = 4 * 5  # 4 volumes x 5 non-empty slices (slice 0 of each volume is empty)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipeline")
  paths = make_cohort(root / "ds", 4, shape=(18, 14, 6))
  return write_slice_database(write_csv(root / "train.csv", paths), root / "out", progress=False)


@pytest.fixture(scope="module")
def fingerprints(db):
  """Fingerprint of each slice (cropped to 16x16) -> its index in the database."""
  src = SliceDataSource(db)
  table = {_fp(center_crop_pad(src[i]["image"], 16)): i for i in range(len(src))}
  assert len(table) == len(src) == N_SLICES  # every slice is distinct
  return table


def _fp(image):
  return hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()


def _indices(batches, fingerprints):
  return [fingerprints[_fp(img[..., 0])] for b in batches for img in b["image"]]


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_batches_shape_dtype_and_crop(db, fingerprints):
  with make_train_iterator(db, global_batch_size=5, image_size=16, seed=0) as it:
    batch = next(it)
    assert set(batch) == {"image"}
    assert batch["image"].shape == (5, 16, 16, 1) and batch["image"].dtype == np.float32
    assert it.local_batch_size == 5 and it.slices_per_epoch == N_SLICES and it.step == 1
    src = SliceDataSource(db)
    first = fingerprints[_fp(batch["image"][0, ..., 0])]
    # 18x14 -> 16x16: rows cropped at offset round(1.0) = 1, columns padded 1 / 1.
    expected = np.zeros((16, 16), np.float32)
    expected[:, 1:15] = src[first]["image"][1:17, :]
    np.testing.assert_array_equal(batch["image"][0, ..., 0], expected)
  with make_train_iterator(db, global_batch_size=3, image_size=None, seed=0) as it:
    assert next(it)["image"].shape == (3, 18, 14, 1)  # stored size, uncropped


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (-3.0, 3.0)])
def test_value_range_matches_the_reference_rescaling(db, value_range):
  kwargs = dict(global_batch_size=4, image_size=16, seed=3)
  with make_train_iterator(db, **kwargs) as a, make_train_iterator(
      db, value_range=value_range, **kwargs) as b:
    x, y = next(a)["image"], next(b)["image"]
  scale = value_range[1]  # reference: 2x - 1 (ANDi, Disyre), 6x - 3 (IterMask)
  np.testing.assert_array_equal(y, x * np.float32(2 * scale) - np.float32(scale))
  assert y.min() == -scale  # background


def test_epochs_are_seeded_permutations_with_full_batches(db, fingerprints):
  # Batch 8 does not divide 20 slices: batches run across epoch boundaries, always full.
  with make_train_iterator(db, global_batch_size=8, image_size=16, seed=7) as it:
    order = _indices(_take(it, 10), fingerprints)  # 80 slices = 4 epochs
  epochs = [order[i:i + N_SLICES] for i in range(0, 80, N_SLICES)]
  for e, visited in enumerate(epochs):
    assert visited == np.random.default_rng([7, e]).permutation(N_SLICES).tolist()
  assert len({tuple(e) for e in epochs}) == 4  # a new permutation every epoch
  with make_train_iterator(db, global_batch_size=8, image_size=16, seed=7) as again, \
      make_train_iterator(db, global_batch_size=8, image_size=16, seed=8) as other:
    assert _indices(_take(again, 10), fingerprints) == order
    assert _indices(_take(other, 10), fingerprints) != order


def test_processes_split_each_global_batch(db):
  with make_train_iterator(db, global_batch_size=6, image_size=16, seed=1) as single:
    expected = _take(single, 7)  # crosses two epoch boundaries
  parts = []
  for process_index in range(3):
    with make_train_iterator(db, global_batch_size=6, image_size=16, seed=1,
                             process_index=process_index, process_count=3) as it:
      assert it.local_batch_size == 2
      parts.append(_take(it, 7))
  merged = [{"image": np.concatenate([p[g]["image"] for p in parts])} for g in range(7)]
  _assert_same(merged, expected)


def test_resume_from_state_gives_exactly_the_same_batches(db):
  kwargs = dict(global_batch_size=6, image_size=16, seed=11)
  with make_train_iterator(db, **kwargs) as it:
    _take(it, 3)  # 18 slices: the next batches cross into epoch 2
    state = it.get_state()
    expected = _take(it, 4)
  assert json.loads(state)["step"] == 3  # bytes of JSON, storable in a checkpoint
  with make_train_iterator(db, **kwargs) as resumed:
    next(resumed)  # a used iterator can be rewound too
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)


@pytest.mark.parametrize("change, message", [
    (dict(seed=12), "saved for another pipeline"),
    (dict(global_batch_size=3), "saved for another pipeline"),
    (dict(value_range=(-1, 1)), "saved for another pipeline"),
])
def test_state_of_another_pipeline_is_refused(db, change, message):
  kwargs = dict(global_batch_size=6, image_size=16, seed=11)
  with make_train_iterator(db, **kwargs) as it:
    next(it)
    state = it.get_state()
  with make_train_iterator(db, **{**kwargs, **change}) as other:
    with pytest.raises(ConfigError, match=message):
      other.set_state(state)
    with pytest.raises(ConfigError, match="not a TrainIterator state"):
      other.set_state(b'{"step": 1}')


def test_reference_format_feeds_the_same_pipeline(db, tmp_path):
  paths = [v["path"] for v in SliceDataSource(db).volumes]
  ref = write_slice_database(write_csv(tmp_path / "t.csv", paths), tmp_path / "ref",
                             reference_compatible=True, progress=False)
  kwargs = dict(global_batch_size=5, image_size=16, seed=2)
  with make_train_iterator(db, **kwargs) as a, make_train_iterator(ref, **kwargs) as b:
    for x, y in zip(_take(a, 4), _take(b, 4)):
      np.testing.assert_allclose(x["image"], y["image"], atol=1e-7)


def test_epoch_shuffle_pickles_and_maps_positions():
  order = EpochShuffle(5, seed=3)
  clone = pickle.loads(pickle.dumps(order))
  positions = np.arange(3, 13)  # epochs 0, 1, 2
  expected = np.concatenate([np.random.default_rng([3, e]).permutation(5) for e in range(3)])
  np.testing.assert_array_equal(clone(positions), expected[3:13])
  np.testing.assert_array_equal(order(positions), expected[3:13])
  with pytest.raises(ConfigError, match="seed must be in"):
    EpochShuffle(5, seed=-1)


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=5, process_count=2), "multiple of process_count 2"),
    (dict(global_batch_size=0), "positive multiple"),
    (dict(global_batch_size=4, process_index=2, process_count=2), r"process_index 2 not in"),
])
def test_bad_pipeline_config(db, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    make_train_iterator(db, image_size=16, seed=0, **kwargs)


def test_worker_process_gives_the_same_batches_and_resumes(db):
  """The one test with a spawned grain worker (slow start); resumes across worker counts."""
  kwargs = dict(global_batch_size=4, image_size=16, seed=5)
  with make_train_iterator(db, **kwargs) as inline:
    expected = _take(inline, 6)
    state = inline.get_state()
    expected_after = _take(inline, 2)
  with make_train_iterator(db, worker_count=1, **kwargs) as it:
    got = _take(it, 6)
    it.set_state(state)
    got_after = _take(it, 2)
  _assert_same(got, expected)
  _assert_same(got_after, expected_after)
  it.close()  # idempotent; a closed iterator refuses to continue
  with pytest.raises(ValueError, match="closed"):
    next(it)
