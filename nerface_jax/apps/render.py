"""The flags and main of `render.py` (its usage text is the top-level
script's docstring, which absl shows for --help)."""

from absl import app
from absl import flags

from nerface_jax import avatar as avatar_lib
from nerface_jax import cli
from nerface_jax import config_lib
from nerface_jax import render_modes

MODES = ('split', 'orbit', 'expression', 'reenact')
SPLITS = ('train', 'val', 'test')

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (new, empty, or one '
                           'written by render.py before).')
_MODE = flags.DEFINE_enum('mode', 'split', MODES, 'What to render.')
_SPLIT = flags.DEFINE_enum(
    'split', None, SPLITS, 'Split to render (--mode=split, default test) or '
    'to take --frame from (orbit, expression; default train).')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, '--mode=split: render this dataset folder instead of '
    'the training one.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default latest).')
_LATENT = flags.DEFINE_enum(
    'latent', None, config_lib.CHOICES['eval.latent'],
    'Latent code of unseen frames (default: the config\'s eval.latent).')
_FRAME = flags.DEFINE_integer('frame', 0, 'Frame whose expression (orbit) or '
                              'pose and expression (expression) are used.')
_COEFF = flags.DEFINE_list('coeff', ['0'], '--mode=expression: coefficient '
                           'indices to sweep.')
_RANGE = flags.DEFINE_list('range', ['-1', '1'],
                           '--mode=expression: first,last value.')
_FRAMES = flags.DEFINE_integer('frames', 60, 'Frames of an orbit or a sweep.')
_DRIVING = flags.DEFINE_string('driving', None, '--mode=reenact: the driving '
                               'dataset folder.')
_DRIVING_SPLIT = flags.DEFINE_enum('driving_split', 'test', SPLITS,
                                   'Split of the driving dataset.')
_NEUTRAL = flags.DEFINE_integer(
    'neutral', None, 'Neutral training frame of the avatar (default: lowest '
    'expression norm).')
_DRIVING_NEUTRAL = flags.DEFINE_integer(
    'driving_neutral', None, 'Neutral frame of the driver (default: lowest '
    'expression norm).')
_FPS = flags.DEFINE_float('fps', 25.0, 'Frame rate of the videos.')
flags.mark_flags_as_required(['workdir', 'out'])


def _ints(values, flag):
  try:
    return [int(v) for v in values]
  except ValueError:
    raise app.UsageError(f'--{flag} takes integers, got {values}.') from None


def _check_flags():
  """Flag values, checked before the avatar loads."""
  if _FRAMES.value < 1:
    raise app.UsageError(f'--frames={_FRAMES.value}: expected at least 1.')
  if not _FPS.value > 0:
    raise app.UsageError(f'--fps={_FPS.value}: expected a positive number.')
  if _FRAME.value < 0:
    raise app.UsageError(f'--frame={_FRAME.value}: expected an index >= 0.')
  if _MODE.value == 'reenact' and not _DRIVING.value:
    raise app.UsageError('--mode=reenact needs --driving=DATASET_DIR.')
  if _MODE.value == 'expression':
    _ints(_COEFF.value, 'coeff')
    if len(_RANGE.value) != 2:
      raise app.UsageError(f'--range takes two numbers, got {_RANGE.value}.')


def _run():
  _check_flags()
  avatar = avatar_lib.load(_WORKDIR.value, _STEP.value)
  mode = _MODE.value
  if mode == 'split':
    report = render_modes.render_split(
        avatar, _OUT.value, _SPLIT.value or 'test', _DATA_DIR.value,
        _LATENT.value, _FPS.value)
    print({k: v if v is None else round(v, 4)
           for k, v in report['mean'].items()})
  elif mode == 'orbit':
    render_modes.render_orbit(avatar, _OUT.value, _SPLIT.value or 'train',
                            _FRAME.value, _FRAMES.value, _LATENT.value,
                            _FPS.value)
  elif mode == 'expression':
    try:
      low, high = (float(v) for v in _RANGE.value)
    except ValueError:
      raise app.UsageError(f'--range takes two numbers, got {_RANGE.value}.'
                           ) from None
    render_modes.render_expression(
        avatar, _OUT.value, _ints(_COEFF.value, 'coeff'), low, high,
        _FRAMES.value, _SPLIT.value or 'train', _FRAME.value, _LATENT.value,
        _FPS.value)
  else:
    if not _DRIVING.value:
      raise app.UsageError('--mode=reenact needs --driving=DATASET_DIR.')
    render_modes.render_reenact(avatar, _OUT.value, _DRIVING.value,
                              _DRIVING_SPLIT.value, _NEUTRAL.value,
                              _DRIVING_NEUTRAL.value, _LATENT.value, _FPS.value)


def main(argv):
  del argv  # cli.run_main refuses positional arguments.
  _run()


def run():
  """The console-script entry point (`nerface-render`)."""
  app.run(cli.run_main(main, 'render.py'), flags_parser=cli.parse_flags)
