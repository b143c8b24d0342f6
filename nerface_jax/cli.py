"""Command-line helpers shared by the entry points."""

import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

from nerface_jax import config_lib
from nerface_jax import data
from nerface_jax import errors

VERBOSE = flags.DEFINE_bool(
    'verbose', False, 'Show tracebacks of errors and the logs of the '
    'libraries (orbax, JAX, TensorStore).')

# Errors the user can fix: one line, exit status 2, no traceback.
USER_ERRORS = (errors.UserError, data.DatasetError, config_lib.ConfigError)
USAGE_EXIT = 2


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
  argv = resolve_config_arg(argv)
  for value in _config_values(argv):
    path = value.partition(':')[0]
    if not os.path.isfile(path):
      sys.stderr.write(f'{os.path.basename(argv[0])}: error: --config={value}:'
                       f' no such config file {path!r} (the presets are '
                       'configs/person.py[:paper|demo|tiny]).\n')
      sys.exit(USAGE_EXIT)
  try:
    return parse_flags_strict(argv, flag_values)
  except flags.Error as e:
    sys.stderr.write(f'{os.path.basename(argv[0])}: error: {_one_line(e)} '
                     '(--helpshort lists the flags)\n')
    sys.exit(USAGE_EXIT)


def _one_line(error: BaseException) -> str:
  """One line of an error. ml_collections wraps an error of the config file
  in a traceback: its last line says what went wrong."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if not lines:
    return type(error).__name__
  if len(lines) > 1 and 'Traceback (most recent call last)' in str(error):
    return lines[-1].split(': ', 1)[-1]
  return lines[0]


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


def _config_values(argv: Sequence[str]) -> list[str]:
  values = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      values.append(arg[len('--config='):])
    elif arg == '--config' and i + 1 < len(argv):
      values.append(argv[i + 1])
  return values


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


class _LibraryFilter:
  """Drops records of noisy libraries below `level` (orbax logs every file it
  writes, and a failed restore as pages of errors our one line replaces)."""

  def __init__(self, libraries: Sequence[str], level: int):
    self._markers = tuple(f'{os.sep}{name}{os.sep}' for name in libraries)
    self._level = level

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= self._level or not any(
        marker in record.pathname for marker in self._markers)


NOISY = ('orbax', 'jax', 'jaxlib', 'etils', 'tensorstore', 'absl')


def quiet_library_logs(libraries: Sequence[str] = NOISY,
                       verbose: bool = False):
  """Keeps the libraries' INFO chatter out of the terminal, and unless
  `verbose` their warnings and errors too."""
  log_filter = _LibraryFilter(libraries, logging.WARNING if verbose else
                              logging.CRITICAL)
  absl_logging.get_absl_handler().addFilter(log_filter)
  logging.getLogger().addFilter(log_filter)
  if not verbose:
    # TensorStore's C++ logging is separate from Python's.
    os.environ.setdefault('TENSORSTORE_MIN_LOG_LEVEL', '3')


def run_main(main: Callable[[list[str]], Any], program: str
             ) -> Callable[[list[str]], Any]:
  """`main` for absl's app.run: a user error ends in one line on stderr and
  exit status 2 (`--verbose` shows the traceback instead)."""

  def wrapped(argv):
    quiet_library_logs(verbose=VERBOSE.value)
    try:
      if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
      return main(argv)
    except (*USER_ERRORS, app.UsageError) as e:
      if VERBOSE.value:
        raise
      message = ' '.join(str(e).split('\n'))
      sys.stderr.write(f'{program}: error: {message}\n')
      sys.exit(USAGE_EXIT)

  return wrapped
