"""Writing rendered frames as an H.264 mp4 (host side, no JAX).

imageio's FFMPEG plugin streams the frames to an ffmpeg executable: the one
the `imageio-ffmpeg` wheel ships (or the one the IMAGEIO_FFMPEG_EXE
environment variable names), so every install writes mp4 without a system
encoder. Files appear under their final name only once complete: they are
written under a hidden temporary name in the same folder and renamed at the
end.
"""

import math
import numbers
import os
import pathlib
import secrets
from typing import Iterable, Iterator, Union

import imageio.v2 as imageio
import imageio_ffmpeg
import numpy as np

# H.264 in yuv420p is what browsers, QuickTime and most players decode.
CODEC = 'libx264'
PIXEL_FORMAT = 'yuv420p'

# How many of ffmpeg's last lines an error message quotes.
_REASON_LINES = 5

# Marks the end of the frames (a None frame is an error, not the end).
_END = object()


class EncoderError(RuntimeError):
  """ffmpeg is missing or failed, or its output is not a complete video."""


def _as_rgb_uint8(image, where: str) -> np.ndarray:
  """uint8 [H, W, 3] from uint8 or float-in-[0, 1] [H, W], [H, W, 1|3]."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f'{where}: expected an [H, W, 3] image, got shape '
                     f'{image.shape}.')
  if image.dtype != np.uint8:
    if not np.issubdtype(image.dtype, np.floating):
      raise ValueError(f'{where}: expected uint8 or float in [0, 1], got '
                       f'dtype {image.dtype}.')
    image = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.broadcast_to(image, image.shape[:2] + (3,))


def side_by_side(*images) -> np.ndarray:
  """Images placed left to right in one frame.

  Args:
    *images: each uint8 or float in [0, 1], [H_i, W_i, 3] (or [H_i, W_i] /
      [H_i, W_i, 1], repeated to grey RGB).

  Returns:
    uint8 [max H_i, sum W_i, 3]; shorter images are padded with black at the
    bottom.
  """
  if not images:
    raise ValueError('side_by_side needs at least one image.')
  images = [_as_rgb_uint8(image, f'image {i}')
            for i, image in enumerate(images)]
  height = max(image.shape[0] for image in images)
  padded = [np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)))
            for image in images]
  return np.concatenate(padded, axis=1)


def _target(path: Union[str, os.PathLike]) -> pathlib.Path:
  """`path` with the .mp4 extension (added, or kept if given)."""
  path = pathlib.Path(path)
  if path.suffix.lower() == '.mp4':
    path = path.with_suffix('')
  # Appended rather than `with_suffix`: a name like 'orbit.v2' keeps its dot.
  return path.with_name(path.name + '.mp4')


def _temporary_name(target: pathlib.Path) -> pathlib.Path:
  """A hidden, unused name beside `target` for the file being written."""
  # Not mkstemp: that creates the file with mode 0600, which the rename would
  # keep; ffmpeg creates it with the usual umask permissions instead. The
  # name ends in .mp4 because imageio chooses its plugin by the extension.
  token = secrets.token_hex(4)
  return target.with_name(f'.{target.name}.{os.getpid()}.{token}.part.mp4')


def _frame(frame, index: int, shape) -> np.ndarray:
  """Frame `index` checked: uint8 [H, W, 3], and `shape` unless None."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f'Frame {index}: expected uint8 [H, W, 3], got '
                     f'{frame.dtype} {frame.shape}.')
  if shape is not None and frame.shape != shape:
    raise ValueError(f'Frame {index} has shape {frame.shape}; the first '
                     f'frame has {shape}: all frames must be one size.')
  return frame


def _even(frame: np.ndarray) -> np.ndarray:
  """uint8 [H + H % 2, W + W % 2, 3]: the last row / column repeated."""
  # yuv420p stores colour at half resolution, so libx264 rejects odd sizes.
  # Padding by one pixel keeps every input pixel where it was; imageio's own
  # fix (macro_block_size) would rescale the whole frame instead.
  height, width, _ = frame.shape
  if height % 2 or width % 2:
    frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)),
                   mode='edge')
  return np.ascontiguousarray(frame)


def _then(first, rest: Iterator) -> Iterator:
  """Yields `first`, then the items of `rest`, keeping none once yielded."""
  # Not itertools.chain: it holds its arguments, frame 0 among them, until
  # the last item.
  yield first
  del first
  yield from rest


