"""Command-line helpers shared by the entry points."""

import logging
import os
import sys
from typing import Optional, Sequence

from absl import flags
from absl import logging as absl_logging


def parse_flags(argv: Sequence[str],
                flag_values: Optional[flags.FlagValues] = None) -> list[str]:
  """Parses flags; a mistyped `--config.x=y` becomes a one-line error.

  ml_collections reports an override of a key that does not exist as a
  KeyError/AttributeError from deep inside flag parsing. Here every parsing
  problem is one line on stderr and exit status 1, as absl does for its own
  flag errors, instead of a traceback.

  Args:
    argv: the full command line, program name first.
    flag_values: the flag set (default: absl's global FLAGS).

  Returns:
    The arguments left after flag parsing (program name first).
  """
  try:
    return parse_flags_strict(resolve_config_arg(argv), flag_values)
  except flags.Error as e:
    sys.stderr.write(f'FATAL Flags parsing error: {e}\n'
                     'Pass --helpshort or --helpfull to see help on flags.\n')
    sys.exit(1)


def packaged_config(value: str) -> str:
  """`--config`'s value, with the presets of the installed package as a
  fallback: `demo` alone, or a `configs/person.py` that is not there (the
  package installed and run from another folder), become the packaged
  presets file (`nerface_jax/presets.py`), which defines the same presets.

  Args:
    value: 'PATH[:PRESET]' or 'PRESET'.

  Returns:
    'PATH[:PRESET]' naming a file that exists, where a fallback applies.
  """
  from nerface_jax import presets  # pylint: disable=g-import-not-at-top
  path, colon, preset = value.partition(':')
  if os.path.exists(path):
    return value
  if not colon and path in presets.PRESETS:
    return f'{presets.__file__}:{path}'
  if os.path.basename(path) == 'person.py':
    return presets.__file__ + colon + preset
  return value


def resolve_config_arg(argv: Sequence[str]) -> list[str]:
  """argv with `--config=VALUE` (or `--config VALUE`) resolved by
  `packaged_config`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config='):
      out[i] = '--config=' + packaged_config(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(out):
      out[i + 1] = packaged_config(out[i + 1])
  return out


def parse_flags_strict(
    argv: Sequence[str],
    flag_values: Optional[flags.FlagValues] = None) -> list[str]:
  """Like `parse_flags` but raises `flags.Error` instead of exiting."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  try:
    return flag_values(argv)
  except (KeyError, AttributeError) as e:
    # The KeyError (with ml_collections' "Did you mean" hint) arrives wrapped
    # in an AttributeError; unwrap to its text.
    cause = e
    while cause.args and isinstance(cause.args[0], BaseException):
      cause = cause.args[0]
    message = str(cause.args[0] if cause.args else cause).replace('\n', '. ')
    raise flags.Error(f'unknown config key {message}') from None


class _LibraryInfoFilter:
  """Drops INFO records of noisy libraries (orbax logs every file it writes)."""

  def __init__(self, libraries: Sequence[str]):
    self._markers = tuple(f'{os.sep}{name}{os.sep}' for name in libraries)

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        marker in record.pathname for marker in self._markers)


def quiet_library_logs(libraries: Sequence[str] = ('orbax', 'jax')):
  """Keeps warnings of `libraries` but not their INFO chatter."""
  log_filter = _LibraryInfoFilter(libraries)
  absl_logging.get_absl_handler().addFilter(log_filter)
  logging.getLogger().addFilter(log_filter)
