"""Writing the dataset folder: splits, transforms json, report, atomicity.

Everything is written into a hidden sibling folder and renamed onto the
output at the end, so the output folder either does not exist or holds a
complete dataset, and a failed or interrupted run loses nothing that was
there before. `preprocess_report.json` records what was made from what; a
second run with the same input and options finds it and does nothing.
"""

import contextlib
import json
import math
import os
import pathlib
import shutil
from typing import Any, Iterator, Optional

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
    PreprocessError: `out` is a file, or a folder holding anything else.
  """
  if not out.exists():
    return None
  if not out.is_dir():
    raise errors.PreprocessError(
        f'{out}: exists and is not a folder; choose another --out.')
  if not any(out.iterdir()):
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


@contextlib.contextmanager
def staging(out: pathlib.Path) -> Iterator[pathlib.Path]:
  """A temporary sibling of `out` to write into, renamed onto `out` at exit.

  On an exception the temporary folder is removed and `out` is untouched.
  """
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f'.{out.name}.partial-{os.getpid()}'
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir()
  try:
    yield tmp
    if out.is_dir() and not any(out.iterdir()):
      out.rmdir()
    # Atomic on POSIX; fails (and cleans up) if `out` appeared meanwhile.
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def write_json(path: pathlib.Path, value: Any):
  """Writes `value` as indented JSON."""
  path.write_text(json.dumps(value, indent=2) + '\n')
