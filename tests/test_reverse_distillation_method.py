"""Reverse Distillation beyond the fixtures: channel tables and parameter counts of the paper
student, the reference's initialisation, losses and maps against numpy, the train step (frozen
teacher, trainable BN, AdamW), scoring, the converter and the presets. Tiny shapes."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from safetensors.numpy import save_file

from configs import reverse_distillation as rd_config
from uad_jax.convert import reverse_distillation as convert
from uad_jax.errors import ConfigError, DataError
from uad_jax.methods import contract, get_method
from uad_jax.methods import reverse_distillation as rd
from uad_jax.networks import backbones, feature_extractor
from uad_jax.networks.rd_student import Student, StudentConfig, abstract_variables

PAPER = StudentConfig((256, 512, 1024), 128)
SMALL = StudentConfig((8, 16, 32), 4)


def tiny_config():
  return rd_config.get_config("tiny")


def count(tree) -> int:
  return int(sum(np.prod(a.shape) for a in jax.tree.leaves(tree)))


def test_paper_student_tables_and_parameter_count():
  """Spec §2.3-2.4 and §8: 2048-channel code, decoder tables, 83,802,624 trainable parameters
  (the reference's 92,195,328 less the dead conv4/bn4)."""
  assert (PAPER.ocbe_width, PAPER.ocbe_out) == (1024, 2048)
  assert PAPER.decoder_stages == ((2048, 512, 1024), (1024, 256, 512), (512, 128, 256))
  variables = abstract_variables(Student(PAPER))
  assert count(variables["params"]) == 83_802_624
  assert count(variables["params"]["ocbe"]) == 67_277_824 - 8_392_704
  assert count(variables["params"]["decoder"]) == 24_917_504
  code, outputs = jax.eval_shape(
      lambda v, t: Student(PAPER).apply(v, t), variables,
      [jax.ShapeDtypeStruct((1, 56 >> k, 56 >> k, c), jnp.float32)
       for k, c in enumerate((256, 512, 1024))])
  assert code.shape == (1, 7, 7, 2048)
  assert [o.shape for o in outputs] == [(1, 56, 56, 256), (1, 28, 28, 512), (1, 14, 14, 1024)]


def test_student_config_rejects_bad_tables():
  with pytest.raises(ConfigError):
    StudentConfig((8, 16), 4)
  with pytest.raises(ConfigError):
    StudentConfig((8, 16, 32), 0)


def test_reference_initialisation():
  """Convs Kaiming-normal fan_out, BN γ=1 β=0, ConvTranspose torch's uniform(±1/√(O·4)),
  running stats 0/1 (spec §2.5)."""
  cfg = StudentConfig((32, 64, 128), 32, ocbe_blocks=2, decoder_blocks=(2, 1, 1))
  taps = [jnp.zeros((2, 8 >> k, 8 >> k, c)) for k, c in enumerate(cfg.teacher_channels)]
  variables = jax.jit(Student(cfg).init)(jax.random.key(0), taps)
  flat = traverse_util.flatten_dict(variables["params"])
  for path, w in flat.items():
    if path[-1] == "scale":
      np.testing.assert_array_equal(w, 1.0)
    elif path[-1] == "bias":
      np.testing.assert_array_equal(w, 0.0)
    elif _is_deconv(path[:-1]):
      bound = 1.0 / np.sqrt(w.shape[-1] * 4)
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, path
    else:
      kh, kw, _, out = w.shape
      std = np.sqrt(2.0 / (out * kh * kw))
      if w.size > 2000:
        assert abs(np.std(w) / std - 1) < 0.1, path
  for path, s in traverse_util.flatten_dict(variables["batch_stats"]).items():
    np.testing.assert_array_equal(s, 0.0 if path[-1] == "mean" else 1.0)


def _numpy_cosine(u, v, axis):
  nu = np.maximum(np.sqrt((u.astype(np.float64) ** 2).sum(axis)), 1e-8)
  nv = np.maximum(np.sqrt((v.astype(np.float64) ** 2).sum(axis)), 1e-8)
  return (u.astype(np.float64) * v).sum(axis) / (nu * nv)


def _random_maps(rng, batch=3):
  return [rng.random((batch, 8 >> k, 8 >> k, c), np.float32) for k, c in enumerate((4, 8, 16))]


def test_losses_match_numpy_and_clamp_zero_vectors():
  rng = np.random.default_rng(0)
  f, r = _random_maps(rng), _random_maps(rng)
  r[1][2] = 0.0   # a zero student map: cos = 0 (norm clamped at eps), loss 1
  per_sample = sum(1 - _numpy_cosine(a, b, (1, 2, 3)) for a, b in zip(f, r))
  np.testing.assert_allclose(rd.per_sample_losses(f, r), per_sample, rtol=1e-6)
  np.testing.assert_allclose(rd.training_loss(f, r), per_sample.mean(), rtol=1e-6)
  maps = rd.one_minus_cosine_maps(f, r)
  for m, a, b in zip(maps, f, r):
    np.testing.assert_allclose(m, 1 - _numpy_cosine(a, b, -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps[1][2], 1.0)


def test_anomaly_maps_sum_align_corners_upsampling_and_zero_background():
  """Per-scale maps upsampled with align_corners=True (corners kept, linear in between) and
  summed; 0 exactly where the input is 0."""
  rng = np.random.default_rng(1)
  f, r = _random_maps(rng, 2), _random_maps(rng, 2)
  images = rng.random((2, 16, 16, 1), np.float32) + 0.1
  images[0, :3] = 0.0
  maps = np.asarray(rd.anomaly_maps(f, r, images))
  per_scale = [np.asarray(m) for m in rd.one_minus_cosine_maps(f, r)]
  corners = sum(m[:, [0, 0, -1, -1], [0, -1, 0, -1]] for m in per_scale)
  np.testing.assert_allclose(maps[1][[0, 0, -1, -1], [0, -1, 0, -1]], corners[1], rtol=1e-5)
  assert np.all(maps[0, :3] == 0) and np.all(maps[0, 3:] > 0)
  # align_corners=True on one axis n -> m: out[i] = x at src i (n-1)/(m-1).
  const = [np.ones_like(a) for a in f]
  np.testing.assert_allclose(rd.anomaly_maps(const, const, images)[1], 0.0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_state():
  config = tiny_config()
  return config, rd.init_state(config, jax.random.key(0), contract.TrainContext())


def test_state_keeps_the_teacher_frozen_outside_the_optimiser(tiny_state):
  config, state = tiny_state
  assert set(state.params) == {"ocbe", "decoder"} and state.ema_params is None
  assert set(state.frozen) == {"params", "batch_stats"}
  assert count(state.frozen) > 0
  # Adam's mu and nu cover the student only (plus scalar step counts).
  assert 0 <= count(state.opt_state) - 2 * count(state.params) < 4
  assert rd.teacher_channels(config) == (64, 128, 256)


def test_train_step_decreases_loss_updates_bn_and_never_moves_the_teacher(tiny_state):
  config, state = tiny_state
  rng = np.random.default_rng(0)
  batch = {"image": jnp.asarray(rng.random((4, 32, 32, 1), np.float32))}
  step = jax.jit(lambda s, b: rd.train_step(config, s, b, jax.random.key(0)))
  losses = []
  new = state
  for _ in range(6):
    new, metrics = step(new, batch)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.01, losses
  jax.tree.map(np.testing.assert_array_equal, new.frozen, state.frozen)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), new.batch_stats, state.batch_stats)
  assert all(jax.tree.leaves(changed))
  assert int(new.step) == 6


def test_teacher_gets_no_gradient(tiny_state):
  """The teacher's taps are constants of any loss (stop_gradient)."""
  config, state = tiny_state
  images = jnp.asarray(np.random.default_rng(2).random((2, 32, 32, 1), np.float32))
  loss = lambda frozen: sum(jnp.sum(t) for t in rd.teacher_maps(config, frozen, images))
  grads = jax.jit(jax.grad(loss))(state.frozen)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_scoring_is_deterministic_and_zero_on_background(tiny_state):
  config, state = tiny_state
  method = get_method("reverse_distillation")
  params = method.scoring_params(config, {"model": state}, {})
  images = np.random.default_rng(3).random((3, 32, 32, 1)).astype(np.float32)
  images[1] = 0.0
  images[2, :, :10] = 0.0
  score = jax.jit(lambda p, x, v, k: method.score(config, p, x, v, k))
  maps = np.asarray(score(params, images, np.ones(3, bool), jax.random.key(0)))
  again = np.asarray(score(params, images, np.zeros(3, bool), jax.random.key(5)))
  assert maps.shape == (3, 32, 32)
  np.testing.assert_array_equal(maps, again)
  assert np.all(maps[1] == 0) and np.all(maps[2, :, :10] == 0) and np.all(maps[0] > 0)


def _torch_name(path: tuple[str, ...]) -> str:
  """Inverse of the converter's module naming (test helper)."""
  subs = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1",
          "upsample_deconv": "upsample.0", "upsample_bn": "upsample.1", "ocbe": "bn"}
  parts = [subs.get(p, re.sub(r"^(bn_layer|layer\d)_(\d+)$", r"\1.\2", p)) for p in path]
  return ".".join(parts)


