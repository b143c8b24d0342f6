"""A trained avatar: a training workdir's checkpoint -> model and parameters.

Only the parameters are read (not the optimiser state); the saved config is
upgraded to the current key set and checked, and the model is rebuilt from
the data facts saved with the checkpoint, so rendering never needs the
training images.
"""

import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np

from nerface_jax import checkpoint
from nerface_jax import config_lib
from nerface_jax import data
from nerface_jax import errors
from nerface_jax import experiment
from nerface_jax import latents
from nerface_jax import models
from nerface_jax import occupancy
from nerface_jax import parallel
from nerface_jax import renderer
from nerface_jax import train_state


@dataclasses.dataclass
class Avatar:
  """A trained model ready to render.

  Attributes:
    config: the run's config (from the checkpoint, upgraded).
    meta: facts of the training data (frames, expression length, size).
    model: the NerfaceModel.
    host_params: the parameters on the host (numpy).
    renderer: renders frames with the parameters placed on its mesh.
    step: the checkpoint's step.
    workdir: the training workdir.
  """
  config: ml_collections.ConfigDict
  meta: dict[str, Any]
  model: models.NerfaceModel
  host_params: Any
  renderer: renderer.Renderer
  step: int
  workdir: pathlib.Path

  @property
  def expr_dim(self) -> int:
    return self.meta['expr_dim']

  @property
  def height(self) -> int:
    return self.meta['height']

  @property
  def width(self) -> int:
    return self.meta['width']

  @property
  def num_train_frames(self) -> int:
    """Rows of the gamma table (the frames the avatar was trained on)."""
    return self.meta['num_train_frames']

  @property
  def mesh(self):
    return self.renderer.mesh

  def shared_code(self, choice: Optional[str] = None) -> np.ndarray:
    """float32 [L]: the code of unseen frames by `choice` (default:
    eval.latent; 'optimize', which is per frame, falls back to 'mean')."""
    choice = choice or self.config.eval.latent
    return latents.shared_code(
        self.host_params, latents.shared_choice(choice),
        self.config.eval.latent_frame, self.config.model.latent_dim)

  def frame_code(self, split: str, index: int,
                 choice: Optional[str] = None) -> np.ndarray:
    """float32 [L]: frame `index` of `split` of the avatar's own data gets
    its trained code unless `choice` is given; any other frame (or a
    training frame past the trained prefix) the shared code."""
    table = latents.gamma(self.host_params)
    if (choice is None and split == 'train' and table is not None and
        index < table.shape[0]):
      return table[index]
    return self.shared_code(choice)

  def split_codes(self, dataset: data.Dataset, choice: Optional[str],
                  trained: bool,
                  progress: Optional[Callable[[int, int], None]] = None
                  ) -> tuple[np.ndarray, str]:
    """Codes for every frame of `dataset`: see `latents.split_codes`.

    Args:
      dataset: the frames.
      choice: for frames without a trained code (default: eval.latent).
      trained: whether `dataset` is the avatar's own training split.
      progress: fitting progress for 'optimize'.
    """
    grid = self.renderer.grid
    return latents.split_codes(
        self.config, self.model, self.host_params, dataset,
        choice or self.config.eval.latent,
        self.num_train_frames if trained else 0, progress,
        grid=None if grid is None else jax.device_get(grid))

  def render(self, inputs: renderer.FrameInputs, height: Optional[int] = None,
             width: Optional[int] = None) -> dict[str, np.ndarray]:
    """Renders one frame (default: the training image size)."""
    return self.renderer(inputs, height or self.height, width or self.width)


