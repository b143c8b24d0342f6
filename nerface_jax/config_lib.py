"""The allowed values of every config key, and saved configs brought up to date.

Every enum lives in `CHOICES` and every range in `RULES`; `validate` checks a
config against them before any data loads and raises `ConfigError` with one
line naming the key, the value given and what is expected:

  config.train.batch_rays = 0: expected an integer >= 1.
  config.data.background = 'imag': expected one of 'image', 'none' (did you
  mean 'image'?)

A config saved by an older version (config.json, and beside every checkpoint)
is brought to the current key set by `upgrade`, in one place: each key added
since the first saved config gets the value that reproduces the behaviour of
the code that saved it (`ADDED`). `resume_conflicts` and `meta_conflicts` say
what differs between a checkpoint and the run that wants to continue it.

Pure python and ml_collections: importing this module imports no JAX.
"""

import copy
import dataclasses
import difflib
import json
import math
import numbers
from typing import Any, Mapping, Optional, Sequence

import ml_collections

from nerface_jax import presets


class ConfigError(ValueError):
  """A config is not allowed; the message is one line saying why."""


# --- Flat views ---------------------------------------------------------------


def _plain(config: Any) -> Any:
  """Nested dicts and lists of a ConfigDict, a mapping or a JSON value."""
  if isinstance(config, (ml_collections.ConfigDict,
                         ml_collections.FrozenConfigDict)):
    config = config.to_dict()
  if isinstance(config, Mapping):
    return {str(k): _plain(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [_plain(v) for v in config]
  return config


def to_dict(config: Any) -> dict[str, Any]:
  """A config as a new nested dict of plain values (tuples become lists).

  For a ConfigDict this is the JSON form training saves
  (`config.to_json_best_effort()` read back), so `to_dict(config)` compares
  equal to a config restored from config.json or a checkpoint.
  """
  if isinstance(config, (ml_collections.ConfigDict,
                         ml_collections.FrozenConfigDict)):
    return json.loads(config.to_json_best_effort())
  return copy.deepcopy(_plain(config))


def flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  """{'train.lr': 5e-4, ...}: the leaves of a config by dotted key."""
  flat = {}
  for key, value in _plain(config).items():
    if isinstance(value, dict) and value:
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The nested dict of a `flatten`ed one (insertion order kept)."""
  tree: dict[str, Any] = {}
  for dotted, value in flat.items():
    *parents, leaf = dotted.split('.')
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = copy.deepcopy(value)
  return tree


# Every key of the current config, in the presets' order. All presets share
# the key set (they change values only; config_lib_test checks it).
KEYS: tuple[str, ...] = tuple(flatten(presets.get_config('paper')))
_KEY_SET = frozenset(KEYS)


# --- Allowed values -----------------------------------------------------------

# The allowed values of every enum key: modules and flags (parallel.MODES,
# losses.PRIORS, models.EXPR_NORMS, models._DTYPES and _BACKGROUNDS, render.py
# --latent, the bench scripts' choices) read them from here.
CHOICES: dict[str, tuple[str, ...]] = {
    'preset': presets.PRESETS,
    # 'image': composite bg/00050.png behind the head; 'none': no background.
    'data.background': ('image', 'none'),
    # 'scale': expression * expr_scale; 'standardize': per-coefficient z-score
    # by the training mean and std first.
    'model.expr_norm': ('scale', 'standardize'),
    # dtype of the MLP matmuls (parameters and quadrature stay float32).
    'model.compute_dtype': ('float32', 'bfloat16'),
    # The radiance field of both levels: the original MLP or a hash grid.
    'model.field': ('mlp', 'hash'),
    # 'norm': ||gamma_i||_2 (the original); 'squared': ||gamma_i||_2^2.
    'train.latent_prior': ('norm', 'squared'),
    'parallel.mode': ('shard_map', 'pmap'),
    # Gamma of frames without a trained code (val, test, reenactment).
    'eval.latent': ('fixed', 'zero', 'mean', 'optimize'),
}


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _show(value: Any, limit: int = 80) -> str:
  """repr of a value on one line, cut to `limit` characters."""
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + '...'


class Rule:
  """What one key accepts. `expected` reads after 'expected ...'."""

  expected: str = ''

  def accepts(self, value: Any) -> bool:
    raise NotImplementedError

  def explain(self, value: Any, key: str = '') -> str:
    """The text after 'config.key = value: ' for a value not accepted."""
    del value, key
    return f'expected {self.expected}.'


@dataclasses.dataclass(frozen=True)
class Int(Rule):
  """An integer (not a bool) >= `low` (and <= `high` when given)."""
  low: int
  high: Optional[int] = None

  @property
  def expected(self) -> str:
    if self.high is not None:
      return f'an integer in {self.low}..{self.high}'
    return f'an integer >= {self.low}'

  def accepts(self, value: Any) -> bool:
    return (_is_int(value) and value >= self.low and
            (self.high is None or value <= self.high))

  def explain(self, value: Any, key: str = '') -> str:
    if isinstance(value, float) and value.is_integer():
      return (f'expected {self.expected} (write {int(value)}, not the float '
              f'{value!r}).')
    return f'expected {self.expected}.'


@dataclasses.dataclass(frozen=True)
class Number(Rule):
  """A finite int or float (not a bool) in the interval low..high."""
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False

  @property
  def expected(self) -> str:
    if self.low is not None and self.high is not None:
      return (f'a number in {"(" if self.low_open else "["}{self.low:g}, '
              f'{self.high:g}{")" if self.high_open else "]"}')
    if self.low is not None:
      return f'a number {">" if self.low_open else ">="} {self.low:g}'
    if self.high is not None:
      return f'a number {"<" if self.high_open else "<="} {self.high:g}'
    return 'a number'

  def accepts(self, value: Any) -> bool:
    if not _is_number(value) or not math.isfinite(value):
      return False
    if self.low is not None and (value <= self.low if self.low_open else
                                 value < self.low):
      return False
    if self.high is not None and (value >= self.high if self.high_open else
                                  value > self.high):
      return False
    return True

  def explain(self, value: Any, key: str = '') -> str:
    if _is_number(value) and not math.isfinite(value):
      return f'expected a finite {self.expected[2:]}.'
    return f'expected {self.expected}.'


@dataclasses.dataclass(frozen=True)
class Bool(Rule):
  expected: str = 'True or False'

  def accepts(self, value: Any) -> bool:
    return isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
  """One of `options` (strings)."""
  options: tuple[str, ...]

  @property
  def expected(self) -> str:
    return 'one of ' + ', '.join(repr(o) for o in self.options)

  def accepts(self, value: Any) -> bool:
    return isinstance(value, str) and value in self.options

  def explain(self, value: Any, key: str = '') -> str:
    if isinstance(value, str):
      lowered = {o.lower(): o for o in self.options}
      close = difflib.get_close_matches(value.lower(), list(lowered), n=1,
                                        cutoff=0.5)
      if close:
        return f'expected {self.expected} (did you mean {lowered[close[0]]!r}?)'
    return f'expected {self.expected}.'


@dataclasses.dataclass(frozen=True)
class Path(Rule):
  """A non-empty path string (None is allowed through `Optional`)."""
  expected: str = 'a non-empty path'

  def accepts(self, value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())

  def explain(self, value: Any, key: str = '') -> str:
    if isinstance(value, str):
      return ('expected None (unset) or a non-empty path; an empty string '
              'usually comes from an unset shell variable (as in '
              f'--config.{key or "data.dir"}=$DATA with DATA unset).')
    return 'expected None (unset) or a path (a string).'


@dataclasses.dataclass(frozen=True)
class OrNone(Rule):
  """None, or what `inner` accepts."""
  inner: Rule
  meaning: str = ''  # What None means, e.g. 'no limit'.

  @property
  def expected(self) -> str:
    none = f'None ({self.meaning})' if self.meaning else 'None'
    return f'{none} or {self.inner.expected}'

  def accepts(self, value: Any) -> bool:
    return value is None or self.inner.accepts(value)

  def explain(self, value: Any, key: str = '') -> str:
    if isinstance(self.inner, Path):
      return self.inner.explain(value, key)
    return f'expected {self.expected}.'


_POSITIVE = Number(low=0, low_open=True)
_NON_NEGATIVE = Number(low=0)
_COUNT = Int(1)
_INDEX = Int(0)

# What every key accepts, one rule per key of KEYS (config_lib_test checks
# that none is missing). Cross-key rules are in `_CROSS_RULES` below.
RULES: dict[str, Rule] = {
    'preset': Choice(CHOICES['preset']),
    # --- data
    'data.dir': OrNone(Path(), 'the built-in synthetic person'),
    'data.downscale': _COUNT,
    'data.near': _NON_NEGATIVE,  # And < data.far.
    'data.far': _POSITIVE,
    'data.background': Choice(CHOICES['data.background']),
    'data.bbox_weight': Number(0, 1),
    'data.train_fraction': Number(0, 1, low_open=True),
    'data.cache_dir': OrNone(Path(), '$NERFACE_JAX_CACHE or ~/.cache'),
    'data.synthetic_size': _COUNT,
    # The built-in person needs one frame for each of train, val and test.
    'data.synthetic_frames': Int(3),
    'data.synthetic_seed': _INDEX,
    # --- model
    'model.trunk_depth': _COUNT,
    'model.trunk_width': _COUNT,
    'model.skip_layer': _INDEX,  # And < model.trunk_depth; 0: no skip.
    'model.color_width': _COUNT,
    'model.color_depth': _COUNT,
    'model.xyz_freqs': _INDEX,  # 0: the raw position only.
    'model.dir_freqs': _INDEX,
    'model.expr_dim': OrNone(_COUNT, 'taken from the data'),
    # 0 would silence the expression; that is model.use_expression = False.
    'model.expr_scale': _POSITIVE,
    'model.expr_norm': Choice(CHOICES['model.expr_norm']),
    'model.latent_dim': _COUNT,
    'model.use_expression': Bool(),
    'model.use_latent': Bool(),
    'model.use_viewdirs': Bool(),
    'model.compute_dtype': Choice(CHOICES['model.compute_dtype']),
    'model.field': Choice(CHOICES['model.field']),
    'model.hash_levels': _COUNT,
    'model.hash_features': _COUNT,
    # Rows of a hashed level: 2**k; int32 row indices bound the total.
    'model.hash_log2_size': Int(4, 26),
    'model.hash_base_resolution': _COUNT,
    'model.hash_max_resolution': _COUNT,  # And >= hash_base_resolution.
    'model.hash_width': _COUNT,
    'model.hash_depth': _COUNT,
    'model.hash_geo_features': _INDEX,
    # --- render
    # Resampling uses the weights of the inner coarse samples: at least 3.
    'render.num_coarse': Int(3),
    'render.num_fine': Int(0),  # 0: one level (no coarse network).
    'render.noise_std': _NON_NEGATIVE,
    'render.chunk': _COUNT,
    'render.occupancy': Bool(),
    'render.occupancy_resolution': Int(2, 256),
    'render.occupancy_threshold': _NON_NEGATIVE,
    # --- train
    'train.batch_rays': _COUNT,
    'train.max_steps': _COUNT,
    'train.max_seconds': OrNone(_POSITIVE, 'no limit'),
    'train.lr': _POSITIVE,
    'train.table_lr': OrNone(_POSITIVE, 'train.lr'),
    'train.adam_eps': _POSITIVE,
    'train.warmup_steps': _INDEX,
    'train.lr_decay_steps': _COUNT,
    # 1 keeps the rate constant; above 1 the rate would grow.
    'train.lr_decay_rate': Number(0, 1, low_open=True),
    'train.latent_reg': _NON_NEGATIVE,
    'train.latent_prior': Choice(CHOICES['train.latent_prior']),
    'train.latent_dropout': Number(0, 1, high_open=True),
    'train.latent_noise': _NON_NEGATIVE,
    'train.seed': _INDEX,
    'train.log_every': _COUNT,
    'train.eval_every': _COUNT,
    'train.checkpoint_every': _COUNT,
    'train.keep_checkpoints': _COUNT,
    'train.occupancy_every': _COUNT,
    'train.occupancy_warmup': _INDEX,
    # --- parallel
    'parallel.mode': Choice(CHOICES['parallel.mode']),
    # --- eval
    'eval.latent': Choice(CHOICES['eval.latent']),
    'eval.latent_frame': _INDEX,  # Below the training frames: checked on load.
    'eval.preview_frames': _INDEX,  # 0: no previews.
    'eval.optimize_steps': _COUNT,
    'eval.optimize_rays': _COUNT,
    'eval.optimize_lr': _POSITIVE,
    'eval.optimize_batch': _COUNT,
}


def _near_far(flat: Mapping[str, Any]) -> Optional[str]:
  if flat['data.near'] < flat['data.far']:
    return None
  return (f'config.data.near = {flat["data.near"]!r}: expected a number < '
          f'config.data.far ({flat["data.far"]!r}); samples lie between '
          'near and far.')


def _skip_layer(flat: Mapping[str, Any]) -> Optional[str]:
  skip, depth = flat['model.skip_layer'], flat['model.trunk_depth']
  if skip < depth:
    return None
  return (f'config.model.skip_layer = {skip!r}: expected an integer < '
          f'config.model.trunk_depth ({depth!r}), the index of the trunk '
          'layer the input is fed to again (0: no skip connection).')


def _synthetic_downscale(flat: Mapping[str, Any]) -> Optional[str]:
  if flat['data.dir'] is not None:
    return None  # The image size of a dataset is known once it is read.
  if flat['data.downscale'] <= flat['data.synthetic_size']:
    return None
  return (f'config.data.downscale = {flat["data.downscale"]!r}: expected an '
          f'integer <= config.data.synthetic_size '
          f'({flat["data.synthetic_size"]!r}), the image side of the built-in '
          'person (data.dir is unset).')


def _hash_resolutions(flat: Mapping[str, Any]) -> Optional[str]:
  base = flat['model.hash_base_resolution']
  top = flat['model.hash_max_resolution']
  if top >= base:
    return None
  return (f'config.model.hash_max_resolution = {top!r}: expected an integer '
          f'>= config.model.hash_base_resolution ({base!r}), the finest '
          "level's cells per axis.")


# (keys read, check): a check runs only when its keys passed their own rules.
_CROSS_RULES = (
    (('data.near', 'data.far'), _near_far),
    (('model.skip_layer', 'model.trunk_depth'), _skip_layer),
    (('data.dir', 'data.downscale', 'data.synthetic_size'),
     _synthetic_downscale),
    (('model.hash_base_resolution', 'model.hash_max_resolution'),
     _hash_resolutions),
)


def expected(key: str) -> str:
  """What `key` ('train.lr') accepts, as text: 'a number > 0'."""
  return RULES[key].expected


def _did_you_mean(key: str) -> str:
  """' (did you mean config.train.lr?)' for 'train.lrr', or ''."""
  section, _, leaf = key.rpartition('.')
  siblings = {k.rpartition('.')[2]: k for k in KEYS
              if k.rpartition('.')[0] == section}
  if siblings:
    # A known section: only its own keys, by their names alone.
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.6)
    close = [siblings[c] for c in close]
  else:
    close = difflib.get_close_matches(key, KEYS, n=1, cutoff=0.8)
  return f' (did you mean config.{close[0]}?)' if close else ''


def validate(config: Any, check_keys: bool = True) -> None:
  """Checks every value of a config before anything is built from it.

  Args:
    config: a ConfigDict (as train.py parses it) or its nested dict.
    check_keys: also require exactly the current key set (a config saved by
      an older version goes through `upgrade` first).

  Raises:
    ConfigError: one line naming the first bad key, its value and what is
      expected.
  """
  flat = flatten(config)
  if check_keys:
    for key in flat:
      if key not in _KEY_SET:
        raise ConfigError(
            f'config.{key} = {_show(flat[key])}: unknown key'
            f'{_did_you_mean(key)}.')
    for key in KEYS:
      if key not in flat:
        raise ConfigError(
            f'config.{key}: missing (expected {RULES[key].expected}); a '
            'config saved by an older version goes through '
            'config_lib.upgrade first.')
  for key in KEYS:
    if key in flat and not RULES[key].accepts(flat[key]):
      raise ConfigError(f'config.{key} = {_show(flat[key])}: '
                        f'{RULES[key].explain(flat[key], key)}')
  for keys, check in _CROSS_RULES:
    if all(k in flat for k in keys):
      message = check(flat)
      if message:
        raise ConfigError(message)


# --- Saved configs ------------------------------------------------------------


class _FromPreset:
  """ADDED value: take it from the saved config's preset (any value keeps the
  old behaviour, because the key only matters for a feature added with it)."""

  def __repr__(self) -> str:
    return 'FROM_PRESET'


FROM_PRESET = _FromPreset()

# Keys added since the first config that could be saved (38dd2aa), each with
# the value that reproduces what the code did before the key existed, and
# where that comes from (`git log -p -- configs/person.py`). Every key of
# KEYS that an older config may lack must be here: config_lib_test checks
# each historical key set. Add a row with every new key.
ADDED: dict[str, tuple[Any, str]] = {
    # 2d98eed (training loop; the first commit that saved configs from
    # train.py). Only configs saved through the checkpoint API before it
    # lack it; it only sets how many val previews are written.
    'eval.preview_frames': (FROM_PRESET, '2d98eed: val previews per eval'),
    # 4e4287a: eval.latent = 'optimize' got its settings; before, nothing
    # read them. Evaluation only.
    'eval.optimize_steps': (FROM_PRESET, "4e4287a: 'optimize' settings"),
    'eval.optimize_rays': (FROM_PRESET, "4e4287a: 'optimize' settings"),
    'eval.optimize_lr': (FROM_PRESET, "4e4287a: 'optimize' settings"),
    'eval.optimize_batch': (FROM_PRESET, "4e4287a: 'optimize' settings"),
    # 3526f5f: before it the prior was ||gamma_i||_2 and gamma was neither
    # dropped nor perturbed.
    'train.latent_prior': ('norm', '3526f5f: the prior was ||gamma||_2'),
    'train.latent_dropout': (0.0, '3526f5f: no gamma dropout before'),
    'train.latent_noise': (0.0, '3526f5f: no gamma noise before'),
    # a076581: before it expressions were only multiplied by expr_scale.
    'model.expr_norm': ('scale', 'a076581: expressions were scaled only'),
    # Present since 38dd2aa, so never missing from a saved config; its
    # default was 1/3 until a4154e9 made it 1.
    'model.expr_scale': (1.0 / 3.0, '38dd2aa..a4154e9: the default was 1/3'),
    # Added with the config layer: no time limit before.
    'train.max_seconds': (None, 'config_lib: no time limit before'),
    # Added with the hash field and the occupancy grid: before, the MLP field
    # with stratified coarse samples and plain Adam was the only model.
    'model.field': ('mlp', 'hash field: the MLP was the only field'),
    **{f'model.hash_{k}': (FROM_PRESET, 'hash field: read only by it')
       for k in ('levels', 'features', 'log2_size', 'base_resolution',
                 'max_resolution', 'width', 'depth', 'geo_features')},
    'render.occupancy': (False, 'occupancy grid: none before'),
    'render.occupancy_resolution': (FROM_PRESET, 'occupancy: read only by it'),
    'render.occupancy_threshold': (FROM_PRESET, 'occupancy: read only by it'),
    'train.occupancy_every': (FROM_PRESET, 'occupancy: read only by it'),
    'train.occupancy_warmup': (FROM_PRESET, 'occupancy: read only by it'),
    'train.table_lr': (None, 'hash field: one learning rate before'),
    'train.adam_eps': (1e-8, "hash field: optax.adam's default before"),
    'train.warmup_steps': (0, 'hash field: no warm-up before'),
}

# Renamed keys, old dotted key -> new dotted key (none yet).
RENAMED: dict[str, str] = {}

# Removed keys: dotted key -> (the saved values under which dropping the key
# keeps the old behaviour, why it went). A saved value outside them cannot be
# reproduced by this version and is an error. None yet.
REMOVED: dict[str, tuple[tuple[Any, ...], str]] = {}


def _preset_values(preset: Any) -> dict[str, Any]:
  name = preset if preset in presets.PRESETS else 'paper'
  return flatten(presets.get_config(name))


def upgrade(saved: Any) -> dict[str, Any]:
  """A config saved by any version, brought to the current key set.

  Keys added since it was saved get the value that reproduces the behaviour
  of the code that saved it (`ADDED`); renamed keys move (`RENAMED`); removed
  keys are dropped when their value is the one this version reproduces
  (`REMOVED`). Values are not checked here: `validate` the result (or use
  `from_saved`).

  A key this version does not know is an error, not kept or dropped: it was
  written by a newer version, and ignoring it would silently build or train
  a different avatar than the one saved.

  Args:
    saved: the nested dict of config.json or of a checkpoint's config (or a
      ConfigDict); not modified.

  Returns:
    A new nested dict with exactly the keys of KEYS, in their order.

  Raises:
    ConfigError: for an unknown key, a key that every version wrote but is
      missing, or a removed key whose value cannot be reproduced.
  """
  flat = flatten(saved)
  for old, new in RENAMED.items():
    if old in flat:
      if new in flat:
        raise ConfigError(f'config.{old} = {_show(flat[old])}: renamed to '
                          f'config.{new}, which the saved config also has.')
      flat[new] = flat.pop(old)
  for key, (reproducible, why) in REMOVED.items():
    if key in flat:
      value = flat.pop(key)
      if value not in reproducible:
        raise ConfigError(
            f'config.{key} = {_show(value)}: no longer supported ({why}); '
            f'this version reproduces only '
            f'{", ".join(_show(v) for v in reproducible)}.')
  for key in flat:
    if key not in _KEY_SET:
      raise ConfigError(
          f'config.{key} = {_show(flat[key])}: unknown key in a saved config'
          f'{_did_you_mean(key)}; it was probably written by a newer '
          'version of nerface_jax.')
  defaults = None
  upgraded = {}
  for key in KEYS:
    if key in flat:
      upgraded[key] = flat[key]
      continue
    if key not in ADDED:
      raise ConfigError(
          f'config.{key}: missing from the saved config, but every version '
          'wrote it; this is not a config saved by train.py.')
    value = ADDED[key][0]
    if value is FROM_PRESET:
      if defaults is None:
        defaults = _preset_values(flat.get('preset'))
      value = defaults[key]
    upgraded[key] = value
  return unflatten(upgraded)


def from_saved(saved: Any) -> ml_collections.ConfigDict:
  """The locked ConfigDict of a saved config: `upgrade`d and `validate`d.

  Built on the preset's own ConfigDict, so its fields keep their types (an
  unset `model.expr_dim` still takes an int) as after command-line parsing.

  Raises:
    ConfigError: as `upgrade` and `validate`.
  """
  upgraded = upgrade(saved)
  validate(upgraded)
  flat = flatten(upgraded)
  config = presets.get_config(
      flat['preset'] if flat['preset'] in presets.PRESETS else 'paper')
  config.update_from_flattened_dict(flat)
  config.lock()
  return config


# --- Resuming -----------------------------------------------------------------

# Keys that may differ between a checkpoint's config and the run resuming it:
# none changes the trained model or the data it learns from. The data itself
# is compared by `meta_conflicts` (the checkpoint's data facts), which is why
# data.dir and data.cache_dir (where the data lies) and model.expr_dim (None
# or the data's expression length, which construct_model checks) may change.
# Not here, on purpose: train.seed (the checkpoint's random state wins, so a
# new seed would be ignored), train.lr and the other training settings (a
# resumed run would no longer be the config it claims), and preset.
SAFE_ON_RESUME: tuple[str, ...] = (
    'data.dir',
    'data.cache_dir',
    'model.expr_dim',
    'render.chunk',
    'train.max_steps',
    'train.max_seconds',
    'train.log_every',
    'train.eval_every',
    'train.checkpoint_every',
    'train.keep_checkpoints',
    'parallel.mode',  # Checkpoints hold the same global state in both modes.
    'eval.latent',
    'eval.latent_frame',
    'eval.preview_frames',
    'eval.optimize_steps',
    'eval.optimize_rays',
    'eval.optimize_lr',
    'eval.optimize_batch',
)

_MISSING = object()


def _show_side(value: Any) -> str:
  return '(missing)' if value is _MISSING else _show(value)


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, bool) != isinstance(b, bool):
    return False
  return a == b


def resume_conflicts(saved: Any, current: Any,
                     allow: Sequence[str] = ()) -> list[str]:
  """The keys that differ between a checkpoint's config and the current one.

  Args:
    saved: the config saved with the checkpoint (any version; it is
      `upgrade`d here).
    current: the config of the run that wants to resume (ConfigDict or dict).
    allow: further keys that may differ (say, from a command-line flag).

  Returns:
    One 'model.trunk_width: saved 256, now 128' per differing key that is
    neither in SAFE_ON_RESUME nor in `allow`, in config order.

  Raises:
    ConfigError: when `saved` cannot be upgraded (see `upgrade`).
  """
  old = flatten(upgrade(saved))
  new = flatten(current)
  safe = set(SAFE_ON_RESUME) | set(allow)
  keys = list(KEYS) + sorted((old.keys() | new.keys()) - _KEY_SET)
  conflicts = []
  for key in keys:
    if key in safe:
      continue
    a, b = old.get(key, _MISSING), new.get(key, _MISSING)
    if not _same(a, b):
      conflicts.append(f'{key}: saved {_show_side(a)}, now {_show_side(b)}')
  return conflicts


# Lists at most this long are shown whole in meta conflicts.
_SHOW_VALUES = 8


def _close(a: Any, b: Any, rel_tol: float, abs_tol: float) -> bool:
  if _is_int(a) and _is_int(b):
    return a == b
  if _is_number(a) and _is_number(b):
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=abs_tol)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(
        _close(x, y, rel_tol, abs_tol) for x, y in zip(a, b))
  return _same(a, b)


def meta_conflicts(saved_meta: Mapping[str, Any],
                   current_meta: Mapping[str, Any],
                   ignore: Sequence[str] = ('data_dir',),
                   rel_tol: float = 1e-6,
                   abs_tol: float = 1e-6) -> list[str]:
  """The data facts of a checkpoint that the current data does not match.

  Compares `experiment.data_facts` as saved with a checkpoint and as computed
  from the data now: numbers and lists of numbers within the tolerance,
  everything else exactly. A key missing on either side (facts an older
  version did not save) is skipped.

  Args:
    saved_meta: the checkpoint's data facts.
    current_meta: the facts of the data about to be trained on.
    ignore: keys not compared. By default the data folder: a dataset may
      move, and the other facts (and the fingerprint) identify the data.
    rel_tol: relative tolerance of floats.
    abs_tol: absolute tolerance of floats.

  Returns:
    One 'height: saved 512, now 256' per differing fact, in the saved order;
    lists are shown whole up to 8 values, longer ones by their length or
    their first differing value ('expr_mean[3]: saved 0.1, now 0.4 (5 of 52
    values differ)').
  """
  old, new = flatten(saved_meta), flatten(current_meta)
  skip = set(ignore)
  conflicts = []
  for key, a in old.items():
    if key in skip or key not in new:
      continue
    b = new[key]
    if _close(a, b, rel_tol, abs_tol):
      continue
    if (isinstance(a, list) and isinstance(b, list) and
        max(len(a), len(b)) > _SHOW_VALUES):
      if len(a) != len(b):
        conflicts.append(f'{key}: saved {len(a)} values, now {len(b)}')
        continue
      differ = [i for i, (x, y) in enumerate(zip(a, b))
                if not _close(x, y, rel_tol, abs_tol)]
      i = differ[0]
      conflicts.append(f'{key}[{i}]: saved {_show(a[i])}, now {_show(b[i])} '
                       f'({len(differ)} of {len(a)} values differ)')
    else:
      conflicts.append(f'{key}: saved {_show(a)}, now {_show(b)}')
  return conflicts
