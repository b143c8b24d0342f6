"""A training workdir: what may be in it, and one run at a time.

Training writes only into a workdir that is new, empty, or one it wrote
before (it holds the marker file), so a `config.json` or anything else a user
keeps there is never overwritten. A lock file holds the PID and host of the
run using it; a second run is refused, naming them. A lock left by a process
that died on this host is taken over.
"""

import json
import os
import pathlib
import socket
import time
from typing import Optional

from nerface_jax import errors

MARKER = '.nerface-train'
LOCK = '.lock'
# What training writes (events files have their own prefix).
OWN_NAMES = frozenset({MARKER, LOCK, 'config.json', 'checkpoints',
                       'metrics.jsonl', 'previews'})
EVENTS_PREFIX = 'events.out.tfevents.'
# Folders written by render.py and the other tools carry their own markers.
FOREIGN_MARKERS = ('.nerface-render', '.nerface-export', '.nerface-view')


def _is_ours(entry: pathlib.Path) -> bool:
  if entry.name in OWN_NAMES or entry.name.startswith(EVENTS_PREFIX):
    return True
  return entry.is_dir() and any((entry / m).is_file() for m in FOREIGN_MARKERS)


def check(workdir: pathlib.Path):
  """Refuses a workdir training did not write (before anything is written).

  Raises:
    errors.TrainingError: when `workdir` is a file, or a folder holding
      files training did not write.
  """
  if workdir.exists() and not workdir.is_dir():
    raise errors.TrainingError(f'{workdir}: --workdir exists and is not a '
                               'folder.')
  if not workdir.is_dir() or (workdir / MARKER).is_file():
    return
  entries = sorted(workdir.iterdir())
  # Workdirs of earlier versions have no marker but do have checkpoints.
  if (workdir / 'checkpoints').is_dir() and all(_is_ours(e) for e in entries):
    return
  if entries:
    names = ', '.join(e.name for e in entries[:4])
    raise errors.TrainingError(
        f'{workdir}: the folder holds files that train.py did not write '
        f'({names}{", ..." if len(entries) > 4 else ""}); choose a new or '
        'empty --workdir.')


def mark(workdir: pathlib.Path):
  """Marks `workdir` as written by training (call once it is accepted)."""
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / MARKER).write_text('Written by train.py.\n')


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class Lock:
  """`<workdir>/.lock` while a run trains there (a context manager)."""

  def __init__(self, workdir: pathlib.Path):
    self.path = workdir / LOCK
    self._held = False

  def acquire(self) -> Optional[str]:
    """Takes the lock; returns a note when a stale lock was taken over.

    Raises:
      errors.TrainingError: when another live run holds it.
    """
    note = None
    record = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': time.strftime('%Y-%m-%d %H:%M:%S')}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder()
        same_host = holder.get('host') == record['host']
        pid = holder.get('pid')
        if same_host and isinstance(pid, int) and not _alive(pid):
          note = (f'{self.path}: took over the lock of process {pid}, which '
                  'is no longer running.')
          self.path.unlink(missing_ok=True)
          continue
        raise errors.TrainingError(
            f'{self.path.parent}: another run is training here (process '
            f'{pid} on {holder.get("host")}, since {holder.get("started")}). '
            f'Wait for it, or delete {self.path} if that run is gone.'
        ) from None
      with os.fdopen(fd, 'w') as f:
        json.dump(record, f)
      self._held = True
      return note
    raise errors.TrainingError(f'{self.path}: could not take the lock.')

  def _holder(self) -> dict:
    try:
      value = json.loads(self.path.read_text())
      return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
      return {}

  def release(self):
    if self._held:
      self.path.unlink(missing_ok=True)
      self._held = False

  def __enter__(self) -> 'Lock':
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
