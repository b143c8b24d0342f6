"""Loading and validating a dataset folder in the NeRFace format.

The format (docs/architecture.md §3) is the one of the original NeRFace release:
`transforms_{train,val,test}.json`, images at `<file_path>.png`, a static
background at `bg/00050.png` and, optionally, `index_map.npy` (each video
frame's row in the train split, read by the original evaluation script).
Every problem found is reported as a `DatasetError` that names the file and,
where it applies, the frame, so a malformed dataset never explains itself
with a bare traceback.

Images stay uint8 on the host (a 5,500-frame 512x512 subject is 4.3 GB);
conversion to float happens on the device, per batch.
"""

import concurrent.futures
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image

SPLITS = ('train', 'val', 'test')
BACKGROUND_FILE = os.path.join('bg', '00050.png')
INDEX_MAP_FILE = 'index_map.npy'
# Tracker output is rigid but stored with a few significant digits; a loose
# tolerance accepts that while still catching scaled or sheared matrices.
ORTHONORMAL_TOL = 0.02
_DEFAULT_CACHE = os.path.join('~', '.cache', 'nerface_jax')


class DatasetError(ValueError):
  """A dataset folder that cannot be used; the message says where and why."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """One split of a NeRFace dataset, validated, on the host.

  Attributes:
    images: uint8 [F, H, W, 3] RGB frames.
    c2w: float32 [F, 4, 4] camera-to-world matrices (the tracked head pose).
    intrinsics: float32 [4] (fx, fy, cx, cy): fx, fy signed pixels (already
      divided by the downscale factor), cx, cy fractions of W and H.
    expressions: float32 [F, E] per-frame expression coefficients.
    bboxes: float32 [F, 4] face boxes (h_min, h_max, w_min, w_max) as
      fractions of H and W; [0, 1, 0, 1] where the json has none.
    background: uint8 [H, W, 3] static background, or None when not loaded.
    file_paths: the json's `file_path` of each frame (no extension).
    split: 'train', 'val' or 'test'.
    path: the dataset folder.
  """
  images: np.ndarray
  c2w: np.ndarray
  intrinsics: np.ndarray
  expressions: np.ndarray
  bboxes: np.ndarray
  background: Optional[np.ndarray]
  file_paths: list[str]
  split: str
  path: pathlib.Path

  @property
  def num_frames(self) -> int:
    return self.images.shape[0]

  @property
  def height(self) -> int:
    return self.images.shape[1]

  @property
  def width(self) -> int:
    return self.images.shape[2]

  @property
  def expr_dim(self) -> int:
    return self.expressions.shape[1]

  def prefix(self, fraction: float) -> 'Dataset':
    """The first `fraction` of the frames in time (at least one frame)."""
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f'train_fraction must be in (0, 1], got {fraction}.')
    n = max(1, int(round(self.num_frames * fraction)))
    return dataclasses.replace(
        self, images=self.images[:n], c2w=self.c2w[:n],
        expressions=self.expressions[:n], bboxes=self.bboxes[:n],
        file_paths=self.file_paths[:n])


def aligned_empty(shape: Sequence[int], dtype,
                  alignment: int = 64) -> np.ndarray:
  """An uninitialised array of `shape` whose data starts on `alignment` bytes.

  A CPU device adopts a host buffer aligned like this without copying it; from
  numpy's default (16-byte) alignment it makes a copy, which for a 5,500-frame
  512x512 dataset is 4.3 GB of extra peak memory.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.empty(nbytes + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset:offset + nbytes].view(dtype).reshape(shape)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    raise DatasetError(f'{path}: file not found (a NeRFace dataset has '
                       'transforms_train.json, transforms_val.json and '
                       'transforms_test.json).')
  try:
    with open(path) as f:
      meta = json.load(f)
  except json.JSONDecodeError as e:
    raise DatasetError(f'{path}: not valid JSON ({e}).') from None
  if not isinstance(meta, dict):
    raise DatasetError(f'{path}: expected a JSON object at the top level.')
  return meta


def _as_array(value: Any, shape: Sequence[int], where: str,
              what: str) -> np.ndarray:
  """Converts a json value to float64 of a fixed shape, or says why not."""
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError):
    raise DatasetError(f'{where}: {what} must be numbers, got '
                       f'{str(value)[:80]}.') from None
  if array.shape != tuple(shape):
    raise DatasetError(f'{where}: {what} must have shape {tuple(shape)}, got '
                       f'{array.shape}.')
  if not np.all(np.isfinite(array)):
    raise DatasetError(f'{where}: {what} contains NaN or inf: '
                       f'{array.tolist()}.')
  return array


