"""Training logs: TensorBoard event files, metrics.jsonl and a progress line.

Event files are written by `tensorboardX` (TFRecord framing, `Event`
protocol buffers, CRC32C), which needs neither TensorFlow nor tensorboard.
`metrics.jsonl` is the authoritative record of a run; the event files are for
viewing it.
"""

import glob
import itertools
import json
import math
import os
import pathlib
import socket
import sys
import tempfile
import time
from typing import Any, TextIO

import numpy as np
import tensorboardX

# tensorboardX writes on a background thread and flushes the file every this
# many seconds (its default is 120 s, which leaves TensorBoard far behind).
FLUSH_SECS = 2

# Numbers the writers of this process, so two in one folder within the same
# second (the resolution of tensorboardX's file name) get different files.
_WRITER_NUMBERS = itertools.count()


class EventWriter:
  """Appends scalars and images to a new TensorBoard event file in `logdir`.

  Attributes:
    logdir: pathlib.Path, the folder (created if needed).
    path: pathlib.Path of the event file,
      `events.out.tfevents.<time>.<host>.<pid>.<n>` (None in the unexpected
      case that it cannot be found after tensorboardX made it).
  """

  def __init__(self, logdir: os.PathLike[str] | str):
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    # tensorboardX names the file `events.out.tfevents.<time>.<host><suffix>`
    # and opens it with 'wb': the pid and a per-process number keep another
    # writer started within the same second (in another process, or in this
    # one) from truncating this one's file.
    suffix = f'.{os.getpid()}.{next(_WRITER_NUMBERS)}'
    self._writer = tensorboardX.SummaryWriter(
        str(self.logdir), flush_secs=FLUSH_SECS, filename_suffix=suffix)
    # The file exists once the writer is made (it holds the version event);
    # finding it by its unique suffix avoids tensorboardX's private fields.
    pattern = (f'events.out.tfevents.*.{glob.escape(socket.gethostname())}'
               f'{glob.escape(suffix)}')
    found = sorted(self.logdir.glob(pattern))
    self.path = found[0] if len(found) == 1 else None
    self._closed = False

  def _check_open(self):
    # SummaryWriter would silently start a new file after close().
    if self._closed:
      raise ValueError(f'EventWriter for {self.logdir} is closed.')

  def scalars(self, step: int, values: dict[str, float]):
    """Writes every finite value of `values` at `step`.

    Args:
      step: int, the training step.
      values: tag -> float (anything `float()` takes: Python, NumPy or JAX
        scalars). NaN and infinities are left out: TensorBoard's charts
        cannot draw them.
    """
    self._check_open()
    # One wall time for the whole call, as these values belong together.
    wall_time = time.time()
    for tag, value in values.items():
      value = float(value)
      if math.isfinite(value):
        self._writer.add_scalar(tag, value, int(step), walltime=wall_time)

  def image(self, step: int, tag: str, image: np.ndarray):
    """Writes an image (stored as PNG).

    Args:
      step: int, the training step.
      tag: str, the image's name in TensorBoard.
      image: uint8 [H, W, 3].
    """
    self._check_open()
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f'{tag}: expected a uint8 [H, W, 3] image, got '
                       f'{image.dtype} {image.shape}.')
    self._writer.add_image(tag, image, int(step), dataformats='HWC')

  def flush(self):
    """Writes out what the background thread has received.

    Events added in the last moments may still be queued; they reach the file
    within `FLUSH_SECS`, and all of them by `close()`.
    """
    if not self._closed:
      self._writer.flush()

  def close(self):
    """Writes every pending event and closes the file (idempotent)."""
    if not self._closed:
      self._writer.close()
      self._closed = True


def _row(line: str) -> dict[str, Any] | None:
  """The JSON object on `line`, or None if it is not one (e.g. cut short)."""
  try:
    row = json.loads(line)
  except ValueError:
    return None
  return row if isinstance(row, dict) else None


