r"""Trains a NeRFace avatar.

  python train.py --config=configs/person.py --workdir=W \
      --config.data.dir=/path/to/person_1
  python train.py --config=configs/person.py:demo --workdir=W   # built-in person

Resumes from the latest checkpoint in W when there is one.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from nerface_jax import cli
from nerface_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a preset: '
    'configs/person.py[:paper|demo|tiny].', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for checkpoints, logs and previews.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
