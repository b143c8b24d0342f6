r"""Renders a trained avatar (DESIGN.md section 6).

  python render.py --workdir=W --out=O [--split=test]
      [--mode=split|orbit|expression|reenact]

Reads W's saved config.json and its latest checkpoint.
"""

import pathlib

from absl import app
from absl import flags

MODES = ('split', 'orbit', 'expression', 'reenact')

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir.')
_OUT = flags.DEFINE_string('out', None, 'Output folder.')
_MODE = flags.DEFINE_enum('mode', 'split', MODES, 'What to render.')
_SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'],
                           'Split rendered by --mode=split.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None, 'Render a split of this dataset folder instead.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default latest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  workdir = pathlib.Path(_WORKDIR.value).expanduser()
  if not (workdir / 'config.json').is_file():
    raise app.UsageError(f'{workdir}: no config.json; is this a training '
                         'workdir (python train.py --workdir=...)?')
  checkpoints = workdir / 'checkpoints'
  if not checkpoints.is_dir() or not any(checkpoints.iterdir()):
    raise app.UsageError(f'{checkpoints}: no checkpoint to render from; '
                         'train first.')
  raise app.UsageError('Rendering from checkpoints is not available in this '
                       'version.')


if __name__ == '__main__':
  app.run(main)
