"""`uad_jax.tools.import_torch`: a reference accelerate checkpoint folder -> a uad_jax workdir."""

import numpy as np
import pytest
from safetensors.numpy import save_file

from andi_config import fixture_config
from reference_fixtures import load_area
from uad_jax.engine import evaluate, sharding
from uad_jax.errors import DataError
from uad_jax.methods import andi
from uad_jax.tools import import_torch

FORWARD = [f for f in load_area("andi") if f.kind == "ddpmpp_forward"]


def _reference_folder(tmp_path, fx, name="checkpoint_3"):
  src = tmp_path / name
  src.mkdir()
  # accelerate saves the DDP-wrapped model: keys carry a `module.` prefix.
  save_file({f"module.{k}": np.ascontiguousarray(v) for k, v in fx.state_dict.items()},
            str(src / "model.safetensors"))
  return src


@pytest.mark.parametrize("fx", FORWARD, ids=lambda f: f.name)
def test_imported_checkpoint_reproduces_the_reference_forward(fx, tmp_path):
  config = fixture_config(fx.meta["config"])
  src = _reference_folder(tmp_path, fx)
  step_dir = import_torch.import_checkpoint("andi", src, tmp_path / "run", config,
                                            ema_from_model=True)
  assert step_dir.name == str(3 * config.training.snapshot_freq)   # checkpoint_<k>

  mesh = sharding.make_mesh()
  states, step, _, meta = evaluate.restore_states(config, andi.METHOD, tmp_path / "run", None,
                                                  mesh)
  params = andi.METHOD.scoring_params(config, states, {})
  assert step == 3 * config.training.snapshot_freq
  assert any("--ema-from-model" in w for w in meta["warnings"])
  x = np.moveaxis(fx.inputs["z_t"], 1, -1)
  y = andi.build_model(config).apply({"params": params}, x, fx.inputs["t"], train=False)
  np.testing.assert_allclose(np.moveaxis(np.asarray(y), -1, 1), fx.outputs["v_pred"],
                             **fx.tolerance)


def test_missing_or_unreadable_ema_is_a_clear_error(tmp_path):
  fx = FORWARD[0]
  config = fixture_config(fx.meta["config"])
  src = _reference_folder(tmp_path, fx)
  with pytest.raises(DataError, match="--ema-from-model"):
    import_torch.import_checkpoint("andi", src, tmp_path / "run", config)
  (src / "custom_checkpoint_0.pkl").write_bytes(b"not a torch file")
  with pytest.raises(DataError, match="custom_checkpoint_0.pkl: not a PyTorch file"):
    import_torch.import_checkpoint("andi", src, tmp_path / "run", config)


def test_wrong_model_config_names_the_key(tmp_path):
  fx = FORWARD[0]
  config = fixture_config(fx.meta["config"])
  config.model.nf = 2 * config.model.nf
  with pytest.raises(DataError, match="shape"):
    import_torch.import_checkpoint("andi", _reference_folder(tmp_path, fx), tmp_path / "run",
                                   config, ema_from_model=True)


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
  assert import_torch.main(["--method", "andi", "--src", str(tmp_path / "missing"),
                            "--out", str(tmp_path / "run")]) == 2
  assert "not a checkpoint folder" in capsys.readouterr().err
