"""Training: workdir set-up, data loading and (to come) the optimisation loop."""

import json
import pathlib
import sys

from absl import logging
import ml_collections

from nerface_jax import data


def prepare_workdir(config: ml_collections.ConfigDict,
                    workdir: str) -> pathlib.Path:
  """Creates `workdir` and records the config there as `config.json`."""
  path = pathlib.Path(workdir).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(config.to_json_best_effort(indent=2))
  return path


def load_data(config: ml_collections.ConfigDict) -> dict[str, data.Dataset]:
  """Loads train/val/test of the configured dataset (or the built-in person)."""
  root = data.dataset_dir(config.data)
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Prepares the workdir and data of a run."""
  workdir = prepare_workdir(config, workdir)
  try:
    splits = load_data(config)
  except data.DatasetError as e:
    # The message names the file and frame; a traceback would bury it.
    logging.error('%s', e)
    sys.exit(f'Dataset error: {e}')
  for name, split in splits.items():
    logging.info('%s: %d frames of %dx%d, %d expression values (%s)', name,
                 split.num_frames, split.width, split.height, split.expr_dim,
                 split.path)
  print(json.dumps({name: {'frames': s.num_frames, 'height': s.height,
                           'width': s.width, 'expr_dim': s.expr_dim}
                    for name, s in splits.items()}))
  return splits