def _encode(frames: Iterator[np.ndarray], shape: tuple[int, int, int],
            temporary: pathlib.Path, fps: float, target: pathlib.Path) -> int:
  """Streams `frames` (frame 0 already checked) into an mp4 at `temporary`.

  `target` (the final name) is what error messages name.

  Returns:
    int, the number of frames written.
  """
  writer = imageio.get_writer(
      str(temporary), format='FFMPEG', mode='I', fps=fps, codec=CODEC,
      pixelformat=PIXEL_FORMAT,
      # 1: no rescaling to multiples of 16; `_even` pads to even sizes.
      macro_block_size=1,
      # No `quality`: libx264's default rate control (CRF 23) applies.
      ffmpeg_log_level='error',
      # The index at the front lets players start before the file is read.
      output_params=['-movflags', '+faststart'])
  count = 0
  try:
    frame = next(frames)
    while frame is not _END:
      try:
        writer.append_data(_even(frame))
      except (OSError, RuntimeError) as e:
        # OSError: ffmpeg exited (broken pipe); RuntimeError: no ffmpeg.
        raise EncoderError(f'ffmpeg failed writing frame {count} of '
                           f'{target} (its own messages, if any, are on '
                           f'stderr): {e}') from e
      count += 1
      frame = next(frames, _END)
      if frame is not _END:
        frame = _frame(frame, count, shape)
  except BaseException:
    try:
      writer.close()
    except Exception:  # pylint: disable=broad-except
      pass  # The first error is the one to report; the file is deleted.
    raise
  try:
    writer.close()
  except (OSError, RuntimeError) as e:
    raise EncoderError(f'ffmpeg failed finishing {target}: {e}') from e
  return count


def _check(temporary: pathlib.Path, count: int, target: pathlib.Path) -> None:
  """Raises EncoderError unless `temporary` is an mp4 of `count` frames."""
  # imageio does not look at ffmpeg's exit status, and a short video fits in
  # the pipe before ffmpeg fails (e.g. without libx264): so the file is read
  # back (packets copied, not decoded, so this is fast).
  if not temporary.exists():
    raise EncoderError(f'ffmpeg ({CODEC}) wrote no video for {target}; its '
                       'own messages, if any, are on stderr.')
  try:
    written, _ = imageio_ffmpeg.count_frames_and_secs(str(temporary))
  except (OSError, RuntimeError) as e:
    # The message holds ffmpeg's whole banner; the reason is at the end.
    reason = '\n'.join(str(e).strip().splitlines()[-_REASON_LINES:])
    raise EncoderError(f'ffmpeg wrote an unreadable video for {target}:\n'
                       f'{reason}') from e
  if written != count:
    raise EncoderError(f'ffmpeg wrote {written} of {count} frames of '
                       f'{target}.')


def write_video(frames: Iterable[np.ndarray],
                path: Union[str, os.PathLike],
                fps: float = 25) -> pathlib.Path:
  """Writes frames as an H.264 mp4 (yuv420p) at `<path>.mp4`.

  Odd heights or widths are padded to even by repeating the last row or
  column once.

  Args:
    frames: uint8 [H, W, 3] arrays, all one size, at least one. Any iterable;
      it is consumed one frame at a time, never held whole.
    path: output path without extension, or ending in .mp4; the folder is
      created if needed.
    fps: frames per second, positive.

  Returns:
    pathlib.Path of the file written.

  Raises:
    ValueError: no frames, a frame of the wrong dtype or shape, frames of
      differing sizes (each names the frame's index), or a bad `fps`.
    EncoderError: ffmpeg is missing or failed, or wrote an incomplete video.
    On any error no file is left under the final or the temporary name.
  """
  if (not isinstance(fps, numbers.Real) or not math.isfinite(fps) or
      not fps > 0):
    raise ValueError(f'fps must be a positive number, got {fps!r}.')
  rest = iter(frames)
  first = next(rest, _END)
  if first is _END:
    raise ValueError('write_video needs at least one frame.')
  shape = _frame(first, 0, None).shape
  # Only the generator refers to frame 0 from here on: each frame can be
  # freed once written, so a long video never sits in memory.
  frames = _then(first, rest)
  del first

  target = _target(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = _temporary_name(target)
  try:
    count = _encode(frames, shape, temporary, float(fps), target)
    _check(temporary, count, target)
    os.replace(temporary, target)
  except BaseException:
    # Whatever went wrong, no partial file is left under either name.
    temporary.unlink(missing_ok=True)
    raise
  return target
