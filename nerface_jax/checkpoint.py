"""Checkpoints of a training run: orbax, in `<workdir>/checkpoints`.

Each checkpoint holds the train state and, beside it, the run's config and
the facts of its training data as JSON, so `render.py` can rebuild the model
from the checkpoint alone. Orbax writes into a temporary folder and renames
it when complete, so a process killed at any moment (during a save included)
leaves the previous checkpoint loadable.

Checkpoints defend themselves: once a save is complete, the SHA-256 of each
of its files is recorded in `<step>/MANIFEST`, and `verify` checks them
before anything is restored, so a truncated file or a flipped byte is found
before it becomes garbage parameters. Old checkpoints are deleted only after
a newer one has been written and verified; a damaged one is never deleted,
only moved aside (`set_aside`) into `checkpoints/<reason>/<step>` so that
orbax no longer sees it. Every process of a multi-host job must call `save`
(orbax coordinates them); only process 0 writes the manifest.
"""

import hashlib
import json
import os
import pathlib
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

SUBDIR = 'checkpoints'
MANIFEST = 'MANIFEST'
# Orbax's own step metadata, which orbax may write again after a save has
# returned (from a background thread): a kill during that rewrite left it
# missing under a manifest that listed it. The manifest vouches for the
# saved items only.
_NOT_IN_MANIFEST = (MANIFEST, '_CHECKPOINT_METADATA')


def _digest(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.rglob('*')
                if p.is_file() and p.name not in _NOT_IN_MANIFEST)


class Checkpoints:
  """Saves, verifies and restores train states (and the config) of a workdir."""

  def __init__(self, workdir: os.PathLike[str] | str, keep: int = 3,
               read_only: bool = False):
    """Opens (and creates unless read_only) `<workdir>/checkpoints`.

    Args:
      workdir: the training workdir.
      keep: number of most recent verified checkpoints kept on disk.
      read_only: open for restoring only (rendering).
    """
    self.directory = pathlib.Path(workdir).expanduser().absolute() / SUBDIR
    self.keep = keep
    self.read_only = read_only
    # Saves are synchronous: a checkpoint is verified (manifest) before an
    # older one may go, and the cost is small next to the steps between saves.
    # Rotation is ours, so orbax keeps everything.
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'config', 'meta'))

  def latest_step(self) -> Optional[int]:
    """The step of the newest complete checkpoint (not verified), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, oldest first (not verified)."""
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def save(self, step: int, state: Any, config: dict[str, Any],
           meta: Optional[dict[str, Any]] = None):
    """Saves `state` at `step`, records its manifest, then rotates.

    Args:
      step: the training step the state belongs to.
      state: a pytree of arrays (the train state).
      config: the run's config as a JSON-serialisable dict.
      meta: facts about the data the state was trained on (JSON-serialisable),
        e.g. frame count and expression length, so that the model can be
        rebuilt without reading the training images.
    """
    self._manager.save(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(meta or {})), force=True)
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      self._write_manifest(step)
      self._rotate(step)
    self._manager.reload()

  def _write_manifest(self, step: int):
    folder = self.step_dir(step)
    manifest = {str(p.relative_to(folder)): _digest(p) for p in _files(folder)}
    temporary = folder / f'.{MANIFEST}.tmp'
    with open(temporary, 'w') as f:
      json.dump({'step': step, 'sha256': manifest}, f, indent=1,
                sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temporary, folder / MANIFEST)

  def _rotate(self, newest: int):
    """Deletes the oldest checkpoints beyond `keep`, never one that is newer
    than the newest verified one (`newest`, just written)."""
    if self.verify(newest) is not None:
      return
    older = [s for s in self.all_steps() if s < newest]
    for step in older[:max(0, len(older) - (self.keep - 1))]:
      self._manager.delete(step)

  def verify(self, step: int) -> Optional[str]:
    """Why the checkpoint at `step` cannot be trusted, or None when intact.

    A checkpoint without a manifest (written by an older version, or by a
    process killed between the save and its manifest) counts as intact when
    its three items exist: restoring it is the remaining test.
    """
    folder = self.step_dir(step)
    if not folder.is_dir():
      return f'{folder} does not exist'
    for item in ('state', 'config', 'meta'):
      if not (folder / item).exists():
        return f'{folder / item} is missing'
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
      return None
    try:
      recorded = json.loads(manifest_path.read_text())['sha256']
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f'{manifest_path} is unreadable ({e})'
    for name, digest in sorted(recorded.items()):
      path = folder / name
      if path.name in _NOT_IN_MANIFEST:  # Listed by an older version.
        continue
      if not path.is_file():
        return f'{path} is missing'
      if _digest(path) != digest:
        return (f'{path} does not match its checksum (changed or damaged '
                'after it was written)')
    return None

  def set_aside(self, step: int, reason: str = 'damaged') -> pathlib.Path:
    """Moves checkpoint `step` to `checkpoints/<reason>/<step>[-n]`, where
    orbax no longer sees it; nothing is deleted. Returns the new path."""
    target = self.directory / reason / str(step)
    n = 1
    while target.exists():
      target = self.directory / reason / f'{step}-{n}'
      n += 1
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(self.step_dir(step), target)
    self._manager.reload()
    return target

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
    """Only the parameters of the state at `step` (see `restore_parts`)."""
    return self.restore_parts({'params': abstract_params}, step)['params']

  def restore_parts(self, abstract: dict[str, Any],
                    step: Optional[int] = None) -> dict[str, Any]:
    """Some fields of the state at `step`, as host numpy arrays.

    Rendering needs neither the optimiser moments (twice the parameters'
    size) nor device placement, so only the named subtrees are read.

    Args:
      abstract: {TrainState field: its tree of shapes and dtypes}, e.g.
        {'params': train_state.abstract_params(...), 'occupancy': ...}.
      step: the checkpoint step; None for the latest.

    Returns:
      {field: tree of numpy arrays}.
    """
    step = self._existing_step(step)
    item = dict(abstract)
    restore_args = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.PyTreeCheckpointer() as reader:
      restored = reader.restore(
          self.step_dir(step) / 'state',
          args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                      partial_restore=True))
    return restored

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
    step = self._existing_step(step)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))
    return restored[item]

  def wait(self):
    """Blocks until pending saves are complete."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> 'Checkpoints':
    return self

  def __exit__(self, *exc):
    self.close()


def unreadable(error: BaseException) -> str:
  """A one-line reason from a failed restore (orbax and TensorStore errors
  can span pages)."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:200] if text else ""}'.rstrip(
      ': ')


def age(path: pathlib.Path) -> str:
  """How long ago `path` was modified, e.g. '5 min ago'."""
  seconds = max(0.0, time.time() - path.stat().st_mtime)
  if seconds < 120:
    return f'{seconds:.0f} s ago'
  if seconds < 7200:
    return f'{seconds / 60:.0f} min ago'
  return f'{seconds / 3600:.1f} h ago'
