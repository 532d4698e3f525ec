"""The whole report: CLI, figure files, index.html rendered in headless Chromium, TensorBoard."""

import html.parser
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing import event_accumulator

import report_synthetic
from uad_jax.report import __main__ as cli
from uad_jax.report import figures, load, tables, write

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  """Two synthetic runs (ANDi, RD) -> report via the command line."""
  root = tmp_path_factory.mktemp("runs")
  andi, _ = report_synthetic.make_run(root, "ANDi")
  rd, _ = report_synthetic.make_run(root, "RD", signal=0.5, seed=1)
  out = root / "report"
  (out / "stale").mkdir(parents=True)   # replaced as a whole
  code = cli.main(["--runs", str(andi), str(rd / "eval" / "step_5"), "--out", str(out),
                   "--resamples", "200"])
  assert code == 0
  return out, andi, rd


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.images, self.links, self.tables = [], [], 0

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if tag == "img":
      self.images.append(attrs)
    elif tag == "a" and not attrs.get("href", "#").startswith("#"):
      self.links.append(attrs["href"])
    elif tag == "table":
      self.tables += 1


def _parse(text: str) -> _Links:
  p = _Links()
  p.feed(text)
  return p


def test_layout_and_every_figure_file(report):
  out, _, _ = report
  assert not (out / "stale").exists()
  assert not list(out.parent.glob(".report.tmp-*"))
  for name in ("summary.csv", "bias_strata.csv", "bias_tests.csv", "subjects.csv",
               "segmentation.md", "detection.md", "healthy.md", "bias_strata.md",
               "bias_tests.md"):
    assert (out / "tables" / name).stat().st_size > 100, name
  names = {p.stem for p in (out / "figures").iterdir()}
  want = {"dice_overview_raw", "dice_overview_mf", "precision_recall_T1w"}
  for run in ("ANDi", "RD"):
    want |= {f"thresholds_{run}_T1w", f"examples_{run}_T1w_test-tumour",
             f"examples_{run}_T1w_test-ms"}
    want |= {f"{kind}_{run}_T1w_{p}" for kind in ("strata", "fpr_age") for p in ("raw", "mf")}
  assert names == want
  for name in names:
    png = (out / "figures" / f"{name}.png").read_bytes()
    svg = (out / "figures" / f"{name}.svg").read_text()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000, name
    assert "<svg" in svg and svg.rstrip().endswith("</svg>") and len(svg) > 10_000, name


def test_tables_report_small_strata_as_such(report):
  out, _, _ = report
  strata = pd.read_csv(out / "tables" / "bias_strata.csv")
  small = strata[strata["n"] < 3]
  assert len(small) and (small["note"] == "n < 3").all() and small["value"].isna().all()
  assert "n < 3" in (out / "tables" / "bias_strata.md").read_text()
  summary = pd.read_csv(out / "tables" / "summary.csv")
  assert set(summary["run"]) == {"ANDi", "RD"}
  dice = summary[(summary["metric"] == "dice") & (summary["role"] == "best")]
  assert ((dice["ci_low"] <= dice["value"]) & (dice["value"] <= dice["ci_high"])).all()
  tests = pd.read_csv(out / "tables" / "bias_tests.csv")
  assert {"scanner", "lesion type", "lesion-size quartile", "age bin", "sex",
          "age (years)"} <= set(tests["factor"])


def test_index_references_every_figure_and_table(report):
  out, _, _ = report
  page = _parse((out / "index.html").read_text())
  pngs = {i["src"] for i in page.images}
  assert pngs == {f"figures/{p.name}" for p in (out / "figures").glob("*.png")}
  assert {f"figures/{p.name}" for p in (out / "figures").glob("*.svg")} <= set(page.links)
  for link in page.links:
    assert (out / link).is_file(), link
  # ranking, segmentation, detection, healthy, tests run and not run, strata of 2 runs x 2
  # postprocs
  assert page.tables == 6 + 4
  assert "http://" not in (out / "index.html").read_text().replace("http://www.w3.org", "")


def _render(index: Path) -> str:
  chromium = shutil.which("chromium")
  if chromium is None:
    pytest.fail("chromium is not installed: `apt-get install -y chromium` (Debian package; "
                ".ci/run installs it) is needed to render index.html")
  with tempfile.TemporaryDirectory() as profile:
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                           "--virtual-time-budget=10000", "--dump-dom", index.as_uri()],
                          capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  return done.stdout


def _body_marks(dom: str) -> dict:
  page = _parse(dom)
  marks = {}

  class Body(html.parser.HTMLParser):
    def handle_starttag(self, tag, attrs):
      if tag == "body":
        marks.update(dict(attrs))

  Body().feed(dom)
  marks["loaded"] = [i.get("data-loaded") for i in page.images]
  return marks


