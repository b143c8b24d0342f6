"""Test set-up: 4 fake CPU devices and a persistent compilation cache.

Both must be configured before JAX initialises its backend, which is why this
runs at import time of the test session.
"""

import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # pylint: disable=g-import-not-at-top

_CACHE = os.environ.get('NERFACE_JAX_TEST_JIT_CACHE',
                        str(REPO / '.pytest_cache' / 'jax_cache'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


def tiny_config(cache_dir=None, **overrides):
  """The `tiny` preset with `section.key=value` overrides."""
  from nerface_jax import presets  # pylint: disable=g-import-not-at-top
  config = presets.get_config('tiny')
  if cache_dir is not None:
    config.data.cache_dir = str(cache_dir)
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


# A small avatar of the built-in person, trained enough to have a face.
AVATAR_OVERRIDES = {
    'data.synthetic_size': 24, 'data.synthetic_frames': 40,
    'train.max_steps': 400, 'train.lr': 5e-3, 'train.lr_decay_steps': 400,
    'train.batch_rays': 512, 'train.log_every': 100,
    'train.eval_every': 400, 'train.checkpoint_every': 400,
    'model.trunk_width': 64, 'model.xyz_freqs': 6, 'model.color_width': 16,
    'render.num_coarse': 16, 'render.num_fine': 16}


# The hash field with its occupancy grid at tiny sizes; the grid refreshes
# every step and culls from step 2, so four tiny steps exercise all of it.
HASH_OVERRIDES = {
    'model.field': 'hash', 'model.hash_levels': 4, 'model.hash_log2_size': 10,
    'model.hash_base_resolution': 4, 'model.hash_max_resolution': 32,
    'model.hash_width': 16, 'model.hash_geo_features': 7,
    'render.occupancy': True, 'render.occupancy_resolution': 8,
    'train.occupancy_every': 1, 'train.occupancy_warmup': 2,
    'train.adam_eps': 1e-15}

# A small hash-field avatar of the built-in person, trained to have a face.
HASH_AVATAR_OVERRIDES = {
    **HASH_OVERRIDES,
    'data.synthetic_size': 24, 'data.synthetic_frames': 40,
    'model.hash_levels': 8, 'model.hash_log2_size': 12,
    'model.hash_max_resolution': 64, 'model.hash_width': 32,
    'model.hash_geo_features': 15, 'model.color_width': 32,
    'model.color_depth': 2, 'model.latent_dim': 8,
    'render.occupancy_resolution': 16, 'train.occupancy_every': 8,
    'train.occupancy_warmup': 64,
    'train.max_steps': 300, 'train.lr': 1e-2, 'train.lr_decay_steps': 300,
    'train.warmup_steps': 20, 'train.batch_rays': 512, 'train.log_every': 100,
    'train.eval_every': 300, 'train.checkpoint_every': 300,
    'render.num_coarse': 24, 'render.num_fine': 0}


def _train_hash_avatar(tmp_path_factory, name, **overrides):
  from nerface_jax import avatar  # pylint: disable=g-import-not-at-top
  from nerface_jax import train_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp(name)
  config = tiny_config(root / 'cache', **{**HASH_AVATAR_OVERRIDES,
                                          **overrides})
  train_lib.train_and_evaluate(config, str(root / 'work'))
  return avatar.load(root / 'work')


@pytest.fixture(scope='session')
def trained_hash_avatar(tmp_path_factory):
  """A trained hash-field avatar with its occupancy grid: one level, the
  grid alone placing the samples (as the `fast` preset)."""
  return _train_hash_avatar(tmp_path_factory, 'hash_avatar')


@pytest.fixture(scope='session')
def trained_two_level_hash_avatar(tmp_path_factory):
  """As trained_hash_avatar with a coarse level that places fine samples."""
  return _train_hash_avatar(tmp_path_factory, 'hash_avatar2',
                            **{'render.num_coarse': 16,
                               'render.num_fine': 16})


@pytest.fixture(scope='session')
def trained_workdir(tmp_path_factory):
  """The workdir of a trained avatar (shared by the rendering tests)."""
  from nerface_jax import train_lib  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('avatar')
  config = tiny_config(root / 'cache', **AVATAR_OVERRIDES)
  train_lib.train_and_evaluate(config, str(root / 'work'))
  return root / 'work'


@pytest.fixture(scope='session')
def trained_avatar(trained_workdir):
  from nerface_jax import avatar  # pylint: disable=g-import-not-at-top
  return avatar.load(trained_workdir)