def _to_torch(variables: dict, transposed=lambda path: False) -> dict:
  """Flax {'params', 'batch_stats'} -> a torch-layout state_dict (test helper)."""
  leaves = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
            "var": "running_var"}
  sd = {}
  for (_, *path, leaf), value in traverse_util.flatten_dict(variables).items():
    value = np.asarray(value)
    if leaf == "kernel":
      value = value.transpose((2, 3, 0, 1) if transposed(tuple(path)) else (3, 2, 0, 1))
    sd[f"{_torch_name(tuple(path))}.{leaves[leaf]}"] = np.ascontiguousarray(value)
  return sd


def _is_deconv(path):
  return path[-1] == "upsample_deconv" or (path[0] == "decoder" and path[1].endswith("_0")
                                           and path[-1] == "conv2")


def test_converter_round_trip_and_errors():
  student = Student(SMALL)
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                           abstract_variables(student))
  sd = _to_torch(variables, _is_deconv)
  extra = {"step": np.ones(1, np.float32), "bn.conv4.weight": np.zeros((64, 128, 1, 1)),
           "bn.bn4.weight": np.zeros(64), "decoder.layer1.0.bn1.num_batches_tracked": np.int64(3)}
  wrapped = {f"module.{k}": v for k, v in {**sd, **extra}.items()}
  back = convert.student_to_flax(wrapped, student, source="ckpt")
  jax.tree.map(np.testing.assert_array_equal, back, variables)

  missing = dict(sd)
  del missing["decoder.layer3.0.upsample.0.weight"]
  with pytest.raises(DataError, match="lacks 1 tensors"):
    convert.student_to_flax(missing, student)
  wrong = {**sd, "bn.conv1.weight": np.zeros((3, 3, 3, 3), np.float32)}
  with pytest.raises(DataError, match="bn.conv1.weight"):
    convert.student_to_flax(wrong, student)
  with pytest.raises(DataError, match="not a module"):
    convert.student_to_flax({**sd, "decoder.fc.weight": np.zeros(3)}, student)