def test_index_renders_in_headless_chromium_with_every_figure(report):
  out, _, _ = report
  marks = _body_marks(_render(out / "index.html"))
  n = len(list((out / "figures").glob("*.png")))
  assert marks.get("data-images-checked") == str(n), "the page's image check did not run"
  assert marks.get("data-images-broken") == "0"
  assert marks["loaded"] == ["true"] * n


def test_chromium_check_sees_a_missing_figure(report, tmp_path):
  out, _, _ = report
  copy = tmp_path / "copy"
  shutil.copytree(out, copy)
  (copy / "figures" / "dice_overview_raw.png").unlink()
  marks = _body_marks(_render(copy / "index.html"))
  assert marks.get("data-images-broken") == "1"
  assert marks["loaded"].count("false") == 1


def test_figures_in_tensorboard(report):
  out, andi, rd = report
  for workdir, run, other in ((andi, "ANDi", "RD"), (rd, "RD", "ANDi")):
    acc = event_accumulator.EventAccumulator(
        str(workdir / "tensorboard" / "report"), size_guidance={event_accumulator.IMAGES: 0})
    acc.Reload()
    tags = set(acc.Tags()["images"])
    assert {"report/dice_overview_raw", f"report/strata_{run}_T1w_raw",
            f"report/examples_{run}_T1w_test-ms", "report/precision_recall_T1w"} <= tags
    assert not any(other in t for t in tags)
    event = acc.Images("report/dice_overview_raw")[-1]
    assert event.step == 5 and event.width > 500
    assert "report/summary/text_summary" in acc.Tags()["tensors"]


def test_failed_report_keeps_the_previous_one(report, tmp_path, monkeypatch):
  out, andi, _ = report
  previous = tmp_path / "previous"
  shutil.copytree(out, previous)

  def broken(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(figures, "save", broken)
  with pytest.raises(RuntimeError, match="disk full"):
    write.write_report([andi], previous, options=tables.Options(n_resamples=20),
                       write_tensorboard=False)
  assert (previous / "index.html").read_bytes() == (out / "index.html").read_bytes()
  assert not list(tmp_path.glob(".previous.tmp-*"))


def _lines(ax):
  return [(np.asarray(l.get_xdata(), float), np.asarray(l.get_ydata(), float), l.get_linestyle())
          for l in ax.get_lines()]


def test_precision_recall_figure_draws_the_stored_curves(report, tmp_path):
  _, andi, _ = report
  cohorts = load.load_cohorts([andi])
  lesion = {c.cohort: c for c in cohorts if c.mode == "lesion"}
  fig = figures.pr_curves(cohorts, "T1w")
  panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible() and ax.get_title()}
  assert set(panels) == set(lesion)
  for name, c in lesion.items():
    drawn = _lines(panels[name])
    for p, style in (("raw", "-"), ("mf", "--")):
      curve = c.summary(p)["curves"]
      assert any(ls == style and np.array_equal(x, curve["recall"])
                 and np.array_equal(y, curve["precision"]) for x, y, ls in drawn), (name, p)
    assert f"{c.summary('raw')['auprc']:.3f}" in panels[name].texts[0].get_text()
  # Outputs written before the curves were stored: the sweep points, joined by a line.
  old = tmp_path / "old"
  shutil.copytree(andi / "eval" / "step_5" / "test_ms", old)
  doc = json.loads((old / "results.json").read_text())
  for p in ("raw", "mf"):
    del doc[p]["curves"]
  (old / "results.json").write_text(json.dumps(doc))
  c = load.load_cohorts([old])[0]
  assert not figures.has_curves(c) and figures.has_curves(lesion["test_ms"])
  drawn = _lines(figures.pr_curves([c], "T1w").axes[0])
  assert [ls for x, _, ls in drawn if x.size == len(c.sweep[0])] == ["-", "--"]


def test_cli_error_message(tmp_path, capsys):
  assert cli.main(["--runs", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
  assert "no results.json" in capsys.readouterr().err


def test_figures_and_tables_are_deterministic(report, tmp_path):
  out, andi, rd = report
  summary = pd.read_csv(out / "tables" / "summary.csv", dtype={"role": str,
                                                               "threshold_key": str},
                        keep_default_na=False, na_values=[""])
  for d in ("a", "b"):
    figures.save(figures.dice_overview(summary, "raw"), tmp_path / d, "overview")
  for ext in ("png", "svg"):
    assert ((tmp_path / "a" / f"overview.{ext}").read_bytes()
            == (tmp_path / "b" / f"overview.{ext}").read_bytes())
  cohorts = write.load.load_cohorts([andi, rd])
  subjects = tables.add_strata(write.load.subject_table(cohorts))
  again = tables.summary_table(cohorts, subjects, tables.Options(n_resamples=200))
  assert again.to_csv(index=False) == (out / "tables" / "summary.csv").read_text()
