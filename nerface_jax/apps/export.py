"""The flags and main of `export.py` (its usage text is the top-level
script's docstring, which absl shows for --help)."""

from absl import app
from absl import flags

from nerface_jax import avatar as avatar_lib
from nerface_jax import cli
from nerface_jax import config_lib
from nerface_jax import errors
from nerface_jax import mesh

SPLITS = ('train', 'val', 'test')

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.')
_OUT = flags.DEFINE_string('out', None, 'Output folder (new, empty, or one '
                           'written by render.py or export.py before).')
_SPLIT = flags.DEFINE_enum('split', 'train', SPLITS,
                           'Split to take --frame from.')
_FRAME = flags.DEFINE_integer(
    'frame', 0, 'Frame whose expression (unless --expression) and latent '
    'code are used.')
_EXPRESSION = flags.DEFINE_string(
    'expression', None, 'Expression coefficients instead of the frame\'s: a '
    '.npy file of E numbers, or E comma-separated numbers.')
_COEFF = flags.DEFINE_list(
    'coeff', None, 'Expression coefficient indices to sweep (one mesh per '
    'step of --range over --frames).')
_RANGE = flags.DEFINE_list('range', ['-1', '1'],
                           'With --coeff: first,last value.')
_FRAMES = flags.DEFINE_integer('frames', 5, 'With --coeff: meshes of the '
                               'sweep.')
_RESOLUTION = flags.DEFINE_integer(
    'resolution', mesh.DEFAULT_RESOLUTION,
    'Grid points along the longest side of the head\'s box.')
_THRESHOLD = flags.DEFINE_float(
    'threshold', None, 'Density (per unit of world length) of the surface '
    '(default: half the typical peak density along the frontal training '
    'camera\'s rays through the face).')
_LATENT = flags.DEFINE_enum(
    'latent', None, config_lib.CHOICES['eval.latent'],
    'Latent code instead of the frame\'s own (its trained code on the train '
    'split); optimize falls back to mean.')
_COMPONENTS = flags.DEFINE_enum(
    'components', 'largest', mesh.COMPONENTS,
    'Keep the largest connected part of the surface, or all parts.')
_BOX = flags.DEFINE_list(
    'box', None, 'x0,y0,z0,x1,y1,z1: the region to mesh in world coordinates '
    '(default: where all training cameras\' views between near and far '
    'overlap).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default latest).')
flags.mark_flags_as_required(['workdir', 'out'])


def _sweep():
  """(coeffs, low, high) of --coeff and --range, or (None, 0, 0)."""
  if not _COEFF.value:
    return None, 0.0, 0.0
  try:
    coeffs = [int(v) for v in _COEFF.value]
  except ValueError:
    raise errors.UserError(f'--coeff takes integers, got '
                           f'{",".join(_COEFF.value)}.') from None
  try:
    low, high = (float(v) for v in _RANGE.value)
  except ValueError:
    raise errors.UserError(f'--range takes two numbers, got '
                           f'{",".join(_RANGE.value)}.') from None
  return coeffs, low, high


def _run():
  # Everything that needs no checkpoint is checked before one loads.
  mesh.check_settings(_RESOLUTION.value, _THRESHOLD.value, _FRAMES.value)
  coeffs, low, high = _sweep()
  box = None if _BOX.value is None else mesh.parse_box(_BOX.value)
  avatar = avatar_lib.load(_WORKDIR.value, _STEP.value)
  expression = (None if _EXPRESSION.value is None else
                mesh.parse_expression(_EXPRESSION.value, avatar.expr_dim))
  report = mesh.export(
      avatar, _OUT.value, split=_SPLIT.value, frame=_FRAME.value,
      expression=expression, coeffs=coeffs, low=low, high=high,
      num=_FRAMES.value, resolution=_RESOLUTION.value,
      threshold=_THRESHOLD.value, latent=_LATENT.value,
      components=_COMPONENTS.value, box=box)
  names = ', '.join(f'{m["ply"]}, {m["obj"]}' for m in report['meshes'])
  print(f'Wrote {names} and their previews to {_OUT.value}.')


def main(argv):
  del argv  # cli.run_main refuses positional arguments.
  _run()


def run():
  """The console-script entry point (`nerface-export`)."""
  app.run(cli.run_main(main, 'export.py'), flags_parser=cli.parse_flags)
