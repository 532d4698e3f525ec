"""The train state of every gradient-trained method, the reference's EMA rule and one update.

The optimiser travels with the state as static fields (like `flax.training.train_state`): a
method builds it in `init` (with the steps per epoch of the data, for epoch-based schedules), its
train step calls `apply_gradients`, and the engine logs `learning_rate(step)`, the rate actually
applied at a step.
"""

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree; checkpointed as a whole).

  step: int32 scalar, number of optimiser steps taken.
  params: the optimised parameters (float32); the only tree with optimiser state.
  opt_state: optax state of `tx` over `params`.
  ema_params: exponential moving average of `params` (what scoring uses), or None (no EMA).
  batch_stats: mutable BatchNorm statistics (Flax collection 'batch_stats'); {} when unused.
  frozen: parameters that are used but never optimised (a pretrained encoder): no optimiser state,
    no weight decay, no EMA; {} when unused.
  tx, lr_schedule: static; the optimiser and its learning rate as a function of the number of
    updates already made (optax count).
  """
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any = None
  batch_stats: Any = flax.struct.field(default_factory=dict)
  frozen: Any = flax.struct.field(default_factory=dict)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)
  lr_schedule: Callable = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, lr_schedule: Callable, *,
             ema: bool, batch_stats=None, frozen=None) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
               ema_params=jax.tree.map(jnp.copy, params) if ema else None,
               batch_stats={} if batch_stats is None else batch_stats,
               frozen={} if frozen is None else frozen, tx=tx, lr_schedule=lr_schedule)

  def learning_rate(self, step) -> jnp.ndarray:
    """The learning rate applied at optimiser step `step` (1-based, as the engine counts)."""
    return self.lr_schedule(jnp.asarray(step) - 1)

  def apply_gradients(self, grads, *, ema_rate: Optional[float] = None,
                      batch_stats=None) -> "TrainState":
    """One optimiser step, then the EMA update (when the state has EMA; n = the new step) and
    the new BatchNorm statistics (when given)."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    step = self.step + 1
    ema_params = self.ema_params
    if ema_params is not None:
      if ema_rate is None:
        raise ValueError("a state with EMA needs ema_rate")
      ema_params = ema_update(ema_params, params, step, ema_rate)
    return self.replace(step=step, params=params, opt_state=opt_state, ema_params=ema_params,
                        batch_stats=self.batch_stats if batch_stats is None else batch_stats)


def ema_decay(num_updates, rate):
  """Decay of the reference EMA (`utils/ema.py`): min(rate, (1 + n) / (10 + n)).

  n counts updates including the current one (n = 1 at the first step), so the warm-up term
  dominates for most of a run (0.1818 at n=1, 0.99641 at n=2500).
  """
  n = jnp.asarray(num_updates, jnp.float32)
  return jnp.minimum(rate, (1.0 + n) / (10.0 + n))


def ema_update(ema_params, params, num_updates, rate):
  """ema <- ema - (1 - d) * (ema - params), d = ema_decay(num_updates, rate)."""
  d = ema_decay(num_updates, rate)
  return jax.tree.map(lambda e, p: e - (1.0 - d) * (e - p), ema_params, params)
