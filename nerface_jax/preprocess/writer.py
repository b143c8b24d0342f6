"""Writing the dataset folder: splits, transforms json, report, atomicity.

Everything is written into a hidden sibling folder,
`.<out>.partial-<host>-<pid>`, and renamed onto the output at the end, so the
output folder either does not exist or holds a complete dataset, and a failed
or interrupted run loses nothing that was there before. A run killed outright
(SIGKILL, power loss) cannot remove its folder; the next run for the same
output removes it once its process is gone (`remove_stale_partials`).
`preprocess_report.json` records what was made from what; a second run with
the same input and options finds it and does nothing.
"""

import contextlib
import json
import math
import os
import pathlib
import re
import shutil
import socket
from typing import Any, Callable, Iterator, Optional

import numpy as np

from nerface_jax import data
from nerface_jax.preprocess import errors

REPORT_FILE = 'preprocess_report.json'
SPLITS = ('train', 'val', 'test')
JSON_DIGITS = 7  # Significant digits of the floats in the transforms json.


def splits(num_frames: int, test_fraction: float, val_fraction: float,
           seed: int) -> dict[str, np.ndarray]:
  """Positions (0 .. num_frames - 1, in time order) of each split.

  The last `test_fraction` of the frames in time are test (unseen poses and
  expressions after the training period); `val_fraction` of the rest, drawn
  with `seed`, are val; the rest train. Every split gets at least one frame.

  Args:
    num_frames: int kept frames (at least 3).
    test_fraction: float in (0, 1).
    val_fraction: float in (0, 1).
    seed: int.

  Returns:
    {'train', 'val', 'test'}: sorted int64 positions, together a partition.

  Raises:
    PreprocessError: fewer than 3 frames.
  """
  if num_frames < 3:
    raise errors.PreprocessError(
        f'only {num_frames} frame(s) with a tracked face; a dataset needs at '
        'least 3 (one each for train, val and test).')
  num_test = min(num_frames - 2, max(1, int(round(test_fraction * num_frames))))
  rest = num_frames - num_test
  num_val = min(rest - 1, max(1, int(round(val_fraction * rest))))
  rng = np.random.default_rng(seed)
  val = np.sort(rng.choice(rest, size=num_val, replace=False))
  return {'train': np.setdiff1d(np.arange(rest), val), 'val': val,
          'test': np.arange(rest, num_frames)}


def write_index_map(folder: pathlib.Path, frames: np.ndarray,
                    train: np.ndarray):
  """Writes `folder/index_map.npy` (see `data.make_index_map`).

  Only written frames are rows: frames skipped for having no usable face
  have no image, pose or latent code and are left out, so column 0 has gaps
  where they were (the report's "skipped" lists them).

  Args:
    folder: the dataset folder being written.
    frames: int [N] video frame index of every kept frame, in time order.
    train: int [T] positions in `frames` of the train split, in the order of
      transforms_train.json.
  """
  frames = np.asarray(frames, np.int64)
  np.save(folder / data.INDEX_MAP_FILE,
          data.make_index_map(frames, frames[np.asarray(train, np.int64)]))


def round_floats(values: np.ndarray) -> np.ndarray:
  """float64 copy rounded to JSON_DIGITS significant digits (compact json)."""
  values = np.asarray(values, np.float64)
  with np.errstate(divide='ignore'):
    magnitude = np.floor(np.log10(np.abs(np.where(values == 0, 1, values))))
  factor = 10.0 ** (JSON_DIGITS - 1 - magnitude)
  return np.round(values * factor) / factor


def transforms_json(intrinsics: np.ndarray, width: int,
                    frames: list[dict[str, Any]]) -> str:
  """The text of one transforms_<split>.json, one frame per line.

  Args:
    intrinsics: float [4] (fx, fy, cx, cy).
    width: int image width (for the redundant `camera_angle_x`).
    frames: entries with file_path, transform_matrix, expression, bbox.

  Returns:
    JSON text.
  """
  angle = 2.0 * math.atan(0.5 * width / float(intrinsics[0]))
  lines = [
      '{',
      # Readers of the original format that ignore `intrinsics` use the angle.
      f'  "camera_angle_x": {json.dumps(float(round_floats(angle)))},',
      f'  "intrinsics": {json.dumps(round_floats(intrinsics).tolist())},',
      '  "frames": [',
      ',\n'.join('    ' + json.dumps(frame) for frame in frames),
      '  ]',
      '}',
  ]
  return '\n'.join(lines) + '\n'


def read_report(out: pathlib.Path) -> Optional[dict[str, Any]]:
  """The report of an existing dataset folder, or None when unreadable."""
  try:
    return json.loads((out / REPORT_FILE).read_text())
  except (OSError, ValueError):
    return None


