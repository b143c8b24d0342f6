"""Decoding a talking-head video, or a folder of images, into RGB frames.

A source is read twice by the pipeline (once to track, once to crop and
write), so it is described by a small `VideoSource` that can be iterated
again instead of a decoded array: a ten-minute 512x512 clip is 11 GB of
pixels, far more than the landmarks the first pass keeps.
"""

import dataclasses
import hashlib
import os
import pathlib
import re
import sys
from typing import Iterator, Optional

import cv2
import numpy as np

from nerface_jax.preprocess import errors

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')
# Frame rate assumed for a folder of images (it only spaces the tracker's
# timestamps; the tracker's smoothing assumes video-like motion).
FOLDER_FPS = 25.0


@dataclasses.dataclass(frozen=True)
class VideoSource:
  """A readable video file or image folder.

  Attributes:
    path: the file or folder.
    height: int frame height in pixels.
    width: int frame width in pixels.
    fps: float frames per second (FOLDER_FPS for a folder).
    frame_count: int frames the container announces (files: may be an
      estimate; folders: the number of images).
    images: for a folder, its image files in natural order; else None.
  """
  path: pathlib.Path
  height: int
  width: int
  fps: float
  frame_count: int
  images: Optional[tuple[pathlib.Path, ...]] = None

  @property
  def is_folder(self) -> bool:
    return self.images is not None

  def frames(self, max_frames: Optional[int] = None
             ) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (frame index, uint8 [H, W, 3] RGB) in time order.

    Args:
      max_frames: stop after this many frames (None: all).

    Raises:
      PreprocessError: an image of the folder cannot be read or has another
        size than the first (naming the file and frame).
    """
    limit = self.frame_count if max_frames is None else max_frames
    if self.images is not None:
      for index, path in enumerate(self.images[:limit]):
        yield index, read_image(path, index, (self.height, self.width))
      return
    capture = cv2.VideoCapture(str(self.path))
    try:
      index = 0
      # The announced count of some containers is wrong in both directions:
      # a file is read until the decoder stops, never trusted for a length.
      while max_frames is None or index < max_frames:
        ok, bgr = capture.read()
        if not ok or bgr is None:
          return
        if bgr.shape[:2] != (self.height, self.width):
          raise errors.PreprocessError(
              f'{self.path}: frame {index} is {bgr.shape[1]}x{bgr.shape[0]} '
              f'pixels but frame 0 is {self.width}x{self.height}; a video '
              'with changing frame size is not supported.')
        yield index, _to_rgb(bgr, self.path, index)
        index += 1
    finally:
      capture.release()

  def fingerprint(self) -> str:
    """sha256 hex digest of the content (a folder: names and contents)."""
    digest = hashlib.sha256()
    files = self.images if self.images is not None else (self.path,)
    for path in files:
      digest.update(path.name.encode() + b'\0')
      with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
          digest.update(block)
    return digest.hexdigest()


def _to_rgb(image: np.ndarray, path: pathlib.Path, index: int) -> np.ndarray:
  """uint8 [H, W, 3] RGB from what OpenCV decoded (BGR, grey, BGRA, 16 bit)."""
  if image.dtype == np.uint16:
    image = (image // 257).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise errors.PreprocessError(
        f'{path}: frame {index} has unsupported pixel type {image.dtype}.')
  if image.ndim == 2:
    return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
  if image.shape[2] == 4:
    return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image(path: pathlib.Path, index: int = 0,
               size: Optional[tuple[int, int]] = None) -> np.ndarray:
  """uint8 [H, W, 3] RGB of one image file.

  Args:
    path: the image.
    index: its frame index, for messages.
    size: if given, the (H, W) it must have.

  Raises:
    PreprocessError: unreadable, or not of the given size.
  """
  # imdecode of the bytes (not imread) also handles non-ASCII paths.
  try:
    raw = np.fromfile(path, dtype=np.uint8)
  except OSError as e:
    raise errors.PreprocessError(
        f'{path}: frame {index}: cannot read the file ({e}).') from None
  image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED) if raw.size else None
  if image is None:
    raise errors.PreprocessError(
        f'{path}: frame {index}: not a readable image.')
  image = _to_rgb(image, path, index)
  if size is not None and image.shape[:2] != size:
    raise errors.PreprocessError(
        f'{path}: frame {index} is {image.shape[1]}x{image.shape[0]} pixels '
        f'but frame 0 is {size[1]}x{size[0]}; all images of the folder must '
        'have one size.')
  return image


def _natural_key(path: pathlib.Path):
  """Sort key putting frame_2 before frame_10."""
  return [int(part) if part.isdigit() else part.lower()
          for part in re.split(r'(\d+)', path.name)]


def open_video(path: os.PathLike[str] | str) -> VideoSource:
  """Opens a video file (mp4, mov, ... anything FFmpeg decodes) or a folder.

  The first frame is decoded here, so an unreadable or empty input fails
  before any work is done.

  Args:
    path: a video file, or a folder of images (png, jpg, ...) whose names
      sort into time order (numbers compare as numbers).

  Returns:
    A VideoSource.

  Raises:
    PreprocessError: the path does not exist, is not a decodable video, has
      no frames, or is a folder without images.
  """
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    images = tuple(sorted(
        (p for p in path.iterdir()
         if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=_natural_key))
    if not images:
      raise errors.PreprocessError(
          f'{path}: the folder holds no images ({", ".join(IMAGE_SUFFIXES)}); '
          'pass a video file or a folder of frames.')
    first = read_image(images[0], 0)
    return VideoSource(path=path, height=first.shape[0], width=first.shape[1],
                       fps=FOLDER_FPS, frame_count=len(images), images=images)
  if not path.is_file():
    raise errors.PreprocessError(f'{path}: video not found.')
  if path.stat().st_size == 0:
    raise errors.PreprocessError(f'{path}: the video file is empty (0 bytes).')
  # FFmpeg says why it cannot open a file on the descriptor; the reason is
  # quoted in the error (one line) instead.
  with errors.native_stderr() as native_log:
    capture = cv2.VideoCapture(str(path))
    try:
      opened = capture.isOpened()
      ok, bgr = capture.read() if opened else (False, None)
      fps = capture.get(cv2.CAP_PROP_FPS)
      count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    finally:
      capture.release()
    native = native_log()
  reason = _ffmpeg_reason(native)
  if not opened:
    raise errors.PreprocessError(
        f'{path}: cannot open as a video (not a video file, truncated, or '
        'a codec FFmpeg cannot decode' + (f'; FFmpeg: {reason}' if reason
                                          else '') + ').')
  if not ok or bgr is None:
    raise errors.PreprocessError(
        f'{path}: the video has no decodable frame (frame 0 cannot be '
        'read' + (f'; FFmpeg: {reason}' if reason else '') + ').')
  if native.strip():
    sys.stderr.write(native)  # Warnings of a file that does open: shown.
  # Some containers report 0 or absurd rates; 25 keeps timestamps sensible.
  fps = fps if np.isfinite(fps) and 1.0 <= fps <= 1000.0 else FOLDER_FPS
  return VideoSource(path=path, height=bgr.shape[0], width=bgr.shape[1],
                     fps=float(fps), frame_count=max(count, 1))


def _ffmpeg_reason(text: str) -> str:
  """FFmpeg's last message without its `[demuxer @ 0x...]` prefix."""
  return re.sub(r'^\[[^\]]*@ *0x[0-9a-fA-F]+\] *', '',
                errors.last_line(text))


def crop_and_resize(image: np.ndarray, crop: tuple[int, int, int],
                    size: int) -> np.ndarray:
  """The square `crop` (x0, y0, side) of uint8 [H, W, C] `image`, resized.

  Returns:
    uint8 [size, size, C].
  """
  x0, y0, side = crop
  patch = image[y0:y0 + side, x0:x0 + side]
  if side == size:
    return np.ascontiguousarray(patch)
  # Area averaging when shrinking (no aliasing), bicubic when enlarging.
  interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
  return cv2.resize(patch, (size, size), interpolation=interpolation)
