"""grain training pipeline: shapes, value ranges, seeded epochs, sharding, resumable state."""

import hashlib
import itertools
import json

import numpy as np
import pytest

from data_helpers import make_cohort, write_csv
from uad_jax.data import SliceDataSource, make_train_iterator, write_slice_database
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


def test_batches_shape_dtype_and_crop(db, fingerprints):
  with make_train_iterator(db, global_batch_size=5, image_size=16, seed=0) as it:
    batch = next(it)
    assert set(batch) == {"image"}
    assert batch["image"].shape == (5, 16, 16, 1) and batch["image"].dtype == np.float32
    assert it.local_batch_size == 5 and it.slices_per_epoch == N_SLICES
    src = SliceDataSource(db)
    first = fingerprints[_fp(batch["image"][0, ..., 0])]
    # 18x14 -> 16x16: rows cropped at offset round(1.0) = 1, columns padded 1 / 1.
    expected = np.zeros((16, 16), np.float32)
    expected[:, 1:15] = src[first]["image"][1:17, :]
    np.testing.assert_array_equal(batch["image"][0, ..., 0], expected)


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
  for e in epochs:
    assert sorted(e) == list(range(N_SLICES))  # each epoch: every slice exactly once
  assert len({tuple(e) for e in epochs}) == 4  # a new permutation every epoch
  assert epochs[0] != list(range(N_SLICES))  # shuffled
  with make_train_iterator(db, global_batch_size=8, image_size=16, seed=7) as again, \
      make_train_iterator(db, global_batch_size=8, image_size=16, seed=8) as other:
    assert _indices(_take(again, 10), fingerprints) == order
    assert _indices(_take(other, 10), fingerprints) != order


def test_sharding_by_process_splits_each_epoch(db, fingerprints):
  per_process = []
  for process_index in range(2):
    with make_train_iterator(db, global_batch_size=4, image_size=16, seed=1,
                             process_index=process_index, process_count=2) as it:
      assert it.local_batch_size == 2 and it.slices_per_epoch == N_SLICES // 2
      order = _indices(_take(it, 10), fingerprints)  # 2 local epochs of 10 slices
      assert sorted(order[:10]) == sorted(order[10:])
      per_process.append(set(order[:10]))
  assert per_process[0].isdisjoint(per_process[1])
  assert per_process[0] | per_process[1] == set(range(N_SLICES))


def test_resume_from_state_gives_exactly_the_same_batches(db, fingerprints):
  kwargs = dict(global_batch_size=6, image_size=16, seed=11)
  with make_train_iterator(db, **kwargs) as it:
    _take(it, 3)  # 18 slices: the next batches cross into epoch 2
    state = it.get_state()
    expected = _take(it, 4)
  assert isinstance(state, bytes) and json.loads(state)  # storable as JSON in a checkpoint
  with make_train_iterator(db, **kwargs) as resumed:
    resumed.set_state(state)
    got = _take(resumed, 4)
  for a, b in zip(got, expected):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_reference_format_feeds_the_same_pipeline(db, tmp_path):
  paths = [v["path"] for v in SliceDataSource(db).volumes]
  ref = write_slice_database(write_csv(tmp_path / "t.csv", paths), tmp_path / "ref",
                             reference_compatible=True, progress=False)
  kwargs = dict(global_batch_size=5, image_size=16, seed=2)
  with make_train_iterator(db, **kwargs) as a, make_train_iterator(ref, **kwargs) as b:
    for x, y in zip(_take(a, 4), _take(b, 4)):
      np.testing.assert_allclose(x["image"], y["image"], atol=1e-7)


@pytest.mark.parametrize("kwargs, message", [
    (dict(global_batch_size=5, process_count=2), "multiple of process_count 2"),
    (dict(global_batch_size=0), "positive multiple"),
    (dict(global_batch_size=4, process_index=2, process_count=2), r"process_index 2 not in"),
    (dict(global_batch_size=32, process_count=32), "20 slices cannot be shared by 32"),
])
def test_bad_pipeline_config(db, kwargs, message):
  with pytest.raises(ConfigError, match=message):
    make_train_iterator(db, image_size=16, seed=0, **kwargs)


def test_worker_process_gives_the_same_batches_and_resumes(db):
  """The one test with a spawned grain worker (slow start)."""
  kwargs = dict(global_batch_size=4, image_size=16, seed=5)
  with make_train_iterator(db, **kwargs) as inline:
    expected = _take(inline, 6)
  with make_train_iterator(db, worker_count=1, **kwargs) as it:
    got = _take(it, 3)
    state = it.get_state()
  with make_train_iterator(db, worker_count=1, **kwargs) as resumed:
    resumed.set_state(state)
    got += _take(resumed, 3)
  for a, b in itertools.zip_longest(got, expected):
    np.testing.assert_array_equal(a["image"], b["image"])
  resumed.close()  # idempotent; a closed iterator refuses to continue
  with pytest.raises(ValueError, match="closed"):
    next(resumed)