def check_output(out: pathlib.Path, fingerprint: str,
                 video: str) -> Optional[dict[str, Any]]:
  """Decides whether `out` may be written.

  Args:
    out: the output folder.
    fingerprint: hex digest of the input and every option that affects the
      output.
    video: the input, for messages.

  Returns:
    The existing report when `out` already holds this very dataset (nothing
    to do), else None (absent or empty: write it).

  Raises:
    PreprocessError: `out` is a file, or a folder holding anything else, or
      cannot be written (checked now, not after the long passes).
  """
  if not out.exists():
    _check_parent(out)
    return None
  if not out.is_dir():
    raise errors.PreprocessError(
        f'{out}: exists and is not a folder; choose another --out.')
  if not any(out.iterdir()):
    _check_parent(out)
    return None
  report = read_report(out)
  if report is not None and report.get('fingerprint') == fingerprint:
    return report
  if report is not None:
    what = (f'a different dataset (made from {report.get("video")} with '
            'other options)')
  elif (out / 'transforms_train.json').exists():
    what = 'a dataset made by another tool'
  else:
    what = 'other files'
  raise errors.PreprocessError(
      f'{out}: the output folder already holds {what}; not overwriting it '
      f'with the dataset of {video}. Remove it or choose another --out.')


def _host() -> str:
  """This host's name as it appears in partial folder names."""
  return re.sub(r'[^A-Za-z0-9._-]', '_', socket.gethostname()) or 'localhost'


def partial_path(out: pathlib.Path, pid: Optional[int] = None
                 ) -> pathlib.Path:
  """The staging folder of `out` for process `pid` (default: this one)."""
  pid = os.getpid() if pid is None else pid
  return out.parent / f'.{out.name}.partial-{_host()}-{pid}'


def _partial_owner(out: pathlib.Path, path: pathlib.Path
                   ) -> Optional[tuple[Optional[str], int]]:
  """(host, pid) of a staging folder of `out`, or None for any other name.

  The host is None for `.<out>.partial-<pid>`, the name of versions that did
  not record it (taken as this host's).
  """
  prefix = f'.{out.name}.partial-'
  if not path.name.startswith(prefix):
    return None
  match = re.fullmatch(r'(?:([A-Za-z0-9._-]+)-)?(\d+)',
                       path.name[len(prefix):])
  if match is None:
    return None
  return match.group(1), int(match.group(2))


def process_alive(pid: int) -> bool:
  """Whether process `pid` exists on this host (a zombie counts as alive).

  Where that cannot be told (not POSIX), every process counts as alive.
  """
  if pid <= 0:
    return False
  if os.name != 'posix':
    return True  # os.kill(pid, 0) would terminate it on Windows.
  try:
    os.kill(pid, 0)  # Signal 0: only checks that the process exists.
  except ProcessLookupError:
    return False
  except OSError:
    pass  # EPERM: it exists, owned by another user.
  return True


def remove_stale_partials(out: pathlib.Path,
                          log: Optional[Callable[[str], None]] = None
                          ) -> list[pathlib.Path]:
  """Removes staging folders of `out` left by runs that no longer exist.

  A folder is removed when it was made on this host by a process that is
  not running any more (a run killed before it could clean up). Folders of
  live processes (another run writing the same output right now), of other
  hosts (a shared filesystem: their processes cannot be checked from here)
  and this process's own are left alone.

  Args:
    out: the output folder.
    log: told about every folder removed, and about live ones left alone.

  Returns:
    The folders removed.
  """
  log = log or (lambda line: None)
  try:
    candidates = sorted(out.parent.iterdir())
  except OSError:
    return []  # No parent yet (nothing to clean) or unreadable.
  removed = []
  host = _host()
  for path in candidates:
    owner = _partial_owner(out, path)
    if owner is None or path.is_symlink() or not path.is_dir():
      continue
    owner_host, pid = owner
    if (owner_host is not None and owner_host != host) or pid == os.getpid():
      continue
    if process_alive(pid):
      log(f'leaving {path}: process {pid} is still running (another run '
          'writing the same output?).')
      continue
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
      log(f'cannot remove {path}, left by an interrupted run (process {pid} '
          'is gone); remove it by hand.')
    else:
      removed.append(path)
      log(f'removed {path}, left by an interrupted run (process {pid} is '
          'gone).')
  return removed


def _check_parent(out: pathlib.Path):
  """Raises PreprocessError unless `out`'s staging sibling can be made."""
  folder = out.parent
  while not folder.exists() and folder != folder.parent:
    folder = folder.parent
  if not folder.is_dir():
    raise errors.PreprocessError(
        f'{out}: cannot be created, {folder} is a file; choose another '
        '--out.')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise errors.PreprocessError(
        f'{out}: cannot be created, no permission to write in {folder}; '
        'choose another --out.')


@contextlib.contextmanager
def staging(out: pathlib.Path) -> Iterator[pathlib.Path]:
  """A temporary sibling of `out` to write into, renamed onto `out` at exit.

  On an exception the temporary folder is removed and `out` is untouched.

  Raises:
    PreprocessError: `out` was filled by someone else meanwhile.
  """
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = partial_path(out)
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  try:
    yield tmp
    if out.is_dir() and not any(out.iterdir()):
      out.rmdir()
    # Atomic on POSIX; fails (and cleans up) if `out` appeared meanwhile.
    try:
      os.rename(tmp, out)
    except OSError as e:
      if out.exists():
        raise errors.PreprocessError(
            f'{out}: appeared while this run was writing (another run with '
            'the same --out?); not overwriting it.') from e
      raise
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_json(path: pathlib.Path, value: Any):
  """Writes `value` as indented JSON."""
  path.write_text(json.dumps(value, indent=2) + '\n')
