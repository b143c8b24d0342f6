"""The one error type of the preprocessor, and quoting native libraries."""

import contextlib
import os
import sys
import tempfile
from typing import Callable, Iterator


class PreprocessError(ValueError):
  """Input the preprocessor cannot use; the message says which file, which
  frame where it applies, and what to do about it."""


@contextlib.contextmanager
def native_stderr() -> Iterator[Callable[[], str]]:
  """Diverts file descriptor 2 into a temporary file while active.

  Native libraries print straight to the descriptor (no Python logging):
  MediaPipe a handful of INFO and WARNING lines when a landmarker is created
  and on its first frame, FFmpeg a line about a file it cannot open. They
  are kept aside instead, and the yielded function returns them so that a
  failure can quote them in its one-line message.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)

    def text() -> str:
      captured.seek(0)
      return captured.read().decode(errors='replace')

    try:
      yield text
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)


def last_line(text: str) -> str:
  """The last non-empty line of captured native output ('' if none)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ''
