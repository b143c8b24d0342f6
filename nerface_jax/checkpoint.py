"""Checkpoints of a training run: orbax, in `<workdir>/checkpoints`.

Each checkpoint holds the train state and, beside it, the run's config as
JSON, so `render.py` can rebuild the model from the checkpoint alone. Orbax
writes into a temporary folder and renames it when complete, so a process
killed at any moment (during a save included) leaves the previous complete
checkpoint loadable; stale temporary folders are cleaned up on the next start.
Every process of a multi-host job must call `save` (orbax coordinates them).
"""

import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

SUBDIR = 'checkpoints'


def _keep_policy(keep: int):
  # Newer orbax replaces max_to_keep by preservation policies.
  managers = getattr(ocp, 'checkpoint_managers', None)
  if managers is not None and hasattr(managers, 'LatestN'):
    return {'preservation_policy': managers.LatestN(keep)}
  return {'max_to_keep': keep}


class Checkpoints:
  """Saves and restores train states (and the config) of one workdir."""

  def __init__(self, workdir: os.PathLike[str] | str, keep: int = 3,
               async_save: bool = True, read_only: bool = False):
    """Opens (and creates unless read_only) `<workdir>/checkpoints`.

    Args:
      workdir: the training workdir.
      keep: number of most recent checkpoints kept on disk.
      async_save: write in a background thread while training goes on.
      read_only: open for restoring only (rendering).
    """
    self.directory = pathlib.Path(workdir).expanduser().absolute() / SUBDIR
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
        **_keep_policy(keep))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'config', 'meta'))

  def latest_step(self) -> Optional[int]:
    """The step of the newest complete checkpoint, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, config: dict[str, Any],
           meta: Optional[dict[str, Any]] = None) -> bool:
    """Starts saving `state` at `step` (returns at once when asynchronous).

    Args:
      step: the training step the state belongs to.
      state: a pytree of arrays (the train state).
      config: the run's config as a JSON-serialisable dict.
      meta: facts about the data the state was trained on (JSON-serialisable),
        e.g. frame count and expression length, so that the model can be
        rebuilt without reading the training images.

    Returns:
      Whether a save was started.
    """
    return self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(meta or {})), force=True)

  def restore(self, target: Any, step: Optional[int] = None) -> Any:
    """Restores the state at `step` (default: latest) into `target`'s structure.

    Args:
      target: a pytree like the saved state (concrete arrays or
        jax.ShapeDtypeStruct); restored arrays get its shapes, dtypes,
        shardings and container types (optax states stay optax states).
      step: the checkpoint step; None for the latest.

    Returns:
      The restored pytree.

    Raises:
      FileNotFoundError: when there is no checkpoint.
    """
    step = self._existing_step(step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))
    return restored.state

  def restore_params(self, abstract_params: Any,
                     step: Optional[int] = None) -> Any:
    """Only the parameters of the state at `step`, as host numpy arrays.

    Rendering needs neither the optimiser moments (twice the parameters'
    size) nor device placement, so only the `params` subtree is read.

    Args:
      abstract_params: the parameter tree's shapes and dtypes
        (`train_state.abstract_params`).
      step: the checkpoint step; None for the latest.

    Returns:
      The parameter tree of numpy arrays.
    """
    step = self._existing_step(step)
    item = {'params': abstract_params}
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(
          self.directory / str(step) / 'state',
          args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                      partial_restore=True))
    return restored['params']

  def _existing_step(self, step: Optional[int]) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{self.directory}: no checkpoint.')
    if step not in self._manager.all_steps():
      raise FileNotFoundError(
          f'{self.directory}: no checkpoint at step {step}; available: '
          f'{self.all_steps()}.')
    return step

  def restore_config(self, step: Optional[int] = None) -> dict[str, Any]:
    """The config saved beside the checkpoint at `step` (default: latest)."""
    return self._restore_json('config', step)

  def restore_meta(self, step: Optional[int] = None) -> dict[str, Any]:
    """The data facts saved beside the checkpoint at `step` (default: latest).

    Empty when the checkpoint has none.
    """
    try:
      return self._restore_json('meta', step)
    except KeyError:
      return {}

  def _restore_json(self, item: str, step: Optional[int]) -> dict[str, Any]:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{self.directory}: no checkpoint.')
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return restored[item]

  def wait(self):
    """Blocks until pending asynchronous saves are complete."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc):
    self.close()
