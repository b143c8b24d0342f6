"""One set-up path: a config and its data -> model, optimiser and state.

Training, rendering, the benchmarks and the tests all build the model from
the same data facts (`data_facts`), so a checkpoint's saved facts rebuild
exactly the model that was trained.
"""

import dataclasses
import hashlib
import pathlib
from typing import Any, Optional

import ml_collections
import numpy as np
import optax

from nerface_jax import config_lib
from nerface_jax import data
from nerface_jax import models
from nerface_jax import parallel
from nerface_jax import sampler
from nerface_jax import scene
from nerface_jax import synthetic
from nerface_jax import train_state


def dataset_dir(data_config: ml_collections.ConfigDict) -> pathlib.Path:
  """The dataset folder of a config's `data` section.

  `data.dir` when set; otherwise the built-in synthetic person, generated
  into the cache on first use and read through `data.load` like any dataset.
  """
  if data_config.dir:
    return pathlib.Path(data_config.dir).expanduser()
  return synthetic.ensure(
      data.cache_dir(data_config.cache_dir), size=data_config.synthetic_size,
      frames=data_config.synthetic_frames, seed=data_config.synthetic_seed)


def load_data(config: ml_collections.ConfigDict) -> dict[str, data.Dataset]:
  """Loads train/val/test of the configured dataset (or the built-in person).

  The train split is cut to its first `data.train_fraction` in time.
  """
  root = dataset_dir(config.data)
  splits = data.load_splits(
      root, downscale=config.data.downscale,
      background=config.data.background == 'image')
  splits['train'] = splits['train'].prefix(config.data.train_fraction)
  expr_dim = config.model.expr_dim
  if expr_dim is not None and expr_dim != splits['train'].expr_dim:
    raise data.DatasetError(
        f'{root}: expressions have {splits["train"].expr_dim} values but '
        f'config.model.expr_dim is {expr_dim}.')
  return splits


def fingerprint(dataset: data.Dataset) -> str:
  """A short hash of what identifies a training split's frames.

  Poses, expressions and image names (not the pixels: hashing gigabytes of
  images at every start would cost more than it tells): two datasets that
  agree on all three are the same recording.
  """
  digest = hashlib.sha256()
  for array in (dataset.c2w, dataset.expressions):
    digest.update(np.ascontiguousarray(array, np.float32).tobytes())
  digest.update('\n'.join(dataset.file_paths).encode())
  digest.update(repr(dataset.images.shape).encode())
  return digest.hexdigest()[:16]


def data_facts(train: data.Dataset, near: float,
               far: float) -> dict[str, Any]:
  """What a checkpoint must know of its training data to be rebuilt.

  Args:
    train: the training split.
    near, far: the config's sample depth range (data.near, data.far).

  Returns:
    JSON-ready dict: data_dir, num_train_frames, expr_dim, height, width,
    intrinsics, fingerprint, expr_mean, expr_std and box (`scene.head_box`:
    the hash and occupancy grids' box, [2, 3]).
  """
  return {'data_dir': str(train.path), 'num_train_frames': train.num_frames,
          'expr_dim': train.expr_dim, 'height': train.height,
          'width': train.width,
          'intrinsics': [float(v) for v in train.intrinsics],
          'fingerprint': fingerprint(train),
          **models.expression_stats(train.expressions),
          'box': scene.head_box(train.c2w, train.intrinsics, train.height,
                                train.width, near, far)}


def construct_model(config: ml_collections.ConfigDict,
                    facts: dict[str, Any]) -> models.NerfaceModel:
  """The model of `config` for the data described by `facts`."""
  return models.construct_model(config, facts['num_train_frames'],
                                facts['expr_dim'], facts, facts.get('box'))


def device_data(dataset: data.Dataset,
                bbox_weight: float) -> sampler.DeviceData:
  """The sampling tables of a split (host numpy): uint8 images [F, H, W, 3],
  cameras, expressions, pixel boxes and weights (`sampler.DeviceData`)."""
  return sampler.from_dataset(dataset, bbox_weight)


@dataclasses.dataclass
class Experiment:
  """A config with its data, model and optimiser, ready to train or render.

  Attributes:
    config: the experiment config.
    splits: {'train', 'val', 'test'} datasets (train cut by train_fraction).
    facts: `data_facts` of the train split.
    model: the NerfaceModel.
    tx: the optimiser.
    mesh: the device mesh.
  """
  config: ml_collections.ConfigDict
  splits: dict[str, data.Dataset]
  facts: dict[str, Any]
  model: models.NerfaceModel
  tx: optax.GradientTransformation
  mesh: Any

  @property
  def train(self) -> data.Dataset:
    return self.splits['train']

  def initial_state(self) -> train_state.TrainState:
    """A fresh train state replicated over the mesh."""
    return parallel.replicate(
        train_state.create_train_state(self.config, self.model,
                                       self.facts['expr_dim'], self.tx),
        self.mesh)


def setup(config: ml_collections.ConfigDict, mesh=None,
          splits: Optional[dict[str, data.Dataset]] = None) -> Experiment:
  """Checks the config, loads the data (unless given) and builds model and
  optimiser.

  Args:
    config: the experiment config.
    mesh: device mesh (default: all devices).
    splits: already loaded datasets (`load_data`), to skip loading.
  """
  config_lib.validate(config)
  splits = load_data(config) if splits is None else splits
  facts = data_facts(splits['train'], config.data.near, config.data.far)
  return Experiment(config=config, splits=splits, facts=facts,
                    model=construct_model(config, facts),
                    tx=train_state.make_optimizer(config),
                    mesh=parallel.make_mesh() if mesh is None else mesh)