def test_reference_states_reads_student_and_teacher(tmp_path, tiny_state):
  config, state = tiny_state
  student_sd = _to_torch({"params": state.params, "batch_stats": state.batch_stats}, _is_deconv)
  teacher_sd = {f"extractor.backbone.{k}": v for k, v in _to_torch(state.frozen).items()}
  save_file({**student_sd, **teacher_sd, "step": np.array([20000.0], np.float32)},
            str(tmp_path / "model.safetensors"))
  fields, warnings = convert.reference_states(config, tmp_path, ema_from_model=False)
  assert warnings == [] and set(fields) == {"model"}
  got = fields["model"]
  jax.tree.map(np.testing.assert_array_equal, got["params"], jax.tree.map(np.asarray, state.params))
  jax.tree.map(np.testing.assert_array_equal, got["frozen"], jax.tree.map(np.asarray, state.frozen))
  # Without the teacher in the file, the teacher stays model.backbone_weights (flagged).
  save_file(student_sd, str(tmp_path / "model.safetensors"))
  fields, warnings = convert.reference_states(config, tmp_path, ema_from_model=False)
  assert "frozen" not in fields["model"] and "no teacher" in warnings[0]


def test_image_size_must_give_even_code():
  config = tiny_config()
  config.data.image_size = 48   # resnet18 layer3 3x3: the decoder cannot rebuild it
  with pytest.raises(ConfigError, match="data.image_size=48"):
    rd.build_student(config)


