"""The train state every gradient-trained method uses, and the reference's EMA rule."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree; checkpointed as a whole).

  step: int32 scalar, number of optimiser steps taken.
  params: model parameters (float32).
  ema_params: exponential moving average of `params` (what scoring uses).
  opt_state: optax state of `tx`.
  extra: method-specific state that is not trained by the optimiser (e.g. BatchNorm
    statistics); an empty dict when unused.
  """
  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any
  extra: Any = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, extra=None):
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
               extra={} if extra is None else extra)


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


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    ema_rate: float) -> TrainState:
  """One optimiser step followed by the EMA update (n = new step)."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  step = state.step + 1
  return state.replace(step=step, params=params, opt_state=opt_state,
                       ema_params=ema_update(state.ema_params, params, step, ema_rate))
