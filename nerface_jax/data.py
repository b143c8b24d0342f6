"""Loading and validating a dataset folder in the NeRFace format.

The format (DESIGN.md section 3) is the one of the original NeRFace release:
`transforms_{train,val,test}.json`, images at `<file_path>.png`, a static
background at `bg/00050.png`. Every problem found is reported as a
`DatasetError` that names the file and, where it applies, the frame, so a
malformed dataset never explains itself with a bare traceback.

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
    DatasetError: if a split is malformed or disagrees with the first one.
  """
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


def dataset_dir(data_config) -> pathlib.Path:
  """The dataset folder of a config's `data` section.

  `data.dir` when set; otherwise the built-in synthetic person, generated
  into the cache on first use and read through `load` like any dataset.
  """
  if data_config.dir:
    return pathlib.Path(data_config.dir).expanduser()
  from nerface_jax import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.ensure(
      cache_dir(data_config.cache_dir), size=data_config.synthetic_size,
      frames=data_config.synthetic_frames, seed=data_config.synthetic_seed)
