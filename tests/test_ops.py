"""Shared ops (`uad_jax/ops/`) against independent numpy implementations of torch's definitions,
and the op fixtures of the reference (checks in `ops_checks.py`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uad_jax.ops.batchnorm import BatchNorm


def _rng(seed=0):
  return np.random.default_rng(seed)


# --- BatchNorm ---------------------------------------------------------------------------------

def test_batchnorm_train_mode_matches_torch_rules():
  x = _rng().normal(1.5, 2.0, (3, 5, 4, 6)).astype(np.float32)
  bn = BatchNorm(momentum=0.1, epsilon=1e-5)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(6))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(6))
  scale = _rng(1).normal(size=6).astype(np.float32)
  bias = _rng(2).normal(size=6).astype(np.float32)
  rm = _rng(3).normal(size=6).astype(np.float32)
  rv = _rng(4).uniform(0.5, 2.0, 6).astype(np.float32)
  variables = {"params": {"scale": scale, "bias": bias},
               "batch_stats": {"mean": rm, "var": rv}}
  y, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])

  x64 = x.astype(np.float64)
  n = 3 * 5 * 4
  mean = x64.mean((0, 1, 2))
  var = ((x64 - mean) ** 2).sum((0, 1, 2)) / n        # biased: normalisation
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * rm + 0.1 * mean, rtol=1e-6)
  unbiased = var * n / (n - 1)                         # torch's running-variance rule
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * rv + 0.1 * unbiased,
                             rtol=1e-6)
  # The biased update (Flax's nn.BatchNorm) would be distinguishable at this n.
  assert not np.allclose(updates["batch_stats"]["var"], 0.9 * rv + 0.1 * var, rtol=1e-4)


def test_batchnorm_eval_mode_uses_running_stats_and_matches_flax():
  import flax.linen as nn
  x = _rng().normal(size=(2, 4, 4, 3)).astype(np.float32)
  variables = {"params": {"scale": np.float32([0.5, 2.0, -1.0]),
                          "bias": np.float32([0.1, 0.0, -0.3])},
               "batch_stats": {"mean": np.float32([0.2, -0.1, 1.0]),
                               "var": np.float32([1.5, 0.3, 2.0])}}
  y = BatchNorm(use_running_average=True).apply(variables, x)
  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_allclose(y, (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"]
                             + p["bias"], rtol=1e-6, atol=1e-6)
  flax_y = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
  np.testing.assert_array_equal(y, flax_y)
  # No batch_stats update outside train mode.
  _, updates = BatchNorm().apply(variables, x, use_running_average=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(updates["batch_stats"]["var"], s["var"])


def test_batchnorm_rejects_one_value_per_channel():
  bn = BatchNorm()
  x = jnp.ones((1, 1, 1, 2))
  with pytest.raises(ValueError, match="more than 1 value"):
    bn.init(jax.random.key(0), x, use_running_average=False)
