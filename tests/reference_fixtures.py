"""Discovery and loading of the reference parity fixtures.

Fixtures live under `$UAD_FIXTURES_DIR/<area>/<name>.{json,npz}` (default: the project's copy in
`tests/fixtures/reference/`). Tests glob an area and dispatch on each sidecar's `kind`.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

DEFAULT_DIR = Path(__file__).parent / "fixtures" / "reference"


def fixtures_dir() -> Path:
  return Path(os.environ.get("UAD_FIXTURES_DIR", DEFAULT_DIR))


def discover(area: str) -> list[Path]:
  """All sidecar JSON paths of one area, sorted; an empty area is an error (nothing tested)."""
  paths = sorted((fixtures_dir() / area).glob("*.json"))
  if not paths:
    raise FileNotFoundError(f"no fixtures under {fixtures_dir() / area}")
  return paths


class Fixture:
  """One fixture: `meta` (the JSON sidecar) and its arrays split into params/inputs/outputs."""

  def __init__(self, json_path: Path):
    self.path = Path(json_path)
    self.meta = json.loads(self.path.read_text())
    self.kind = self.meta["kind"]
    with np.load(self.path.with_suffix(".npz"), allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
    self.params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    self.inputs = {k[len("in/"):]: v for k, v in arrays.items() if k.startswith("in/")}
    self.outputs = {k[len("out/"):]: v for k, v in arrays.items() if k.startswith("out/")}
    self.tolerance = self.meta.get("tolerance", {"rtol": 0.0, "atol": 0.0})

  @property
  def name(self) -> str:
    return self.path.stem

  @property
  def state_dict(self) -> dict:
    """The reference state_dict in its recorded key order (buffers included)."""
    return {k: self.params[k] for k, _, _ in self.meta.get("state_dict", [])}

  def __repr__(self):
    return f"Fixture({self.path.parent.name}/{self.name}, kind={self.kind})"


def load_area(area: str) -> list[Fixture]:
  return [Fixture(p) for p in discover(area)]


def run_check(fx: Fixture, checks: dict) -> None:
  """Runs `checks[fx.kind](fx)` at float32 matmul precision; an unknown kind fails the test."""
  if fx.kind not in checks:
    pytest.fail(f"{fx}: unknown fixture kind {fx.kind!r}")
  with jax.default_matmul_precision("highest"):
    checks[fx.kind](fx)