def load(workdir: os.PathLike[str] | str, step: Optional[int] = None,
         mesh=None) -> Avatar:
  """Rebuilds the model of a training workdir from its checkpoint.

  Args:
    workdir: the training workdir (holds checkpoints/).
    step: the checkpoint step (default: the latest).
    mesh: device mesh (default: all devices).

  Returns:
    An Avatar.

  Raises:
    errors.RenderError: when there is no (such) checkpoint, or it cannot be
      rebuilt.
  """
  workdir = pathlib.Path(workdir).expanduser()
  if not workdir.is_dir():
    raise errors.RenderError(f'{workdir}: no such workdir.')
  if not (workdir / checkpoint.SUBDIR).is_dir():
    raise errors.RenderError(
        f'{workdir / checkpoint.SUBDIR}: no checkpoint to render from; train '
        f'first (python train.py --workdir={workdir} ...).')
  ckpt = checkpoint.Checkpoints(workdir, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise errors.RenderError(
          f'{workdir / checkpoint.SUBDIR}: no checkpoint to render from; '
          f'train first (python train.py --workdir={workdir} ...).')
    if step is not None and step not in steps:
      raise errors.RenderError(f'{workdir}: no checkpoint at step {step}; '
                               f'available: {steps}.')
    candidates = [step] if step is not None else steps[::-1]
    for n, candidate in enumerate(candidates):
      try:
        config, meta, model, host_params, grid = _read(ckpt, workdir,
                                                       candidate)
      except errors.RenderError as e:
        if step is not None or n == len(candidates) - 1:
          raise
        # The newest may be damaged (a killed save, a bad disk): say so and
        # render the newest intact one; nothing is changed on disk.
        print(f'render: {e} Using checkpoint {candidates[n + 1]} instead.',
              file=sys.stderr, flush=True)
        continue
      step = candidate
      break
  finally:
    ckpt.close()
  mesh = parallel.make_mesh() if mesh is None else mesh
  return Avatar(config=config, meta=meta, model=model,
                host_params=host_params,
                renderer=renderer.Renderer.create(
                    model, host_params, mesh, config.render.chunk, grid,
                    config.render.occupancy_threshold),
                step=step, workdir=workdir)


def _read(ckpt: checkpoint.Checkpoints, workdir: pathlib.Path, step: int):
  """(config, meta, model, host params) of checkpoint `step`.

  Raises:
    errors.RenderError: the checkpoint is damaged, or its config is not
      valid, or it cannot be rebuilt.
  """
  reason = ckpt.verify(step)
  if reason is not None:
    raise errors.RenderError(f'{workdir}: checkpoint {step} is damaged: '
                             f'{reason}.')
  try:
    config = config_lib.from_saved(ckpt.restore_config(step))
  except config_lib.ConfigError as e:
    raise errors.RenderError(
        f'{workdir}: the config saved with step {step} is not valid: '
        f'{e}') from None
  except Exception as e:  # pylint: disable=broad-except
    raise errors.RenderError(
        f'{workdir}: checkpoint {step} is damaged: its config cannot be read '
        f'({checkpoint.unreadable(e)}).') from None
  meta = ckpt.restore_meta(step)
  if not meta:
    raise errors.RenderError(
        f'{workdir}: the checkpoint at step {step} has no data facts '
        '(written by an older version).')
  model = experiment.construct_model(config, meta)
  abstract = {'params': train_state.abstract_params(model, meta['expr_dim'])}
  if config.render.occupancy:
    abstract['occupancy'] = jax.eval_shape(
        lambda: train_state.initial_grid(config, model))
  try:
    parts = ckpt.restore_parts(abstract, step)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.RenderError(
        f'{workdir}: checkpoint {step} is damaged: its parameters cannot be '
        f'read ({checkpoint.unreadable(e)}).') from None
  host_params = parts['params']
  if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(host_params)):
    raise errors.RenderError(f'{workdir}: checkpoint {step} holds non-finite '
                             'parameters.')
  grid = parts.get('occupancy')
  if grid is not None:
    grid = occupancy.Grid(**{k: np.asarray(getattr(grid, k)) for k in (
        'box_min', 'box_max', 'density', 'occupied', 'step')})
  return config, meta, model, host_params, grid


def load_dataset(avatar: Avatar, split: str,
                 data_dir: Optional[os.PathLike[str] | str] = None
                 ) -> data.Dataset:
  """A split of the avatar's dataset, or of `data_dir`, checked to fit it.

  Raises:
    errors.RenderError: if the dataset cannot be read or does not fit the
      avatar (expression length, image size), saying what differs.
  """
  config = avatar.config
  if data_dir is None:
    root = (pathlib.Path(avatar.meta['data_dir'])
            if avatar.meta.get('data_dir') else experiment.dataset_dir(config.data))
    if not root.is_dir():
      root = experiment.dataset_dir(config.data)
  else:
    root = pathlib.Path(data_dir).expanduser()
  try:
    dataset = data.load(root, split, config.data.downscale,
                        background=config.data.background == 'image',
                        expr_dim=avatar.expr_dim,
                        expr_origin=f'the avatar (step {avatar.step})')
  except data.DatasetError as e:
    raise errors.RenderError(str(e)) from None
  if (dataset.height, dataset.width) != (avatar.height, avatar.width):
    raise errors.RenderError(
        f'{root}: {split} images are {dataset.width}x{dataset.height} but the '
        f'avatar was trained on {avatar.width}x{avatar.height} (set '
        '--config.data.downscale at training time to match).')
  return dataset


def is_training_data(avatar: Avatar, dataset: data.Dataset,
                     split: str) -> bool:
  """Whether `dataset` is the avatar's own training split (so its leading
  frames have trained codes): same split, and the same frames as trained
  when the checkpoint recorded a fingerprint of them."""
  if split != 'train':
    return False
  saved = avatar.meta.get('fingerprint')
  if saved is None:
    return pathlib.Path(dataset.path) == pathlib.Path(
        avatar.meta.get('data_dir', dataset.path))
  prefix = dataset.prefix(avatar.config.data.train_fraction)
  return experiment.fingerprint(prefix) == saved
