"""Tests of nerface_jax.config_lib: allowed values, upgrades, resume checks."""

import copy
import json
import pathlib
import subprocess
import types

import ml_collections
import pytest

from nerface_jax import config_lib
from nerface_jax import presets

REPO = pathlib.Path(__file__).resolve().parent.parent
PRESETS = ('paper', 'demo', 'tiny')
THIRD = 1.0 / 3.0


def _flat(preset='tiny'):
  return config_lib.flatten(presets.get_config(preset))


def _with(preset='tiny', /, **changes):
  """The nested dict of a preset with {'train.lr': ...} changes."""
  flat = _flat(preset)
  for key, value in changes.items():
    assert key in flat, key
    flat[key] = value
  return config_lib.unflatten(flat)


def _error(config, **kwargs) -> str:
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(config, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  return message


# --- The rules cover the config -----------------------------------------------


@pytest.mark.parametrize('preset', PRESETS)
def test_every_preset_validates(preset):
  config_lib.validate(presets.get_config(preset))
  config_lib.validate(config_lib.to_dict(presets.get_config(preset)))


def test_presets_share_one_key_set_and_every_key_has_a_rule():
  for preset in PRESETS:
    assert tuple(_flat(preset)) == config_lib.KEYS
  assert set(config_lib.RULES) == set(config_lib.KEYS)
  assert 'train.max_seconds' in config_lib.KEYS
  assert _flat('paper')['train.max_seconds'] is None


def test_choices_are_the_enum_rules_and_hold_the_preset_values():
  for key, options in config_lib.CHOICES.items():
    rule = config_lib.RULES[key]
    assert isinstance(rule, config_lib.Choice) and rule.options == options
    for preset in PRESETS:
      assert _flat(preset)[key] in options
  # Every string-valued key other than the paths is an enum.
  strings = {k for k, v in _flat('paper').items() if isinstance(v, str)}
  assert strings == set(config_lib.CHOICES)
  assert config_lib.CHOICES['data.background'] == ('image', 'none')
  assert config_lib.CHOICES['eval.latent'] == ('fixed', 'zero', 'mean',
                                               'optimize')


def test_choices_match_the_tuples_still_kept_in_modules():
  # Until the modules read config_lib.CHOICES, their own tuples must agree.
  from nerface_jax import losses  # pylint: disable=g-import-not-at-top
  from nerface_jax import models  # pylint: disable=g-import-not-at-top
  from nerface_jax import parallel  # pylint: disable=g-import-not-at-top
  kept = {
      'parallel.mode': getattr(parallel, 'MODES', None),
      'train.latent_prior': getattr(losses, 'PRIORS', None),
      'model.expr_norm': getattr(models, 'EXPR_NORMS', None),
      'model.compute_dtype': getattr(models, '_DTYPES', None),
      'data.background': getattr(models, '_BACKGROUNDS', None),
  }
  for key, values in kept.items():
    if values is not None:
      assert set(values) == set(config_lib.CHOICES[key]), key


@pytest.mark.parametrize('key,text', [
    ('train.batch_rays', 'an integer >= 1'),
    ('train.lr', 'a number > 0'),
    ('data.train_fraction', 'a number in (0, 1]'),
    ('train.latent_dropout', 'a number in [0, 1)'),
    ('data.bbox_weight', 'a number in [0, 1]'),
    ('train.latent_reg', 'a number >= 0'),
    ('train.max_seconds', 'None (no limit) or a number > 0'),
    ('model.expr_dim', 'None (taken from the data) or an integer >= 1'),
    ('model.use_latent', 'True or False'),
    ('parallel.mode', "one of 'shard_map', 'pmap'"),
])
def test_expected_reads_as_text(key, text):
  assert config_lib.expected(key) == text


# --- validate -----------------------------------------------------------------

# One bad value per kind of rule: (key, value, the message after '= value: ').
BAD_VALUES = [
    # Enums with a typo get a suggestion.
    ('data.background', 'imag',
     "expected one of 'image', 'none' (did you mean 'image'?)"),
    ('model.expr_norm', 'standardise',
     "expected one of 'scale', 'standardize' (did you mean 'standardize'?)"),
    ('model.compute_dtype', 'bf16',
     "expected one of 'float32', 'bfloat16' (did you mean 'bfloat16'?)"),
    ('train.latent_prior', 'Norm',
     "expected one of 'norm', 'squared' (did you mean 'norm'?)"),
    ('parallel.mode', 'shardmap',
     "expected one of 'shard_map', 'pmap' (did you mean 'shard_map'?)"),
    ('eval.latent', 'average',
     "expected one of 'fixed', 'zero', 'mean', 'optimize'."),
    ('preset', 'turbo', "expected one of 'paper', 'demo', 'fast', 'tiny'."),
    ('parallel.mode', 3, "expected one of 'shard_map', 'pmap'."),
    # Counts that must be >= 1 (or >= 0, 3).
    ('train.batch_rays', 0, 'expected an integer >= 1.'),
    ('train.batch_rays', -512, 'expected an integer >= 1.'),
    ('train.max_steps', 0, 'expected an integer >= 1.'),
    ('train.log_every', 0, 'expected an integer >= 1.'),
    ('train.keep_checkpoints', 0, 'expected an integer >= 1.'),
    ('render.chunk', 0, 'expected an integer >= 1.'),
    ('render.num_coarse', 2, 'expected an integer >= 3.'),
    ('render.num_fine', -1, 'expected an integer >= 0.'),
    ('model.trunk_width', 0, 'expected an integer >= 1.'),
    ('model.latent_dim', 0, 'expected an integer >= 1.'),
    ('model.xyz_freqs', -1, 'expected an integer >= 0.'),
    ('data.downscale', 0, 'expected an integer >= 1.'),
    ('data.synthetic_frames', 2, 'expected an integer >= 3.'),
    ('eval.latent_frame', -1, 'expected an integer >= 0.'),
    ('eval.optimize_batch', 0, 'expected an integer >= 1.'),
    ('train.seed', -1, 'expected an integer >= 0.'),
    # Wrong types.
    ('data.downscale', 2.0,
     'expected an integer >= 1 (write 2, not the float 2.0).'),
    ('data.downscale', 1.5, 'expected an integer >= 1.'),
    ('train.batch_rays', '512', 'expected an integer >= 1.'),
    ('train.batch_rays', True, 'expected an integer >= 1.'),
    ('train.lr', '1e-3', 'expected a number > 0.'),
    ('train.lr', None, 'expected a number > 0.'),
    ('model.use_latent', 1, 'expected True or False.'),
    ('model.use_viewdirs', 'false', 'expected True or False.'),
    # Ranges of floats.
    ('train.lr', 0.0, 'expected a number > 0.'),
    ('train.lr', float('nan'), 'expected a finite number > 0.'),
    ('render.noise_std', float('inf'), 'expected a finite number >= 0.'),
    ('train.lr_decay_rate', 1.5, 'expected a number in (0, 1].'),
    ('train.latent_reg', -0.1, 'expected a number >= 0.'),
    ('train.latent_dropout', 1.0, 'expected a number in [0, 1).'),
    ('train.latent_noise', -1.0, 'expected a number >= 0.'),
    ('data.bbox_weight', 1.1, 'expected a number in [0, 1].'),
    ('data.train_fraction', 0.0, 'expected a number in (0, 1].'),
    ('model.expr_scale', 0.0, 'expected a number > 0.'),
    ('eval.optimize_lr', -1e-2, 'expected a number > 0.'),
    ('data.far', 0.0, 'expected a number > 0.'),
    # Optional values.
    ('train.max_seconds', 0.0, 'expected None (no limit) or a number > 0.'),
    ('train.max_seconds', 'ten', 'expected None (no limit) or a number > 0.'),
    ('model.expr_dim', 0,
     'expected None (taken from the data) or an integer >= 1.'),
    ('data.dir', '',
     'expected None (unset) or a non-empty path; an empty string usually '
     'comes from an unset shell variable (as in --config.data.dir=$DATA with '
     'DATA unset).'),
    ('data.cache_dir', '  ',
     'expected None (unset) or a non-empty path; an empty string usually '
     'comes from an unset shell variable (as in --config.data.cache_dir=$DATA '
     'with DATA unset).'),
    ('data.dir', 7, 'expected None (unset) or a path (a string).'),
]


@pytest.mark.parametrize('key,value,message', BAD_VALUES)
def test_bad_values_are_one_line_naming_key_value_and_expectation(
    key, value, message):
  assert _error(_with(**{key: value})) == (
      f'config.{key} = {value!r}: {message}')


@pytest.mark.parametrize('changes,message', [
    ({'data.near': 0.8, 'data.far': 0.8},
     'config.data.near = 0.8: expected a number < config.data.far (0.8); '
     'samples lie between near and far.'),
    ({'data.near': 1.0},
     'config.data.near = 1.0: expected a number < config.data.far (0.8); '
     'samples lie between near and far.'),
    ({'model.skip_layer': 2, 'model.trunk_depth': 2},
     'config.model.skip_layer = 2: expected an integer < '
     'config.model.trunk_depth (2), the index of the trunk layer the input is '
     'fed to again (0: no skip connection).'),
    ({'data.downscale': 32},
     'config.data.downscale = 32: expected an integer <= '
     'config.data.synthetic_size (16), the image side of the built-in person '
     '(data.dir is unset).'),
])
def test_cross_key_rules(changes, message):
  assert _error(_with(**changes)) == message


def test_cross_key_rules_allow_the_edges():
  config_lib.validate(_with(**{'model.skip_layer': 0, 'model.trunk_depth': 1}))
  config_lib.validate(_with(**{'data.near': 0.0, 'data.far': 1e-3}))
  # A real dataset's size is only known once it is read.
  config_lib.validate(_with(**{'data.downscale': 32, 'data.dir': '/data/p'}))


def test_good_values_of_every_kind_pass():
  config_lib.validate(_with(**{
      'train.max_seconds': 600.0, 'model.expr_dim': 52, 'data.dir': '/d',
      'data.cache_dir': '~/c', 'train.lr': 1, 'train.latent_dropout': 0.0,
      'data.bbox_weight': 0.0, 'train.lr_decay_rate': 1.0,
      'eval.preview_frames': 0, 'model.compute_dtype': 'bfloat16',
      'parallel.mode': 'pmap', 'eval.latent': 'optimize'}))


def test_a_config_dict_with_an_override_is_checked():
  config = presets.get_config('demo')
  config.lock()
  config.train.batch_rays = 0
  assert _error(config) == (
      'config.train.batch_rays = 0: expected an integer >= 1.')


def test_unknown_and_missing_keys():
  tree = _with()
  tree['train']['lrr'] = 0.01
  assert _error(tree) == (
      'config.train.lrr = 0.01: unknown key (did you mean config.train.lr?).')
  tree = _with()
  del tree['train']['max_seconds']
  assert _error(tree).startswith(
      'config.train.max_seconds: missing (expected None (no limit) or a '
      'number > 0); a config saved by an older version goes through '
      'config_lib.upgrade first.')
  # Without the key check only the values present are checked.
  config_lib.validate(tree, check_keys=False)


def test_long_values_are_cut_to_one_short_line():
  message = _error(_with(**{'data.dir': ['x' * 50] * 10}))
  assert message.startswith("config.data.dir = ['xxx")
  assert '...' in message and len(message) < 200


# --- Flat views ---------------------------------------------------------------


def test_flatten_unflatten_and_to_dict_round_trip():
  config = presets.get_config('demo')
  tree = config_lib.to_dict(config)
  assert tree == json.loads(config.to_json_best_effort())
  assert config_lib.unflatten(config_lib.flatten(tree)) == tree
  assert config_lib.flatten(config) == config_lib.flatten(tree)
  assert config_lib.flatten({'a': {'b': 1, 'c': {'d': (2, 3)}}}) == {
      'a.b': 1, 'a.c.d': [2, 3]}


# --- upgrade ------------------------------------------------------------------

# Added with the hash field and the occupancy grid (after cb6912e).
NEW_IN_HASH_FIELD = (
    'model.field', 'model.hash_levels', 'model.hash_features',
    'model.hash_log2_size', 'model.hash_base_resolution',
    'model.hash_max_resolution', 'model.hash_width', 'model.hash_depth',
    'model.hash_geo_features', 'render.occupancy',
    'render.occupancy_resolution', 'render.occupancy_threshold',
    'train.table_lr', 'train.adam_eps', 'train.warmup_steps',
    'train.occupancy_every', 'train.occupancy_warmup')
# Keys that only a feature added with them reads: any value is the old
# behaviour, and upgrade takes the preset's.
_READ_ONLY_BY_NEW_FEATURES = tuple(
    k for k in NEW_IN_HASH_FIELD if k.startswith('model.hash_') or
    k.startswith('train.occupancy_') or k.startswith('render.occupancy_'))

# The key sets of configs/person.py at each commit that changed it, from
# `git log -p -- configs/person.py`: the keys each version lacks, and its
# values that the current presets no longer have ('*': every preset).
_V0_MISSING = ('eval.preview_frames', 'eval.optimize_steps',
               'eval.optimize_rays', 'eval.optimize_lr', 'eval.optimize_batch',
               'train.latent_prior', 'train.latent_dropout',
               'train.latent_noise', 'model.expr_norm', 'train.max_seconds',
               *NEW_IN_HASH_FIELD)
_DEMO_BEFORE_A8FFABC = {
    'render.num_coarse': 32, 'render.num_fine': 32, 'train.batch_rays': 1024,
    'train.max_steps': 3000, 'train.lr': 1e-3, 'train.lr_decay_steps': 3000,
    'train.eval_every': 500, 'train.checkpoint_every': 500}
_THIRD_SCALE = {'model.expr_scale': THIRD}
HISTORY = {
    # Package skeleton and presets; saved only through the checkpoint API.
    '38dd2aa': (_V0_MISSING, {'*': _THIRD_SCALE,
                              'demo': _DEMO_BEFORE_A8FFABC}),
    'b8688b1': (_V0_MISSING, {'*': _THIRD_SCALE,
                              'demo': _DEMO_BEFORE_A8FFABC}),
    # The training loop: the first config.json written by train.py.
    '2d98eed': (_V0_MISSING[1:], {'*': _THIRD_SCALE,
                                  'demo': _DEMO_BEFORE_A8FFABC}),
    '4e4287a': (_V0_MISSING[5:], {
        '*': _THIRD_SCALE,
        'demo': {**_DEMO_BEFORE_A8FFABC, 'eval.optimize_steps': 200}}),
    'a8ffabc': (_V0_MISSING[5:], {'*': _THIRD_SCALE}),
    '3526f5f': (_V0_MISSING[8:], {'*': _THIRD_SCALE}),
    'a076581': (_V0_MISSING[9:], {'*': _THIRD_SCALE}),
    'a4154e9': (_V0_MISSING[9:], {}),
    'cb6912e': (NEW_IN_HASH_FIELD, {}),
}

# What train.py saved at 2d98eed for the tiny preset, verbatim.
SAVED_2D98EED_TINY = json.loads("""
{"preset": "tiny", "data": {"dir": null, "downscale": 1, "near": 0.2,
 "far": 0.8, "background": "image", "bbox_weight": 0.9,
 "train_fraction": 1.0, "cache_dir": null, "synthetic_size": 16,
 "synthetic_frames": 12, "synthetic_seed": 0},
 "model": {"trunk_depth": 2, "trunk_width": 16, "skip_layer": 1,
 "color_width": 8, "color_depth": 1, "xyz_freqs": 2, "dir_freqs": 1,
 "expr_dim": null, "expr_scale": 0.3333333333333333, "latent_dim": 4,
 "use_expression": true, "use_latent": true, "use_viewdirs": true,
 "compute_dtype": "float32"},
 "render": {"num_coarse": 8, "num_fine": 8, "noise_std": 0.1, "chunk": 256},
 "train": {"batch_rays": 64, "max_steps": 4, "lr": 0.0005,
 "lr_decay_steps": 1000, "lr_decay_rate": 0.1, "latent_reg": 0.005,
 "seed": 0, "log_every": 1, "eval_every": 2, "checkpoint_every": 2,
 "keep_checkpoints": 2},
 "parallel": {"mode": "shard_map"},
 "eval": {"latent": "mean", "latent_frame": 0, "preview_frames": 1}}
""")

# The behaviour of the code before each key existed.
OLD_BEHAVIOUR = {'train.latent_prior': 'norm', 'train.latent_dropout': 0.0,
                 'train.latent_noise': 0.0, 'model.expr_norm': 'scale',
                 'train.max_seconds': None, 'model.field': 'mlp',
                 'render.occupancy': False, 'train.table_lr': None,
                 'train.adam_eps': 1e-8, 'train.warmup_steps': 0}


def _saved_by(commit, preset):
  """The config dict `commit`'s train.py saved for `preset`."""
  missing, old = HISTORY[commit]
  flat = _flat(preset)
  flat.update(old.get('*', {}))
  flat.update(old.get(preset, {}))
  for key in missing:
    del flat[key]
  return config_lib.unflatten(flat)


def _check_upgrade_keeps_old_behaviour(saved, preset):
  before = copy.deepcopy(saved)
  upgraded = config_lib.upgrade(saved)
  assert saved == before  # Not modified.
  config_lib.validate(upgraded)
  old, new = config_lib.flatten(saved), config_lib.flatten(upgraded)
  assert tuple(new) == config_lib.KEYS
  for key, value in old.items():
    assert new[key] == value and type(new[key]) is type(value), key
  for key in set(new) - set(old):
    if key in OLD_BEHAVIOUR:
      assert new[key] == OLD_BEHAVIOUR[key], key
    else:
      # Settings of features the old code did not have.
      assert (key.startswith('eval.') or
              key in _READ_ONLY_BY_NEW_FEATURES), key
      assert new[key] == _flat(preset)[key], key
  return new


def test_the_oldest_train_py_config_upgrades():
  new = _check_upgrade_keeps_old_behaviour(SAVED_2D98EED_TINY, 'tiny')
  assert new['model.expr_scale'] == THIRD
  assert new['model.expr_norm'] == 'scale'
  assert new['train.latent_prior'] == 'norm'
  assert new['eval.optimize_steps'] == 5  # The tiny preset's.
  assert SAVED_2D98EED_TINY == _saved_by('2d98eed', 'tiny')


@pytest.mark.parametrize('commit', list(HISTORY))
@pytest.mark.parametrize('preset', PRESETS)
def test_configs_of_every_version_upgrade_keeping_their_behaviour(commit,
                                                                  preset):
  new = _check_upgrade_keeps_old_behaviour(_saved_by(commit, preset), preset)
  assert new['model.expr_scale'] == (1.0 if commit in ('a4154e9', 'cb6912e') else THIRD)


def _git(*args):
  try:
    return subprocess.run(['git', '-C', str(REPO), *args], check=True,
                          capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None


def _config_file_at(commit):
  # Since the presets moved into the package, configs/person.py re-exports
  # them: the presets of such a commit are in its nerface_jax/presets.py.
  path = 'nerface_jax/presets.py'
  source = _git('show', f'{commit}:{path}')
  if source is None:
    path = 'configs/person.py'
    source = _git('show', f'{commit}:{path}')
  if source is None:
    pytest.skip(f'no git history with {commit} here')
  module = types.ModuleType(f'person_{commit}')
  code = compile(source, f'{commit}:{path}', 'exec')
  exec(code, module.__dict__)  # pylint: disable=exec-used
  return module


@pytest.mark.parametrize('commit', list(HISTORY))
def test_history_table_matches_git(commit):
  module = _config_file_at(commit)
  for preset in module.PRESETS:
    saved = json.loads(module.get_config(preset).to_json_best_effort())
    assert saved == _saved_by(commit, preset), (commit, preset)


def test_every_config_file_in_git_history_upgrades():
  log = _git('log', '--format=%h', '--', 'configs/person.py')
  if not log:
    pytest.skip('no git history here')
  for commit in log.split():
    module = _config_file_at(commit)
    for preset in module.PRESETS:
      saved = json.loads(module.get_config(preset).to_json_best_effort())
      config_lib.validate(config_lib.upgrade(saved))


def test_every_key_added_since_the_first_version_has_an_upgrade_rule():
  first = set(config_lib.KEYS) - set(_V0_MISSING)
  # A key added to the presets needs a row in ADDED (the value that keeps
  # what older code did) before configs saved without it can be read.
  assert set(config_lib.KEYS) - first <= set(config_lib.ADDED)
  assert set(config_lib.ADDED) <= set(config_lib.KEYS)
  for key, (value, source) in config_lib.ADDED.items():
    assert source, key
    if value is not config_lib.FROM_PRESET:
      assert config_lib.RULES[key].accepts(value), key
    else:
      # Only evaluation keys and settings that only a new feature reads.
      assert (key.startswith('eval.') or
              key in _READ_ONLY_BY_NEW_FEATURES), key


def test_upgrade_of_a_current_config_is_the_identity():
  for preset in PRESETS:
    tree = config_lib.to_dict(presets.get_config(preset))
    assert config_lib.upgrade(tree) == tree
    assert config_lib.upgrade(config_lib.upgrade(tree)) == tree


def test_upgrade_without_expr_scale_uses_the_original_third():
  tree = _with()
  del tree['model']['expr_scale']
  assert config_lib.upgrade(tree)['model']['expr_scale'] == THIRD


def test_upgrade_of_an_unknown_preset_takes_paper_evaluation_settings():
  saved = _saved_by('2d98eed', 'paper')
  saved['preset'] = 'turbo'
  assert config_lib.upgrade(saved)['eval']['optimize_steps'] == 200


def test_upgrade_refuses_unknown_and_lost_keys():
  saved = _saved_by('3526f5f', 'demo')
  saved['model']['warp'] = 'hash'
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.upgrade(saved)
  assert str(info.value) == (
      "config.model.warp = 'hash': unknown key in a saved config; it was "
      'probably written by a newer version of nerface_jax.')
  saved = _saved_by('3526f5f', 'demo')
  del saved['model']['trunk_width']
  with pytest.raises(config_lib.ConfigError,
                     match=r'^config\.model\.trunk_width: missing from the '
                     r'saved config, but every version wrote it'):
    config_lib.upgrade(saved)


def test_upgrade_moves_renamed_and_drops_removed_keys(monkeypatch):
  monkeypatch.setattr(config_lib, 'RENAMED', {'train.rays': 'train.batch_rays'})
  monkeypatch.setattr(config_lib, 'REMOVED', {
      'model.old_flag': ((False,), 'it is always off now')})
  flat = _flat()
  flat['train.rays'] = flat.pop('train.batch_rays')
  flat['model.old_flag'] = False
  upgraded = config_lib.upgrade(config_lib.unflatten(flat))
  assert upgraded == _with()
  flat['model.old_flag'] = True
  with pytest.raises(config_lib.ConfigError,
                     match=r"^config\.model\.old_flag = True: no longer "
                     r'supported \(it is always off now\)'):
    config_lib.upgrade(config_lib.unflatten(flat))


def test_from_saved_gives_a_locked_config_with_the_presets_types():
  config = config_lib.from_saved(SAVED_2D98EED_TINY)
  assert isinstance(config, ml_collections.ConfigDict) and config.is_locked
  assert config_lib.to_dict(config) == config_lib.upgrade(SAVED_2D98EED_TINY)
  config.model.expr_dim = 52  # A placeholder of int, as after parsing.
  config.train.max_seconds = 60  # A placeholder of float.
  assert config.train.max_seconds == 60.0
  with pytest.raises(AttributeError):
    config.train.lrr = 1.0
  bad = copy.deepcopy(SAVED_2D98EED_TINY)
  bad['render']['chunk'] = 0
  with pytest.raises(config_lib.ConfigError, match=r'^config\.render\.chunk '):
    config_lib.from_saved(bad)


# --- resume_conflicts ---------------------------------------------------------

# A different, allowed value of every safe key.
SAFE_CHANGES = {
    'data.dir': '/moved/person_1', 'data.cache_dir': '/tmp/cache',
    'model.expr_dim': 52, 'render.chunk': 128, 'train.max_steps': 10,
    'train.max_seconds': 60.0, 'train.log_every': 3, 'train.eval_every': 3,
    'train.checkpoint_every': 3, 'train.keep_checkpoints': 5,
    'parallel.mode': 'pmap', 'eval.latent': 'zero', 'eval.latent_frame': 1,
    'eval.preview_frames': 0, 'eval.optimize_steps': 7,
    'eval.optimize_rays': 8, 'eval.optimize_lr': 0.5,
    'eval.optimize_batch': 3}


def _another(key, value):
  """A different value of the same kind."""
  rule = config_lib.RULES[key]
  if isinstance(rule, config_lib.Choice):
    return next(o for o in rule.options if o != value)
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  return value / 2 if value else 0.5


def test_safe_keys_are_config_keys_and_cover_evaluation():
  assert set(SAFE_CHANGES) == set(config_lib.SAFE_ON_RESUME)
  assert set(config_lib.SAFE_ON_RESUME) <= set(config_lib.KEYS)
  assert {k for k in config_lib.KEYS if k.startswith('eval.')} <= set(
      config_lib.SAFE_ON_RESUME)
  # Nothing that shapes the model or what it learns, but the data's
  # expression length (checked against the data facts).
  assert {k for k in config_lib.SAFE_ON_RESUME
          if k.startswith('model.')} == {'model.expr_dim'}


def test_identical_configs_and_safe_changes_do_not_conflict():
  saved = config_lib.to_dict(presets.get_config('demo'))
  assert config_lib.resume_conflicts(saved, presets.get_config('demo')) == []
  assert config_lib.resume_conflicts(
      saved, _with('demo', **SAFE_CHANGES)) == []


@pytest.mark.parametrize(
    'key', [k for k in config_lib.KEYS if k not in config_lib.SAFE_ON_RESUME])
def test_every_unsafe_change_is_named(key):
  saved = _with('demo')
  value = _flat('demo')[key]
  changed = _another(key, value)
  current = _with('demo', **{key: changed})
  assert config_lib.resume_conflicts(saved, current) == [
      f'{key}: saved {value!r}, now {changed!r}']


def test_conflicts_come_in_config_order_and_allow_extends_the_safe_keys():
  saved = _with('demo')
  current = _with('demo', **{'train.lr': 1e-3, 'model.trunk_width': 64,
                             'train.max_steps': 5})
  assert config_lib.resume_conflicts(saved, current) == [
      'model.trunk_width: saved 128, now 64',
      'train.lr: saved 0.002, now 0.001']
  assert config_lib.resume_conflicts(saved, current, allow=['train.lr']) == [
      'model.trunk_width: saved 128, now 64']


def test_an_old_checkpoint_conflicts_only_where_the_defaults_moved():
  saved = _saved_by('3526f5f', 'tiny')
  assert config_lib.resume_conflicts(saved, presets.get_config('tiny')) == [
      'model.expr_scale: saved 0.3333333333333333, now 1.0']
  assert config_lib.resume_conflicts(
      saved, _with(**{'model.expr_scale': THIRD})) == []
  # The oldest: every key added since upgrades to what the current defaults
  # do, so only the expression scale differs.
  assert config_lib.resume_conflicts(
      SAVED_2D98EED_TINY, _with(**{'model.expr_scale': THIRD})) == []


def test_bools_and_ints_are_not_the_same_value():
  saved = _with()
  current = config_lib.flatten(saved)
  current['model.use_latent'] = 1
  assert config_lib.resume_conflicts(saved, config_lib.unflatten(current)) == [
      'model.use_latent: saved True, now 1']


def test_keys_only_in_the_current_config_are_named():
  current = _with()
  current['train']['extra'] = 1
  assert config_lib.resume_conflicts(_with(), current) == [
      'train.extra: saved (missing), now 1']


# --- meta_conflicts -----------------------------------------------------------

META = {'data_dir': '/data/person_1', 'num_train_frames': 10, 'expr_dim': 12,
        'height': 64, 'width': 64, 'intrinsics': [100.0, 101.0, 32.0, 32.0],
        'expr_mean': [0.01 * i for i in range(12)],
        'expr_std': [0.5] * 12, 'fingerprint': 'abc123'}


def _meta(**changes):
  meta = copy.deepcopy(META)
  meta.update(changes)
  return meta


def test_same_facts_and_float_noise_do_not_conflict():
  assert config_lib.meta_conflicts(META, _meta()) == []
  noisy = _meta(intrinsics=[v * (1 + 1e-9) for v in META['intrinsics']],
                expr_mean=[v + 1e-9 for v in META['expr_mean']])
  assert config_lib.meta_conflicts(META, noisy) == []


def test_differing_facts_are_named():
  current = _meta(height=32, width=32,
                  intrinsics=[50.0, 50.5, 16.0, 16.0], fingerprint='def456')
  assert config_lib.meta_conflicts(META, current) == [
      'height: saved 64, now 32', 'width: saved 64, now 32',
      'intrinsics: saved [100.0, 101.0, 32.0, 32.0], now [50.0, 50.5, 16.0, '
      '16.0]',
      "fingerprint: saved 'abc123', now 'def456'"]


def test_long_lists_name_their_first_differing_value_or_their_lengths():
  mean = list(META['expr_mean'])
  mean[3], mean[7] = 0.5, 0.9
  assert config_lib.meta_conflicts(META, _meta(expr_mean=mean)) == [
      'expr_mean[3]: saved 0.03, now 0.5 (2 of 12 values differ)']
  assert config_lib.meta_conflicts(
      META, _meta(expr_dim=13, expr_std=[0.5] * 13)) == [
          'expr_dim: saved 12, now 13', 'expr_std: saved 12 values, now 13']


def test_data_dir_is_ignored_unless_asked_and_missing_facts_are_skipped():
  moved = _meta(data_dir='/elsewhere/person_1')
  assert config_lib.meta_conflicts(META, moved) == []
  assert config_lib.meta_conflicts(META, moved, ignore=()) == [
      "data_dir: saved '/data/person_1', now '/elsewhere/person_1'"]
  # A checkpoint from before the fingerprint and the expression statistics.
  old = {k: v for k, v in META.items()
         if k not in ('fingerprint', 'expr_mean', 'expr_std')}
  assert config_lib.meta_conflicts(old, _meta(fingerprint='new')) == []
  assert config_lib.meta_conflicts(_meta(fingerprint='new'), old) == []


def test_ints_compare_exactly_and_tolerance_is_a_parameter():
  assert config_lib.meta_conflicts(META, _meta(num_train_frames=11)) == [
      'num_train_frames: saved 10, now 11']
  shifted = _meta(intrinsics=[100.001, 101.0, 32.0, 32.0])
  assert config_lib.meta_conflicts(META, shifted) == [
      'intrinsics: saved [100.0, 101.0, 32.0, 32.0], now [100.001, 101.0, '
      '32.0, 32.0]']
  assert config_lib.meta_conflicts(META, shifted, rel_tol=1e-4) == []
