"""The train state, its optimiser and learning-rate schedule.

Used by training (to create and step the state) and by everything that loads
a checkpoint (to describe what was saved without building it).
"""

from typing import Any

import chex
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nerface_jax import models


@struct.dataclass
class TrainState:
  """Everything a step changes (and a checkpoint holds).

  Attributes:
    step: int32 [] steps taken.
    params: model parameters (the gamma table included).
    opt_state: optax state.
    rng: uint32 [2] base key; a step's randomness is fold_in(rng, step).
  """
  step: chex.Array
  params: Any
  opt_state: Any
  rng: chex.Array


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * decay_rate ** (step / decay_steps), the original's decay."""
  return optax.exponential_decay(
      config.train.lr, transition_steps=config.train.lr_decay_steps,
      decay_rate=config.train.lr_decay_rate)


def make_optimizer(
    config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam on the schedule of `learning_rate_schedule`."""
  return optax.adam(learning_rate_schedule(config))


def create_train_state(config: ml_collections.ConfigDict,
                       model: models.NerfaceModel, expr_dim: int,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh state from `train.seed` (host-side, not yet placed).

  Args:
    config: reads train.seed.
    model: the unbound model.
    expr_dim: expression length E.
    tx: the optimiser whose state is initialised.

  Returns:
    TrainState at step 0.
  """
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.train.seed))
  params = models.init_params(model, init_key, expr_dim)
  return TrainState(step=jnp.int32(0), params=params,
                    opt_state=tx.init(params), rng=train_key)


def abstract_params(model: models.NerfaceModel, expr_dim: int) -> Any:
  """The parameter tree's shapes and dtypes, computed without allocating it.

  Returns:
    A pytree of jax.ShapeDtypeStruct like `models.init_params`.
  """
  return jax.eval_shape(
      lambda key: models.init_params(model, key, expr_dim),
      jax.random.PRNGKey(0))