def _step(row: dict[str, Any]) -> float:
  """The row's 'step', or -inf for a row without a numeric one (kept)."""
  step = row.get('step')
  if isinstance(step, (int, float)) and not isinstance(step, bool):
    return step
  return -math.inf


class MetricsLog:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl`.

  Attributes:
    path: pathlib.Path of the file.
  """

  def __init__(self, path: os.PathLike[str] | str):
    self.path = pathlib.Path(path)

  def write(self, row: dict[str, Any]):
    """Appends `row` (str -> JSON-serialisable value) as one line."""
    with open(self.path, 'a') as f:
      f.write(json.dumps(row, sort_keys=True) + '\n')

  def rows(self) -> list[dict[str, Any]]:
    """Every row, in file order ([] when the file does not exist)."""
    if not self.path.exists():
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def drop_after(self, step: int) -> int:
    """Removes every row whose 'step' is greater than `step`.

    A run resumed from a checkpoint at `step` logs the later steps again;
    without this the rows between that checkpoint and the crash would appear
    twice. A line that is not a JSON object (a half-written last line after a
    kill) goes too. The file is replaced atomically, so a crash during this
    call leaves either the old or the new file, never a mix.

    Args:
      step: int, the last step to keep.

    Returns:
      int, how many lines were dropped (0 when the file does not exist).
    """
    if not self.path.exists():
      return 0
    with open(self.path) as f:
      text = f.read()
    kept, dropped = [], 0
    for line in text.split('\n'):
      if not line.strip():
        continue
      row = _row(line)
      if row is None or _step(row) > step:
        dropped += 1
      else:
        kept.append(line)
    # A last line without its newline would have the next write() appended
    # to it, so such a file is rewritten even when no row goes.
    if dropped == 0 and (not text or text.endswith('\n')):
      return 0
    self._replace(''.join(line + '\n' for line in kept))
    return dropped

  def _replace(self, text: str):
    """Atomically makes `text` the file's content, keeping its permissions."""
    mode = self.path.stat().st_mode & 0o7777
    # In the same folder, so os.replace is a rename within one file system.
    fd, temporary = tempfile.mkstemp(dir=self.path.parent,
                                     prefix=f'.{self.path.name}.',
                                     suffix='.tmp')
    try:
      with os.fdopen(fd, 'w') as f:
        f.write(text)
        f.flush()
        # On disk before the rename, or a crash could leave an empty file
        # under the real name.
        os.fsync(f.fileno())
      # mkstemp creates the file 0600; keep the log as readable as it was.
      os.chmod(temporary, mode)
      os.replace(temporary, self.path)
    except BaseException:
      pathlib.Path(temporary).unlink(missing_ok=True)
      raise
    # The rename itself is durable once the folder is synced.
    try:
      folder = os.open(self.path.parent, os.O_RDONLY)
    except OSError:
      return
    try:
      os.fsync(folder)
    except OSError:
      pass  # Some file systems cannot sync a folder; the rename still holds.
    finally:
      os.close(folder)


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return (f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else
          f'{rest // 60}:{rest % 60:02d}')


class Progress:
  """A one-line progress display: step, loss, PSNR, rays/s and ETA."""

  def __init__(self, total: int, stream: TextIO = sys.stderr):
    self.total = total
    self.stream = stream
    # On a terminal the line is redrawn; in a log file each update is a line.
    self._tty = hasattr(stream, 'isatty') and stream.isatty()

  def update(self, step: int, loss: float, psnr: float, rays_per_sec: float,
             steps_per_sec: float):
    width = 24
    done = int(width * step / max(self.total, 1))
    eta = (self.total - step) / steps_per_sec if steps_per_sec > 0 else 0.0
    line = (f'[{"#" * done}{"." * (width - done)}] step {step}/{self.total} '
            f'loss {loss:.5f} psnr {psnr:.2f} dB {rays_per_sec:,.0f} rays/s '
            f'ETA {_duration(eta)}')
    self.stream.write(('\r' + line) if self._tty else (line + '\n'))
    self.stream.flush()

  def close(self):
    if self._tty:
      self.stream.write('\n')
      self.stream.flush()
