"""Tests of configs/person.py (the documented --config path), of the presets
behind it, and of the locked command-line overrides."""

import importlib.util
import pathlib

from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_flags as config_flags_lib
import pytest

from nerface_jax import cli
from nerface_jax import config_lib
from nerface_jax import presets

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG_FILE = str(REPO / 'configs' / 'person.py')

# Every key docs/architecture.md §5 promises to scripts and docs.
DESIGN_KEYS = """
data.dir data.downscale data.near data.far data.background data.bbox_weight
data.cache_dir data.train_fraction
model.trunk_depth model.trunk_width model.skip_layer model.color_width
model.xyz_freqs model.dir_freqs model.expr_dim model.expr_scale
model.latent_dim model.use_expression model.use_latent model.use_viewdirs
model.compute_dtype
render.num_coarse render.num_fine render.noise_std render.chunk
train.batch_rays train.max_steps train.lr train.lr_decay_steps
train.lr_decay_rate train.latent_reg train.seed train.log_every
train.eval_every train.checkpoint_every train.keep_checkpoints
parallel.mode eval.latent eval.latent_frame train.max_seconds
""".split()


def _parse(*argv):
  """Parses argv against a fresh flag set holding a locked --config."""
  values = flags.FlagValues()
  argv = ['prog', *argv]
  # Overrides are discovered from the command line when the flag is defined.
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values,
                                  lock_config=True, sys_argv=argv)
  cli.parse_flags_strict(argv, values)
  return values.config


def _lookup(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return config


@pytest.mark.parametrize('preset', ['paper', 'demo', 'fast', 'tiny'])
def test_presets_have_every_design_key(preset):
  config = _parse(f'--config={CONFIG_FILE}:{preset}')
  assert config.preset == preset
  for key in DESIGN_KEYS:
    _lookup(config, key)  # Raises KeyError when missing.


def test_default_preset_is_the_papers_numbers():
  config = _parse(f'--config={CONFIG_FILE}')
  assert config.preset == 'paper'
  assert (config.model.trunk_depth, config.model.trunk_width,
          config.model.skip_layer, config.model.color_width) == (6, 256, 3, 128)
  assert (config.model.xyz_freqs, config.model.dir_freqs,
          config.model.latent_dim) == (10, 4, 32)
  # The one departure from the original's numbers (1/3): see bench/README.
  assert config.model.expr_scale == 1.0
  assert (config.render.num_coarse, config.render.num_fine) == (64, 64)
  assert (config.data.near, config.data.far, config.data.bbox_weight) == (
      0.2, 0.8, 0.9)
  assert (config.train.batch_rays, config.train.max_steps, config.train.lr,
          config.train.lr_decay_steps, config.train.lr_decay_rate,
          config.train.latent_reg) == (2048, 400_000, 5e-4, 250_000, 0.1,
                                       0.005)
  assert config.data.dir is None and config.model.expr_dim is None


def test_overrides_apply_including_unset_placeholders():
  config = _parse(f'--config={CONFIG_FILE}:demo', '--config.train.lr=0.01',
                  '--config.data.dir=/data/person_1',
                  '--config.model.expr_dim=52')
  assert config.train.lr == 0.01
  assert config.data.dir == '/data/person_1'
  assert config.model.expr_dim == 52


@pytest.mark.parametrize('override,wrong', [
    ('--config.train.lrr=0.01', 'lrr'),
    ('--config.modle.trunk_depth=2', 'modle')])
def test_unknown_override_key_fails(override, wrong):
  with pytest.raises(flags.Error, match=f"'{wrong}'. Did you mean"):
    _parse(f'--config={CONFIG_FILE}:tiny', override)


def _load_by_path():
  """configs/person.py loaded from its path, as config_flags does."""
  spec = importlib.util.spec_from_file_location('person_by_path', CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_config_file_re_exports_the_presets():
  module = _load_by_path()
  assert module.get_config is presets.get_config
  assert module.PRESETS == presets.PRESETS == ('paper', 'demo', 'fast', 'tiny')


@pytest.mark.parametrize('preset', ['paper', 'demo', 'fast', 'tiny'])
def test_config_flags_loads_each_preset_by_path(preset):
  # The parser behind --config=configs/person.py:<preset>, locked as train.py
  # asks; the result is the preset itself, and it validates.
  parser = config_flags_lib.ConfigFileFlagParser('config', lock_config=True)
  config = parser.parse(f'{CONFIG_FILE}:{preset}')
  assert config.to_dict() == presets.get_config(preset).to_dict()
  assert config.is_locked
  config_lib.validate(config)


def test_unknown_preset_is_one_line_naming_the_choices():
  with pytest.raises(ValueError) as info:
    _load_by_path().get_config('huge')
  message = str(info.value)
  assert '\n' not in message
  assert message == (
      "Unknown preset 'huge' for configs/person.py; choose one of paper, "
      'demo, fast, tiny (as --config=configs/person.py:demo).')
  # config_flags wraps it with a traceback; our line is its last.
  with pytest.raises(flags.IllegalFlagValueError) as info:
    _parse(f'--config={CONFIG_FILE}:huge')
  assert message in str(info.value).strip().splitlines()[-1]


def test_max_seconds_is_unset_and_takes_a_number():
  assert _parse(f'--config={CONFIG_FILE}:demo').train.max_seconds is None
  config = _parse(f'--config={CONFIG_FILE}:demo',
                  '--config.train.max_seconds=600')
  assert config.train.max_seconds == 600.0
  config_lib.validate(config)


@pytest.mark.parametrize('override,message', [
    ('--config.train.batch_rays=0',
     'config.train.batch_rays = 0: expected an integer >= 1.'),
    ('--config.data.background=imag',
     "config.data.background = 'imag': expected one of 'image', 'none' "
     "(did you mean 'image'?)"),
    ('--config.data.near=0.8',
     'config.data.near = 0.8: expected a number < config.data.far (0.8)'),
    ('--config.train.max_seconds=-5',
     'config.train.max_seconds = -5.0: expected None (no limit) or a '
     'number > 0.'),
])
def test_overrides_that_parse_but_are_not_allowed_fail_validation(override,
                                                                  message):
  config = _parse(f'--config={CONFIG_FILE}:tiny', override)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config)
  assert str(info.value).startswith(message)
  assert '\n' not in str(info.value)


def test_empty_data_dir_from_an_unset_variable_is_explained():
  # What `--config.data.dir=$DATA` becomes when DATA is unset.
  config = _parse(f'--config={CONFIG_FILE}:demo', '--config.data.dir=')
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.data\.dir = '': .*unset shell variable"):
    config_lib.validate(config)
