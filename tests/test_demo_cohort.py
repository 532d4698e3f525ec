"""Tests of the demo cohort generator (spec: demo_cohort.md "Guarantees", data.md §3, §4, §7)."""

import csv
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage, stats

from uad_jax.data.demo import cohort as demo_cohort
from uad_jax.data.demo import anatomy as synth_anatomy
from uad_jax.data.demo import contrast as synth_contrast
from uad_jax.data.demo import lesions as synth_lesions
from uad_jax.data.demo import scanners as synth_scanners
from uad_jax.errors import ConfigError, DataError

# A coarse grid keeps the generation-heavy tests fast; content tests use the real demo grid.
COARSE = synth_anatomy.Geometry("test-4mm", 4.0, (60, 60, 39))
SMALL_SCALE = 0.1  # one to three subjects per split


def _read_csv(path, delimiter=","):
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter=delimiter))
  return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def _hashes(root: Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """The default (demo) geometry at a reduced scale, generated through the CLI."""
  out = tmp_path_factory.mktemp("demo") / "cohort"
  assert demo_cohort.main(["--out", str(out), "--scale", str(SMALL_SCALE), "--seed", "0",
                           "--no-progress"]) == 0
  _, participants = _read_csv(out / "bids" / "participants.tsv", delimiter="\t")
  return out, participants


def _load(path):
  image = nib.load(str(path))
  return image, np.asarray(image.dataobj)


def _subject_files(root, participant_id):
  anat = root / "bids" / participant_id / "anat"
  return {m: anat / f"{participant_id}_{m}.nii.gz" for m in demo_cohort.MODALITIES}, (
      anat / f"{participant_id}_seg-anomaly_mask.nii.gz")


def test_plan_counts_balance_and_confounding():
  plans = demo_cohort.plan_cohort(seed=3, scale=1.0)
  counts = {s: sum(p.split == s for p in plans) for s in demo_cohort.SPLITS}
  assert counts == demo_cohort.BASE_COUNTS
  assert len({p.participant_id for p in plans}) == len(plans) == 62
  for split in demo_cohort.SPLITS:
    sexes = [p.sex for p in plans if p.split == split]
    assert abs(sexes.count("F") - sexes.count("M")) <= 1, split
  scanners = synth_scanners.SCANNERS_BY_NAME
  for p in plans:
    assert 6.0 <= p.age <= 89.0
    low, high = scanners[p.scanner].age_range
    assert low <= p.age <= high  # every site scans only its recruitment range
    if p.lesion_type is None:
      assert p.size_quantile is None
    else:
      low, high = demo_cohort.LESION_AGE_RANGES[p.lesion_type]
      assert low <= p.age <= high
  train_scanners = [p.scanner for p in plans if p.split == "train"]
  assert {train_scanners.count(s) for s in scanners} == {10}
  # Scanner and age are confounded on purpose: S1 young, S3 old.
  mean_age = {s: np.mean([p.age for p in plans if p.scanner == s and p.lesion_type is None])
              for s in scanners}
  assert mean_age["S1"] < mean_age["S2"] < mean_age["S3"]
  assert {p.lesion_type for p in plans if p.split == "val_lesion"} == set(
      synth_lesions.LESION_TYPES)
  # Lesion sizes are stratified: one size quantile per stratum within each test split.
  for kind in synth_lesions.LESION_TYPES:
    q = sorted(p.size_quantile for p in plans if p.split == f"test_{kind}")
    assert [int(v * len(q)) for v in q] == list(range(len(q)))


def test_scale_multiplies_counts():
  assert demo_cohort.split_counts(2.0)["train"] == 60
  assert min(demo_cohort.split_counts(0.01).values()) == 1
  with pytest.raises(ConfigError, match="scale"):
    demo_cohort.split_counts(0.0)


def test_participants_match_files(cohort):
  root, participants = cohort
  header, _ = _read_csv(root / "bids" / "participants.tsv", delimiter="\t")
  assert tuple(header) == demo_cohort.PARTICIPANT_COLUMNS
  plans = demo_cohort.plan_cohort(seed=0, scale=SMALL_SCALE)
  assert [r["participant_id"] for r in participants] == [p.participant_id for p in plans]
  assert sorted(p.name for p in (root / "bids").glob("sub-*")) == [
      r["participant_id"] for r in participants]
  for row, plan in zip(participants, plans):
    assert (row["age"], row["sex"], row["scanner"], row["cohort"]) == (
        f"{plan.age:.1f}", plan.sex, plan.scanner, plan.split)
    images, mask_path = _subject_files(root, row["participant_id"])
    assert all(p.is_file() for p in images.values())
    if row["lesion_type"] == "n/a":
      assert row["lesion_volume_ml"] == "n/a"
      assert not mask_path.exists()  # healthy subjects have no mask file
    else:
      assert row["lesion_type"] == plan.lesion_type
      image, mask = _load(mask_path)
      voxel_ml = np.prod(image.header.get_zooms()) / 1000.0
      assert float(row["lesion_volume_ml"]) == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
  description = json.loads((root / "demo_cohort.json").read_text())
  assert description["seed"] == 0 and description["version"] == demo_cohort.VERSION
  assert description["geometry"] == synth_anatomy.GEOMETRIES["demo"].to_json()
  assert description["counts"] == demo_cohort.split_counts(SMALL_SCALE)
  bids_description = json.loads((root / "bids" / "dataset_description.json").read_text())
  assert "BIDSVersion" in bids_description


def test_split_csvs_reference_existing_subjects(cohort):
  root, participants = cohort
  by_id = {r["participant_id"]: r for r in participants}
  seen = set()
  for split in demo_cohort.SPLITS:
    for modality in demo_cohort.MODALITIES:
      header, rows = _read_csv(root / "splits" / f"{split}_{modality}.csv")
      assert tuple(header) == demo_cohort.CSV_COLUMNS
      assert rows, f"{split}_{modality} is empty"
      for row in rows:
        path = Path(row["Path"])
        assert path.is_absolute() and path.is_file()
        assert path.name == f"{row['subject']}_{modality}.nii.gz"
        meta = by_id[row["subject"]]
        assert meta["cohort"] == split
        assert (row["scanner"], row["age"], row["sex"], row["lesion_type"]) == (
            meta["scanner"], meta["age"], meta["sex"], meta["lesion_type"])
        if split.startswith("test_") and split != "test_healthy":
          assert row["lesion_type"] == split[len("test_"):]
        seen.add(row["subject"])
  assert seen == set(by_id)


def test_volume_contract(cohort):
  root, participants = cohort
  geometry = synth_anatomy.GEOMETRIES["demo"]
  for row in participants:
    images, mask_path = _subject_files(root, row["participant_id"])
    brains = []
    for path in images.values():
      image, data = _load(path)
      assert data.dtype == np.int16 and data.shape == geometry.shape
      np.testing.assert_allclose(image.affine, geometry.affine)
      assert image.header.get_zooms() == (2.0, 2.0, 2.0)
      assert data.min() == 0  # data.md §5.2: the minimum must be the background value
      brain = data > 0
      brains.append(brain)
      # Background is exactly 0: everything outside the (single, centred) brain component.
      assert ndimage.label(brain)[1] == 1
      centre = np.argwhere(brain).mean(0)
      assert np.all(np.abs(centre[:2] - (np.array(geometry.shape[:2]) - 1) / 2) < 8)
      assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any()
    np.testing.assert_array_equal(brains[0], brains[1])  # T1w and T2w share one brain mask
    if mask_path.exists():
      image, mask = _load(mask_path)
      assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
      np.testing.assert_allclose(image.affine, geometry.affine)
      assert not (mask.astype(bool) & ~brains[0]).any()  # masks lie inside the brain


def test_lesion_contrast_direction(cohort):
  root, participants = cohort
  lesion_rows = [r for r in participants if r["lesion_type"] != "n/a"]
  assert {r["lesion_type"] for r in lesion_rows} == set(synth_lesions.LESION_TYPES)
  for row in lesion_rows:
    images, mask_path = _subject_files(root, row["participant_id"])
    mask = _load(mask_path)[1].astype(bool)
    t1 = _load(images["T1w"])[1].astype(np.float64)
    t2 = _load(images["T2w"])[1].astype(np.float64)
    ring = ndimage.binary_dilation(mask, iterations=2) & ~mask & (t1 > 0)
    kind = row["lesion_type"]
    # T2w hyperintense against the surrounding tissue for every type.
    assert t2[mask].mean() > 1.1 * np.median(t2[ring]), kind
    if kind in ("tumour", "stroke"):
      assert t1[mask].mean() < (0.9 if kind == "tumour" else 0.7) * np.median(t1[ring]), kind
    else:
      assert t1[mask].mean() < 1.02 * np.median(t1[ring]), kind  # iso- to hypointense


def _generate_coarse(out, seed):
  return demo_cohort.generate(out, seed=seed, geometry=COARSE, scale=SMALL_SCALE,
                              progress=False)


def test_same_seed_byte_identical_and_different_seed_differs(tmp_path):
  out = tmp_path / "cohort"
  _generate_coarse(out, seed=7)
  first = _hashes(out)
  out.rename(tmp_path / "first")
  _generate_coarse(out, seed=7)
  assert _hashes(out) == first
  assert len(first) > 20

  other = tmp_path / "other"
  _generate_coarse(other, seed=8)
  second = _hashes(other)
  assert second.keys() == first.keys()
  volumes = [k for k in first if k.endswith("_T1w.nii.gz")]
  assert all(first[k] != second[k] for k in volumes)
  assert (out / "bids" / "participants.tsv").read_text() != (
      other / "bids" / "participants.tsv").read_text()


def test_reuse_refuse_and_overwrite(tmp_path):
  out = tmp_path / "cohort"
  paths = _generate_coarse(out, seed=0)
  assert set(paths) == {f"{s}_{m}" for s in demo_cohort.SPLITS for m in demo_cohort.MODALITIES}
  stamp = (out / "demo_cohort.json").stat().st_mtime_ns
  assert _generate_coarse(out, seed=0) == paths  # the same cohort is reused, not regenerated
  assert (out / "demo_cohort.json").stat().st_mtime_ns == stamp
  with pytest.raises(DataError, match="different demo cohort"):
    _generate_coarse(out, seed=1)
  demo_cohort.generate(out, seed=1, geometry=COARSE, scale=SMALL_SCALE, progress=False,
                       overwrite=True)
  assert json.loads((out / "demo_cohort.json").read_text())["seed"] == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]

  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "notes.txt").write_text("keep me")
  with pytest.raises(DataError, match="not a demo cohort"):
    demo_cohort.generate(foreign, geometry=COARSE, scale=SMALL_SCALE, progress=False,
                         overwrite=True)
  assert (foreign / "notes.txt").read_text() == "keep me"
  assert demo_cohort.main(["--out", str(foreign), "--no-progress"]) == 2


