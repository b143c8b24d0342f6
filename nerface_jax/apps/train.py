"""The flags and main of `train.py` (its usage text is the top-level
script's docstring, which absl shows for --help)."""

from absl import app
from absl import flags
from ml_collections import config_flags

from nerface_jax import cli
from nerface_jax import parallel
from nerface_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, optionally with a preset: '
    'configs/person.py[:paper|demo|tiny].', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Folder for checkpoints, logs and previews.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 of a multi-host job.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the multi-host job.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'Index of this process in the multi-host job.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a job that JAX detects by itself (TPU pods, '
    'SLURM, Open MPI, JAX_COORDINATOR_ADDRESS).')
_STEP = flags.DEFINE_integer(
    'step', None, 'Resume from this checkpoint instead of the newest intact '
    'one (newer ones are moved aside to checkpoints/superseded/).')
_ALLOW_CHANGE = flags.DEFINE_list(
    'allow_change', [], 'Config keys that may differ from the checkpoint\'s '
    'when resuming, e.g. train.lr after a divergence.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # cli.run_main refuses positional arguments.
  parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value, auto=_DISTRIBUTED.value)
  train_lib.main(_CONFIG.value, _WORKDIR.value, _STEP.value,
                 tuple(_ALLOW_CHANGE.value))


def run():
  """The console-script entry point (`nerface-train`)."""
  app.run(cli.run_main(main, 'train.py'), flags_parser=cli.parse_flags)
