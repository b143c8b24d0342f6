"""The train state, its optimiser and learning-rate schedule.

Used by training (to create and step the state) and by everything that loads
a checkpoint (to describe what was saved without building it).
"""

from typing import Any, Optional

import chex
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nerface_jax import models
from nerface_jax import occupancy as occupancy_lib


@struct.dataclass
class TrainState:
  """Everything a step changes (and a checkpoint holds).

  Attributes:
    step: int32 [] steps taken.
    params: model parameters (the gamma table included).
    opt_state: optax state.
    rng: uint32 [2] base key; a step's randomness is fold_in(rng, step).
    occupancy: the occupancy grid (`render.occupancy`), refreshed by the
      steps; None without one (then it is no part of the saved tree).
  """
  step: chex.Array
  params: Any
  opt_state: Any
  rng: chex.Array
  occupancy: Optional[occupancy_lib.Grid] = None


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           lr: Optional[float] = None) -> optax.Schedule:
  """lr * decay_rate ** (step / decay_steps), the original's decay, after a
  linear warm-up from 0 over `train.warmup_steps` (none by default).

  Args:
    config: reads train.lr (unless `lr` is given), lr_decay_*, warmup_steps.
    lr: the peak rate instead of train.lr (the hash tables' rate).
  """
  t = config.train
  lr = t.lr if lr is None else lr
  decay = optax.exponential_decay(lr, transition_steps=t.lr_decay_steps,
                                  decay_rate=t.lr_decay_rate)
  if not t.warmup_steps:
    return decay
  warmup = t.warmup_steps
  # The decay keeps counting from step 0, so warm-up only scales its start.
  return lambda step: decay(step) * jnp.minimum(1.0, (step + 1) / warmup)


TABLES = 'tables'  # The HashField parameter the separate rate applies to.


def param_labels(params: Any) -> Any:
  """'tables' for the hash grids' feature tables, 'network' for the rest."""
  def label(path, _):
    names = [getattr(k, 'key', None) for k in path]
    return TABLES if names and names[-1] == TABLES else 'network'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(
    config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (epsilon train.adam_eps) on `learning_rate_schedule`; the hash
  tables, if any, on the same schedule peaking at train.table_lr."""
  t = config.train
  adam = lambda lr: optax.adam(learning_rate_schedule(config, lr),
                               eps=t.adam_eps)
  if config.model.field != 'hash' or t.table_lr is None:
    return adam(None)
  # Sparse rows: a table entry gets a gradient only when a sample lands in
  # its cell, so its own (larger) rate keeps it up with the dense weights.
  return optax.multi_transform({TABLES: adam(t.table_lr),
                                'network': adam(None)}, param_labels)


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
                    opt_state=tx.init(params), rng=train_key,
                    occupancy=initial_grid(config, model))


def initial_grid(config: ml_collections.ConfigDict,
                 model: models.NerfaceModel) -> Optional[occupancy_lib.Grid]:
  """A fresh (all occupied) grid over the model's box with
  `render.occupancy`, else None."""
  if not config.render.occupancy:
    return None
  if model.box_min is None:
    raise ValueError('render.occupancy needs the head box of the data (the '
                     "data facts' 'box'); none was given to the model.")
  return occupancy_lib.create(model.box_min, model.box_max,
                              config.render.occupancy_resolution)


def abstract_params(model: models.NerfaceModel, expr_dim: int) -> Any:
  """The parameter tree's shapes and dtypes, computed without allocating it.

  Returns:
    A pytree of jax.ShapeDtypeStruct like `models.init_params`.
  """
  return jax.eval_shape(
      lambda key: models.init_params(model, key, expr_dim),
      jax.random.PRNGKey(0))