def test_interrupted_run_leaves_no_cohort(tmp_path, monkeypatch):
  real = demo_cohort.synthesise_subject
  calls = []

  def failing(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(demo_cohort, "synthesise_subject", failing)
  with pytest.raises(KeyboardInterrupt):
    _generate_coarse(tmp_path / "cohort", seed=0)
  assert list(tmp_path.iterdir()) == []


def test_acquire_never_goes_below_background():
  rng = np.random.default_rng(0)
  brain = np.zeros((12, 12, 8), bool)
  brain[2:10, 2:10, 1:7] = True
  image = np.where(brain, rng.uniform(0.0, 2.0, brain.shape), 0.0).astype(np.float32)
  image[4, 4, 4] = 0.0  # dark brain voxel, e.g. a lesion core after gamma
  noisy = synth_scanners.ScannerRecipe("X", "very noisy", (6.0, 89.0), {"T1w": 50.0},
                                       {"T1w": 1.2}, 0.3, 1, 0.5, (0.7, 0.7, 0.7))
  axes = tuple(np.arange(n, dtype=np.float32) * 2.0 for n in brain.shape)
  out = synth_scanners.acquire(image, brain, axes, noisy, "T1w", rng)
  assert out.dtype == np.int16
  assert out.min() == 0 and (out[~brain] == 0).all() and (out[brain] >= 1).all()


def _anatomies(ages, sexes, geometry=COARSE):
  template = synth_anatomy.load_template(geometry.voxel_mm)
  grid = synth_anatomy.output_grid(geometry, template)
  out = []
  for i, (age, sex) in enumerate(zip(ages, sexes)):
    rng = np.random.default_rng([99, i])
    params = synth_anatomy.sample_anatomy_params(rng, template, age=age, sex=sex)
    out.append((params, synth_anatomy.warp_subject(template, grid, params)))
  return template, out


def test_age_effect_ventricles_and_csf_grow():
  ages = np.linspace(20.0, 89.0, 10)
  template, subjects = _anatomies(ages, ["F", "M"] * 5)
  vs3 = COARSE.voxel_mm ** 3 / 1000.0
  csf = [a.csf.sum() * vs3 for _, a in subjects]
  # Ventricle volume: voxels whose template position lies in the template's ventricles.
  ventricles = [(ndimage.map_coordinates(template.ventricles, template.index_of(a.template_mm),
                                         order=1) >= 0.5).sum() * vs3 for _, a in subjects]
  assert stats.spearmanr(ages, csf).statistic > 0.8
  assert stats.spearmanr(ages, ventricles).statistic > 0.8
  assert np.mean(ventricles[-3:]) > 1.5 * np.mean(ventricles[:3])


def test_sex_effect_males_larger():
  sexes = ["F", "M"] * 10
  _, subjects = _anatomies([35.0] * 20, sexes)
  volume = np.array([a.brain.sum() for _, a in subjects], float)
  scale = np.array([p.head_scale for p, _ in subjects])
  male = np.array([s == "M" for s in sexes])
  assert volume[male].mean() > 1.06 * volume[~male].mean()  # ~4 % linear -> ~12 % volume
  assert stats.spearmanr(scale, volume).statistic > 0.9


def test_children_have_lower_grey_white_contrast():
  template, [(params, anatomy)] = _anatomies([30.0], ["F"])
  contrast = {}
  for myelination in (0.55, 1.0):
    t1 = synth_contrast.synthesise(anatomy, template, myelination=myelination,
                                   lesion=None)["T1w"]
    contrast[myelination] = (t1[anatomy.wm > 0.9].mean() - t1[anatomy.gm > 0.9].mean())
  assert params.myelination == 1.0
  assert contrast[0.55] < 0.7 * contrast[1.0]
  young = synth_anatomy.sample_anatomy_params(np.random.default_rng(0), template, age=6.0,
                                              sex="F")
  assert young.myelination == pytest.approx(0.55)


@pytest.mark.parametrize("quantile, volume_ml", [(0.05, 10 ** 0.1), (0.95, 10 ** 1.9)])
def test_stroke_volume_follows_size_quantile(quantile, volume_ml):
  geometry = synth_anatomy.GEOMETRIES["demo"]
  template = synth_anatomy.load_template(geometry.voxel_mm)
  grid = synth_anatomy.output_grid(geometry, template)
  rng = np.random.default_rng(5)
  params = synth_anatomy.sample_anatomy_params(rng, template, age=70.0, sex="M")
  plan = synth_lesions.plan_lesion("stroke", rng, template, quantile)
  anatomy = synth_anatomy.warp_subject(template, grid, params)
  lesion = synth_lesions.render_lesion(plan, anatomy, template,
                                       synth_contrast.normalised_tissue_levels(template))
  assert lesion.mask.sum() * 8 / 1000 == pytest.approx(volume_ml, rel=0.1)
