"""Optimisers of the reference methods from `config.optim`, with torch's semantics.

Keys (ml_collections.ConfigDict `config.optim`):
  name: 'adamw' (torch.optim.AdamW: decoupled weight decay on every optimised tensor) | 'adam';
  lr, beta1, beta2, eps, weight_decay;
  schedule: 'constant' | 'step_epochs' (torch StepLR stepped once per epoch with the explicit
    1-based epoch number: epoch e trains at lr * gamma ** floor(e / step_size));
  step_size, gamma: of 'step_epochs';
  grad_clip_norm: 0 (none) or torch's clip_grad_norm_ (scale min(1, c / (||g|| + 1e-6))).
"""

import jax
import jax.numpy as jnp
import optax

from uad_jax.errors import ConfigError


def learning_rate_schedule(optim, steps_per_epoch: int):
  """count (updates already made, 0-based) -> learning rate."""
  schedule = optim.get("schedule", "constant")
  if schedule == "constant":
    return optax.constant_schedule(optim.lr)
  if schedule == "step_epochs":
    if steps_per_epoch < 1:
      raise ConfigError(f"steps per epoch {steps_per_epoch}: the training data is empty")

    def lr(count):
      epoch = 1 + jnp.asarray(count) // steps_per_epoch   # update n = count + 1 is in epoch e
      return optim.lr * optim.gamma ** (epoch // optim.step_size).astype(jnp.float32)
    return lr
  raise ConfigError(f"optim.schedule {schedule!r}: expected 'constant' or 'step_epochs'")


def clip_by_global_norm_torch(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g||_2 + 1e-6))."""
  def update(updates, state, params=None):
    del params
    norm = optax.global_norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(optim, steps_per_epoch: int = 1):
  """(optax transformation, learning-rate schedule) of `config.optim`."""
  lr = learning_rate_schedule(optim, steps_per_epoch)
  name = optim.get("name", "adamw")
  if name == "adamw":
    tx = optax.adamw(lr, optim.beta1, optim.beta2, optim.eps, weight_decay=optim.weight_decay)
  elif name == "adam":
    tx = optax.adam(lr, optim.beta1, optim.beta2, optim.eps)
  else:
    raise ConfigError(f"optim.name {name!r}: expected 'adamw' or 'adam'")
  clip = optim.get("grad_clip_norm", 0.0)
  if clip:
    tx = optax.chain(clip_by_global_norm_torch(clip), tx)
  return tx, lr