def _read_image(path: pathlib.Path, where: str, downscale: int) -> np.ndarray:
  """Reads an image as uint8 RGB [H, W, 3], resized by 1/downscale."""
  if not path.is_file():
    raise DatasetError(f'{where}: image {path} not found.')
  try:
    with Image.open(path) as image:
      # Alpha is dropped, not composited: NeRFace frames are full photographs
      # and the static background is modelled explicitly.
      image = image.convert('RGB')
      if downscale > 1:
        size = (image.width // downscale, image.height // downscale)
        image = image.resize(size, Image.Resampling.BOX)
      return np.asarray(image, dtype=np.uint8)
  except (OSError, ValueError) as e:
    raise DatasetError(f'{where}: cannot read image {path} ({e}).') from None


def _image_path(root: pathlib.Path, file_path: str) -> pathlib.Path:
  path = root / file_path
  return path if path.suffix.lower() in ('.png', '.jpg', '.jpeg') else (
      path.with_name(path.name + '.png'))


def _intrinsics(meta: dict[str, Any], json_path: pathlib.Path,
                width: int) -> np.ndarray:
  """(fx, fy, cx, cy) at full resolution from `intrinsics` or the x angle."""
  if 'intrinsics' in meta and meta['intrinsics'] is not None:
    intrinsics = _as_array(meta['intrinsics'], (4,), str(json_path),
                           '"intrinsics" [fx, fy, cx, cy]')
  elif 'camera_angle_x' in meta:
    angle = float(_as_array(meta['camera_angle_x'], (), str(json_path),
                            '"camera_angle_x"'))
    if not 0 < abs(angle) < math.pi:
      raise DatasetError(f'{json_path}: camera_angle_x {angle} is not an '
                         'angle in (-pi, pi).')
    # The original NeRF convention: one focal length, principal point at the
    # centre. A negative angle keeps its sign, as the released data relies on.
    focal = 0.5 * width / math.tan(0.5 * angle)
    intrinsics = np.array([focal, focal, 0.5, 0.5])
  else:
    raise DatasetError(f'{json_path}: neither "intrinsics" nor '
                       '"camera_angle_x" is given.')
  if intrinsics[0] == 0 or intrinsics[1] == 0:
    raise DatasetError(f'{json_path}: focal lengths must be non-zero, got '
                       f'fx={intrinsics[0]}, fy={intrinsics[1]}.')
  if min(abs(intrinsics[0]), abs(intrinsics[1])) < 1.0:
    raise DatasetError(
        f'{json_path}: "intrinsics" fx={intrinsics[0]}, fy={intrinsics[1]} '
        'are below one pixel; expected focal lengths in pixels (a focal '
        'length in units of the image width must be multiplied by it).')
  if not (0.0 <= intrinsics[2] <= 1.0 and 0.0 <= intrinsics[3] <= 1.0):
    raise DatasetError(
        f'{json_path}: "intrinsics" cx={intrinsics[2]}, cy={intrinsics[3]} '
        'are outside [0, 1]; expected the principal point as fractions of '
        'the width and height (pixels divided by W and H).')
  return intrinsics


def _check_frame(frame: Any, index: int, json_path: pathlib.Path,
                 expr_dim: Optional[int], expr_source: str):
  """Validates one frame entry; returns (file_path, c2w, expression, bbox)."""
  if not isinstance(frame, dict):
    raise DatasetError(f'{json_path}: frame {index}: expected an object.')
  file_path = frame.get('file_path')
  if not isinstance(file_path, str) or not file_path:
    raise DatasetError(f'{json_path}: frame {index}: missing "file_path".')
  where = f'{json_path}: frame {index} ({file_path})'
  if 'transform_matrix' not in frame:
    raise DatasetError(f'{where}: missing "transform_matrix".')
  c2w = _as_array(frame['transform_matrix'], (4, 4), where,
                  '"transform_matrix"')
  rotation = c2w[:3, :3]
  error = np.abs(rotation.T @ rotation - np.eye(3)).max()
  if error > ORTHONORMAL_TOL:
    raise DatasetError(
        f'{where}: the rotation of "transform_matrix" is not orthonormal '
        f'(max |R^T R - I| = {error:.3g} > {ORTHONORMAL_TOL}); expected a '
        'rigid camera-to-world matrix.')
  if not np.allclose(c2w[3], [0.0, 0.0, 0.0, 1.0], atol=1e-6):
    hint = (' (it looks transposed: the translation is in the last row, as '
            'a column-major export writes it)'
            if np.allclose(c2w[:3, 3], 0.0) and np.abs(c2w[3, :3]).max() > 0
            else '')
    raise DatasetError(
        f'{where}: the last row of "transform_matrix" is {c2w[3].tolist()}, '
        f'expected [0, 0, 0, 1]{hint}.')
  determinant = float(np.linalg.det(rotation))
  if determinant < 0:
    raise DatasetError(
        f'{where}: the rotation of "transform_matrix" is a reflection '
        f'(determinant {determinant:.3f}); expected a rotation (determinant '
        '+1), as an OpenGL camera-to-world matrix has.')
  if 'expression' not in frame:
    raise DatasetError(f'{where}: missing "expression".')
  expression = np.asarray(frame['expression'], dtype=object)
  if expression.ndim != 1:
    raise DatasetError(f'{where}: "expression" must be a flat list of '
                       'numbers.')
  if expr_dim is not None and expression.shape[0] != expr_dim:
    raise DatasetError(
        f'{where}: "expression" has {expression.shape[0]} values but '
        f'{expr_source} has {expr_dim}; all frames of all splits must have '
        'the same expression length.')
  expression = _as_array(frame['expression'], expression.shape, where,
                         '"expression"')
  bbox = frame.get('bbox')
  if bbox is None:
    bbox = np.array([0.0, 1.0, 0.0, 1.0])
  else:
    bbox = _as_array(bbox, (4,), where, '"bbox" [h_min, h_max, w_min, w_max]')
    if bbox.min() < 0.0 or bbox.max() > 1.0:
      raise DatasetError(f'{where}: "bbox" {bbox.tolist()} is outside [0, 1] '
                         '(expected fractions [h_min, h_max, w_min, w_max]).')
    if bbox[0] >= bbox[1] or bbox[2] >= bbox[3]:
      raise DatasetError(f'{where}: "bbox" {bbox.tolist()} is empty or '
                         'inverted (expected h_min < h_max, w_min < w_max).')
  return file_path, c2w, expression, bbox


def load(path: os.PathLike[str] | str, split: str, downscale: int = 1,
         *, background: bool = True, expr_dim: Optional[int] = None,
         expr_origin: str = 'the model',
         num_threads: Optional[int] = None) -> Dataset:
  """Loads and validates one split of a NeRFace dataset folder.

  Args:
    path: the dataset folder.
    split: 'train', 'val' or 'test' (reads `transforms_<split>.json`).
    downscale: integer k >= 1; divides H, W and fx, fy by k.
    background: whether to load `bg/00050.png` (required when True).
    expr_dim: if given, every frame's expression must have this length (used
      to check that splits agree, or that data fits a trained avatar).
    expr_origin: where `expr_dim` comes from, for error messages.
    num_threads: image decoding threads (default: min(8, cpu count)).

  Returns:
    A `Dataset` (images uint8 [F, H, W, 3], c2w [F, 4, 4], intrinsics [4],
    expressions [F, E], bboxes [F, 4], background uint8 [H, W, 3]).

  Raises:
    DatasetError: naming the file and frame of the first problem found.
  """
  root = pathlib.Path(path).expanduser()
  if not root.is_dir():
    raise DatasetError(f'{root}: dataset folder not found.')
  if not isinstance(downscale, int) or downscale < 1:
    raise DatasetError(f'{root}: downscale must be an integer >= 1, got '
                       f'{downscale!r}.')
  json_path = root / f'transforms_{split}.json'
  meta = _read_json(json_path)
  frames = meta.get('frames')
  if not isinstance(frames, list):
    raise DatasetError(f'{json_path}: missing the "frames" list.')
  if not frames:
    raise DatasetError(f'{json_path}: the {split} split has no frames.')

  file_paths, c2ws, expressions, bboxes = [], [], [], []
  expr_source = expr_origin
  for index, frame in enumerate(frames):
    file_path, c2w, expression, bbox = _check_frame(
        frame, index, json_path, expr_dim, expr_source)
    if expr_dim is None:
      expr_dim = expression.shape[0]
      expr_source = f'frame 0 ({file_path})'
    file_paths.append(file_path)
    c2ws.append(c2w)
    expressions.append(expression)
    bboxes.append(bbox)

  # The first image fixes the size; the rest are decoded into one
  # preallocated array so that peak memory is the dataset itself.
  where0 = f'{json_path}: frame 0 ({file_paths[0]})'
  first = _read_image(_image_path(root, file_paths[0]), where0, downscale)
  images = aligned_empty((len(frames),) + first.shape, np.uint8)
  images[0] = first

  def read(index: int):
    where = f'{json_path}: frame {index} ({file_paths[index]})'
    image = _read_image(_image_path(root, file_paths[index]), where, downscale)
    if image.shape != first.shape:
      raise DatasetError(
          f'{where}: image is {image.shape[1]}x{image.shape[0]} pixels but '
          f'frame 0 is {first.shape[1]}x{first.shape[0]}; all frames must '
          'have one size.')
    images[index] = image

  threads = num_threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    futures = [pool.submit(read, i) for i in range(1, len(frames))]
    step = max(1, len(futures) // 10)
    for done, future in enumerate(futures, 1):
      future.result()  # Re-raises the first DatasetError in frame order.
      if len(futures) >= 500 and done % step == 0:
        logging.info('Loading %s split: %d/%d images', split, done + 1,
                     len(frames))

  height, width = first.shape[:2]
  bg = None
  if background:
    bg_path = root / BACKGROUND_FILE
    if not bg_path.is_file():
      raise DatasetError(
          f'{bg_path}: background image not found (NeRFace composites a '
          'static background at the end of every ray; train without it with '
          "--config.data.background=none).")
    bg = _read_image(bg_path, str(bg_path), downscale)
    if bg.shape != first.shape:
      raise DatasetError(
          f'{bg_path}: background is {bg.shape[1]}x{bg.shape[0]} pixels but '
          f'the frames are {width}x{height}.')

  intrinsics = _intrinsics(meta, json_path, width * downscale)
  intrinsics[:2] /= downscale
  return Dataset(
      images=images,
      c2w=np.stack(c2ws).astype(np.float32),
      intrinsics=intrinsics.astype(np.float32),
      expressions=np.stack(expressions).astype(np.float32),
      bboxes=np.stack(bboxes).astype(np.float32),
      background=bg,
      file_paths=file_paths,
      split=split,
      path=root)


def make_index_map(video_frames: Sequence[int],
                   train_frames: Sequence[int]) -> np.ndarray:
  """The `index_map.npy` array of a dataset.

  Args:
    video_frames: int [N] video frame index of every frame written to the
      dataset (all splits), in time order.
    train_frames: int [T] video frame index of each frame of
      transforms_train.json, in the json's order (row k of the train split
      is its per-frame latent code k).

  Returns:
    int64 [N, 2]: per video frame (video frame index, its row in the train
    split or -1 when it is not a training frame).
  """
  video_frames = np.asarray(video_frames, np.int64).reshape(-1)
  train_frames = np.asarray(train_frames, np.int64).reshape(-1)
  position = {int(f): k for k, f in enumerate(train_frames)}
  if len(position) != train_frames.size or not set(position) <= set(
      video_frames.tolist()):
    raise ValueError('train_frames must be distinct members of video_frames.')
  return np.stack([video_frames, np.array(
      [position.get(int(f), -1) for f in video_frames], np.int64)], axis=-1)


def _train_length(root: pathlib.Path) -> int:
  json_path = root / 'transforms_train.json'
  frames = _read_json(json_path).get('frames')
  if not isinstance(frames, list):
    raise DatasetError(f'{json_path}: missing the "frames" list.')
  return len(frames)


def read_index_map(path: os.PathLike[str] | str,
                   num_train: Optional[int] = None) -> Optional[np.ndarray]:
  """Reads and validates `<dataset>/index_map.npy`, which is optional.

  The original NeRFace evaluation script maps video frames to train rows
  (latent codes) with it. One row per video frame in time order: column 0
  the video frame index (>= 0, strictly increasing), column 1 the frame's
  row in transforms_train.json or -1 when it is not a training frame. Every
  train row appears exactly once.

  Args:
    path: the dataset folder.
    num_train: frames in the train split; default: counted from
      transforms_train.json (read only when the index map exists).

  Returns:
    int64 [N, 2], or None when the dataset has no index map.

  Raises:
    DatasetError: naming the file and the first bad row.
  """
  root = pathlib.Path(path).expanduser()
  file = root / INDEX_MAP_FILE
  if not file.is_file():
    return None
  try:
    with open(file, 'rb') as f:
      if f.read(6) != b'\x93NUMPY':
        raise DatasetError(f'{file}: not a .npy file (written by numpy.save '
                           'as an N x 2 integer array).')
      f.seek(0)
      raw = np.load(f, allow_pickle=False)
  except DatasetError:
    raise
  except (OSError, ValueError, EOFError) as e:
    raise DatasetError(f'{file}: not a readable .npy array ({e}).') from None
  if not isinstance(raw, np.ndarray) or raw.ndim != 2 or raw.shape[1] != 2:
    raise DatasetError(
        f'{file}: expected an N x 2 array (video frame, train index) per '
        f'row, got shape {getattr(raw, "shape", None)}.')
  if np.issubdtype(raw.dtype, np.integer):
    index_map = raw.astype(np.int64)
  elif np.issubdtype(raw.dtype, np.floating):
    # The original script reads the file with .astype(int): integral floats
    # are accepted, anything else is refused.
    bad = ~np.all(np.isfinite(raw) & (raw == np.round(raw)), axis=1)
    if bad.any():
      row = int(np.argmax(bad))
      raise DatasetError(f'{file}: row {row} {raw[row].tolist()} holds a '
                         'value that is not an integer.')
    index_map = raw.astype(np.int64)
  else:
    raise DatasetError(f'{file}: expected an integer array, got dtype '
                       f'{raw.dtype}.')
  if num_train is None:
    num_train = _train_length(root)
  frames, train = index_map[:, 0], index_map[:, 1]
  checks = [
      (frames < 0, 'has a negative video frame index'),
      (np.concatenate([[False], frames[1:] <= frames[:-1]]),
       'does not have a larger video frame index than the previous row '
       '(rows are video frames in time order)'),
      ((train < -1) | (train >= num_train),
       f'has a train index outside [-1, {num_train}) (transforms_train.json '
       f'has {num_train} frames)'),
  ]
  for bad, what in checks:
    if bad.any():
      row = int(np.argmax(bad))
      raise DatasetError(f'{file}: row {row} {index_map[row].tolist()} '
                         f'{what}.')
  first_row: dict[int, int] = {}
  for row, k in enumerate(train.tolist()):
    if k < 0:
      continue
    if k in first_row:
      raise DatasetError(
          f'{file}: row {row} {index_map[row].tolist()} uses train index {k} '
          f'already used by row {first_row[k]}; each train frame must appear '
          'once.')
    first_row[k] = row
  if len(first_row) != num_train:
    missing = sorted(set(range(num_train)) - set(first_row))
    raise DatasetError(
        f'{file}: names {len(first_row)} train frames but '
        f'transforms_train.json has {num_train}; no row has train index '
        f'{missing[0]}.')
  return index_map


def load_splits(path: os.PathLike[str] | str,
                splits: Sequence[str] = SPLITS, downscale: int = 1,
                *, background: bool = True) -> dict[str, Dataset]:
  """Loads several splits and checks that they agree with each other.

  Args:
    path: the dataset folder.
    splits: names of the splits to load, the first one sets the reference.
    downscale: as in `load`.
    background: as in `load`.

  Returns:
    {split: Dataset}, all with the same image size and expression length.

  Raises:
    DatasetError: if a split is malformed or disagrees with the first one,
      or if the optional `index_map.npy` is malformed (checked first, before
      any image is decoded).
  """
  read_index_map(path)
  datasets: dict[str, Dataset] = {}
  reference: Optional[Dataset] = None
  for split in splits:
    dataset = load(
        path, split, downscale, background=background,
        expr_dim=None if reference is None else reference.expr_dim,
        expr_origin='' if reference is None else f'the {reference.split} split')
    if reference is not None and (dataset.height, dataset.width) != (
        reference.height, reference.width):
      raise DatasetError(
          f'{dataset.path / f"transforms_{split}.json"}: images are '
          f'{dataset.width}x{dataset.height} but the {reference.split} split '
          f'has {reference.width}x{reference.height}.')
    reference = reference or dataset
    datasets[split] = dataset
  return datasets


def cache_dir(configured: Optional[str] = None) -> pathlib.Path:
  """Where generated data goes: the argument, $NERFACE_JAX_CACHE or ~/.cache."""
  chosen = configured or os.environ.get('NERFACE_JAX_CACHE') or _DEFAULT_CACHE
  return pathlib.Path(chosen).expanduser()

