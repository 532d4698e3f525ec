"""Split CSVs and participants.tsv metadata (data.md §4, §12, §14.6)."""

from pathlib import Path

import pytest

from data_helpers import make_cohort, write_csv
from uad_jax.data.splits import SubjectRecord, read_participants, read_split, write_split
from uad_jax.errors import DataError


def test_reads_paths_in_order_with_participants_metadata(tmp_path):
  paths = make_cohort(tmp_path / "ds", 3)
  csv = write_csv(tmp_path / "train.csv", [paths[2], paths[0], paths[1]])
  records = read_split(csv)
  assert [r.path for r in records] == [paths[2], paths[0], paths[1]]
  assert [r.subject for r in records] == ["sub-002", "sub-000", "sub-001"]
  assert all(r.modality == "T1w" for r in records)
  assert records[0].meta == {"dataset": None, "scanner": "scanner2", "age": 22.5, "sex": "F",
                             "lesion_type": None, "lesion_volume_ml": None}


def test_csv_columns_override_participants_and_empty_cells_do_not(tmp_path):
  paths = make_cohort(tmp_path / "ds", 2)
  csv = write_csv(tmp_path / "s.csv", paths,
                  header=("Path", "scanner", "age", "dataset", "site_note"),
                  extra_rows=[["siteX", "", "IXI", "a"], ["", "61", "IXI", ""]])
  a, b = read_split(csv)
  assert (a.meta["scanner"], a.meta["age"], a.meta["dataset"]) == ("siteX", 20.5, "IXI")
  assert (b.meta["scanner"], b.meta["age"]) == ("scanner1", 61.0)
  assert a.meta["site_note"] == "a" and b.meta["site_note"] is None


def test_no_participants_tsv_gives_none_metadata(tmp_path):
  (path,) = make_cohort(tmp_path / "ds", 1, participants=False)
  (r,) = read_split(write_csv(tmp_path / "s.csv", [path]))
  assert r.subject == "sub-000" and set(r.meta.values()) == {None}


def test_participants_tsv_found_above_session_folders(tmp_path):
  root = tmp_path / "ds"
  (path,) = make_cohort(root, 1)
  ses = root / "sub-000" / "ses-1" / "anat" / "sub-000_ses-1_T1w.nii.gz"
  ses.parent.mkdir(parents=True)
  ses.write_bytes(path.read_bytes())
  (r,) = read_split(write_csv(tmp_path / "s.csv", [ses]))
  assert r.subject == "sub-000" and r.meta["scanner"] == "scanner0"


def test_header_less_csv_is_an_error_that_says_how_to_fix_it(tmp_path):  # §14.6, issue
  # data.md §14.6 says "detected and its first row kept"; the issue makes a header-less file an
  # error that explains the fix, so the first subject can never be silently dropped either way.
  paths = make_cohort(tmp_path / "ds", 2)
  csv = write_csv(tmp_path / "ATLAS_lower.csv", paths, header=None)
  with pytest.raises(DataError, match=r"ATLAS_lower.csv: no header line; the first line looks "
                                      r"like a NIfTI path .*sub-000_T1w.nii.gz.*Add a first line "
                                      r"'Path'"):
    read_split(csv)
  fixed = tmp_path / "fixed.csv"
  fixed.write_text("Path\n" + csv.read_text())
  assert [r.path for r in read_split(fixed)] == paths


def test_other_header_falls_back_to_first_column_with_a_warning(tmp_path):
  paths = make_cohort(tmp_path / "ds", 2)
  csv = write_csv(tmp_path / "s.csv", paths, header=("filename",))
  with pytest.warns(UserWarning, match="no 'Path' column"):
    records = read_split(csv)
  assert [r.path for r in records] == paths


def test_relative_paths_are_relative_to_the_csv(tmp_path):
  paths = make_cohort(tmp_path / "ds", 1)
  csv = tmp_path / "s.csv"
  csv.write_text("Path\nds/sub-000/anat/sub-000_T1w.nii.gz\n")
  assert read_split(csv)[0].path == paths[0]


@pytest.mark.parametrize("content, message", [
    ("", "empty split CSV"),
    ("\n\n", "empty split CSV"),
    ("Path\n", "has a header but no image paths"),
    ("Path\n/d/sub-1/anat/sub-1_T1w.nii.gz\n/d/sub-2/anat/sub-2_T1w.nii.gz\n"
     "/d/sub-1/anat/../anat/sub-1_T1w.nii.gz\n",
     "duplicate path /d/sub-1/anat/sub-1_T1w.nii.gz on lines 2 and 4"),
    ("Path\n/d/sub-1/anat/sub-1_T1w.nii.gz\n/d/sub-2/anat/sub-2_T2w.nii.gz\n",
     r"mixed modalities \['T1w', 'T2w'\]"),
    ("Path,age\n/d/sub-1/anat/sub-1_T1w.nii.gz,old\n", "line 2: column 'age' must be a number"),
    ("Path,age\n,3\n", "line 2 has an empty 'Path' value"),
], ids=["empty", "blank", "header-only", "duplicate", "mixed", "bad-age", "empty-path"])
def test_bad_csvs_raise_naming_the_file(tmp_path, content, message):
  csv = tmp_path / "split.csv"
  csv.write_text(content)
  with pytest.raises(DataError, match=message) as info:
    read_split(csv)
  assert str(csv) in str(info.value)


def test_missing_csv(tmp_path):
  with pytest.raises(DataError, match="nope.csv: split CSV not found"):
    read_split(tmp_path / "nope.csv")


def test_write_then_read_round_trips(tmp_path):
  paths = make_cohort(tmp_path / "ds", 3, participants=False)
  records = [SubjectRecord(p, f"sub-{i:03d}", "T1w",
                           {"dataset": "demo", "scanner": "s1", "age": 1 / 3 + i, "sex": None,
                            "lesion_type": None, "lesion_volume_ml": 12.5, "batch": "b7"})
             for i, p in enumerate(paths)]
  out = tmp_path / "out" / "split.csv"
  write_split(out, records)
  assert out.read_text().splitlines()[0] == (
      "Path,subject,dataset,scanner,age,sex,lesion_type,lesion_volume_ml,batch")
  assert read_split(out) == records
  assert not list(out.parent.glob(".*tmp*"))


def test_participants_reader(tmp_path):
  tsv = tmp_path / "participants.tsv"
  tsv.write_text("participant_id\tage\tsex\tlesion_volume_ml\n007\t6\tM\tn/a\nsub-8\tn/a\tF\t3.5\n")
  assert read_participants(tsv) == {
      "sub-007": {"age": 6.0, "sex": "M", "lesion_volume_ml": None},
      "sub-8": {"age": None, "sex": "F", "lesion_volume_ml": 3.5}}
  bad = tmp_path / "bad.tsv"
  bad.write_text("id\tage\n1\t2\n")
  with pytest.raises(DataError, match="bad.tsv: a BIDS participants.tsv needs"):
    read_participants(bad)


def test_record_paths_are_absolute_paths(tmp_path):
  paths = make_cohort(tmp_path / "ds", 1)
  (r,) = read_split(write_csv(tmp_path / "s.csv", paths))
  assert isinstance(r.path, Path) and r.path.is_absolute()
