"""Errors that end a run with one line for the user instead of a traceback.

Entry points catch `UserError` (and `data.DatasetError`, `config_lib.ConfigError`)
and print the message alone; everything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
  """Something the user can fix; the message names what and where."""


class RenderError(UserError):
  """Rendering cannot proceed; the message says why."""


class TrainingError(UserError):
  """Training cannot go on; the message says why and what was kept."""