def test_presets():
  paper = rd_config.get_config()
  assert paper.model.backbone == "wide_resnet50_2" and paper.eval.step == 20_000
  assert paper.optim.weight_decay == 0.01 and paper.training.n_iters == 25_000
  sweep = np.arange(paper.eval.thr_start, paper.eval.thr_end, paper.eval.thr_step)
  assert np.allclose(sweep[[0, -1]], [0.01, 0.29]) and len(sweep) == 29
  assert rd.warnings(paper) == []
  with pytest.raises(ConfigError, match="wide_resnet50_2-95faca4d.pth"):
    feature_extractor.load_frozen_backbone(paper.model, None)
  tiny = tiny_config()   # random resnet18 teacher: flagged
  assert "RANDOM BACKBONE WEIGHTS" in rd.warnings(tiny)[0]
  assert get_method("reverse_distillation").warnings(tiny) == rd.warnings(tiny)
  demo = rd_config.get_config("demo")   # EfficientNet-Lite0: random only without its package
  packaged = backbones.get_backbone(demo.model.backbone).paper_weights.installed_path()
  assert (rd.warnings(demo) == []) == (packaged is not None)
  assert rd.teacher_channels(demo) == (24, 40, 80)
  with pytest.raises(ValueError, match="unknown preset"):
    rd_config.get_config("huge")


def test_import_with_the_teacher_from_the_checkpoint_needs_no_weight_file(tmp_path, tiny_state):
  """A preset that refuses random teachers imports a checkpoint that carries its teacher."""
  from uad_jax.engine import checkpoints   # pylint: disable=import-outside-toplevel
  from uad_jax.tools import import_torch   # pylint: disable=import-outside-toplevel
  config, state = tiny_state
  src = tmp_path / "checkpoint_4"
  src.mkdir()
  student_sd = _to_torch({"params": state.params, "batch_stats": state.batch_stats}, _is_deconv)
  teacher_sd = {f"extractor.backbone.{k}": v for k, v in _to_torch(state.frozen).items()}
  save_file({**student_sd, **teacher_sd}, str(src / "model.safetensors"))
  strict = config.copy_and_resolve_references()
  strict.model.allow_random_backbone = False
  with pytest.raises(ConfigError):
    feature_extractor.load_frozen_backbone(strict.model, None)
  step_dir = import_torch.import_checkpoint("reverse_distillation", src, tmp_path / "run", strict)
  store = checkpoints.CheckpointStore(step_dir.parent, read_only=True)
  _, restored, _, _ = store.restore(None, int(step_dir.name))
  store.close()
  jax.tree.map(np.testing.assert_array_equal, restored["frozen"],
               jax.tree.map(np.asarray, state.frozen))
