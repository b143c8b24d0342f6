"""Writing rendered frames as a video (host side, no JAX).

An H.264 mp4 is written by piping raw RGB frames to an `ffmpeg` executable:
the one on PATH, else the binary shipped with the `imageio-ffmpeg` package
when that is installed. Without either, frames go to an animated GIF through
Pillow, so rendering never depends on a system encoder. Files appear under
their final name only once complete: they are written under a hidden
temporary name in the same folder and renamed at the end.
"""

import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
from typing import Iterable, Optional, Union

import numpy as np
from PIL import Image

ENCODERS = ('auto', 'ffmpeg', 'gif')

# How much of ffmpeg's stderr an error message quotes.
_STDERR_TAIL_CHARS = 2000


class EncoderError(RuntimeError):
  """The video encoder failed or is not available."""


def find_ffmpeg() -> Optional[str]:
  """Path of an ffmpeg executable: PATH first, then imageio-ffmpeg; or None."""
  found = shutil.which('ffmpeg')
  if found:
    return found
  try:
    import imageio_ffmpeg  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  try:
    return imageio_ffmpeg.get_ffmpeg_exe()
  except (RuntimeError, OSError):
    # The package can be installed without a binary for this platform.
    return None


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


def _target(path: Union[str, os.PathLike], suffix: str) -> pathlib.Path:
  """`path` with `suffix`, replacing a given .mp4 or .gif extension."""
  path = pathlib.Path(path)
  if path.suffix.lower() in ('.mp4', '.gif'):
    path = path.with_suffix('')
  # Appended rather than `with_suffix`: a name like 'orbit.v2' keeps its dot.
  return path.with_name(path.name + suffix)


def _temporary_name(target: pathlib.Path) -> pathlib.Path:
  """A hidden, unused name beside `target` for the file being written."""
  # Not mkstemp: that creates the file with mode 0600, which the rename would
  # keep; the encoders create it with the usual umask permissions instead.
  token = secrets.token_hex(4)
  return target.with_name(f'.{target.name}.{os.getpid()}.{token}.part')


def _frame(frame, index: int, shape: Optional[tuple[int, ...]]) -> np.ndarray:
  """Validates frame `index` (uint8 [H, W, 3], `shape` if given)."""
  frame = np.asarray(frame)
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
    raise ValueError(f'Frame {index}: expected uint8 [H, W, 3], got '
                     f'{frame.dtype} {frame.shape}.')
  if shape is not None and frame.shape != shape:
    raise ValueError(f'Frame {index} has shape {frame.shape}; the first '
                     f'frame has {shape}: all frames must be one size.')
  return frame


def _tail(log) -> str:
  """The last characters ffmpeg wrote to its stderr file."""
  log.seek(0)
  text = log.read().decode('utf-8', errors='replace').strip()
  return text[-_STDERR_TAIL_CHARS:] or '(ffmpeg printed nothing)'


def _close(pipe) -> None:
  """Closes a pipe whose reader may have exited (unflushed data is moot)."""
  try:
    pipe.close()
  except OSError:
    pass


def _write_mp4(first: np.ndarray, rest, temporary: pathlib.Path, fps: float,
               executable: str) -> None:
  """Streams frames to ffmpeg, which writes an H.264 mp4 at `temporary`."""
  height, width, _ = first.shape
  # yuv420p subsamples chroma 2x2, so libx264 rejects odd sizes: repeat the
  # last row / column once.
  pad = ((0, height % 2), (0, width % 2), (0, 0))
  command = [
      executable, '-hide_banner', '-loglevel', 'error', '-nostdin', '-y',
      '-f', 'rawvideo', '-pix_fmt', 'rgb24',
      '-s', f'{width + width % 2}x{height + height % 2}',
      '-framerate', f'{fps:g}', '-i', 'pipe:0',
      '-an', '-c:v', 'libx264', '-pix_fmt', 'yuv420p',
      # The index at the front lets players start before the file is read.
      '-movflags', '+faststart', '-f', 'mp4', str(temporary)]
  # stderr goes to a file, not a pipe: a pipe nobody reads while frames are
  # written could fill up and block both processes.
  with tempfile.TemporaryFile() as log:
    process = subprocess.Popen(command, stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=log)
    try:
      index, frame = 0, first
      while frame is not None:
        try:
          process.stdin.write(np.pad(frame, pad, mode='edge').tobytes())
        except BrokenPipeError:
          break  # ffmpeg has exited; its status and stderr say why.
        frame = next(rest, None)
        if frame is not None:
          index += 1
          frame = _frame(frame, index, first.shape)
      _close(process.stdin)
      status = process.wait()
    except BaseException:
      process.kill()
      _close(process.stdin)
      process.wait()
      raise
    if status != 0:
      raise EncoderError(f'ffmpeg ({executable}) failed with exit status '
                         f'{status} writing {temporary}:\n{_tail(log)}')


def _write_gif(frames: list[np.ndarray], temporary: pathlib.Path,
               fps: float) -> None:
  """Writes frames as a looping animated GIF at `temporary` (Pillow)."""
  images = [Image.fromarray(frame) for frame in frames]
  # GIF delays are whole centiseconds: Pillow rounds this to 10 ms steps.
  images[0].save(temporary, format='GIF', save_all=True,
                 append_images=images[1:], duration=round(1000.0 / fps),
                 loop=0)


def write_video(frames: Iterable[np.ndarray],
                path: Union[str, os.PathLike],
                fps: float = 25,
                encoder: str = 'auto') -> pathlib.Path:
  """Writes frames as `<path>.mp4`, or `<path>.gif` without an encoder.

  With ffmpeg (see `find_ffmpeg`) the video is H.264 in yuv420p; odd heights
  or widths are padded by repeating the last row or column. Otherwise an
  animated GIF loops forever at the nearest 10 ms frame delay; GIF palettes
  hold 256 colours per frame, and Pillow merges consecutive identical frames
  into one longer frame.

  Args:
    frames: uint8 [H, W, 3] arrays, all one size, at least one. Any iterable;
      the mp4 path streams it without holding all frames.
    path: output path without extension, or ending in .mp4 (or .gif); the
      folder is created if needed.
    fps: frames per second, positive.
    encoder: 'auto' (ffmpeg when found, else GIF), 'ffmpeg' or 'gif'.

  Returns:
    The path written.

  Raises:
    ValueError: no frames, frames of the wrong dtype or differing sizes, or a
      bad argument.
    EncoderError: ffmpeg is missing (encoder='ffmpeg') or failed; the
      message ends with ffmpeg's stderr.
  """
  if encoder not in ENCODERS:
    raise ValueError(f'encoder must be one of {ENCODERS}, got {encoder!r}.')
  if not fps > 0:
    raise ValueError(f'fps must be positive, got {fps}.')
  executable = None
  if encoder in ('auto', 'ffmpeg'):
    executable = find_ffmpeg()
    if executable is None and encoder == 'ffmpeg':
      raise EncoderError('No ffmpeg found: install it (e.g. apt-get install '
                         'ffmpeg, or pip install imageio-ffmpeg) or use '
                         "encoder='gif'.")
  rest = iter(frames)
  first = next(rest, None)
  if first is None:
    raise ValueError('write_video needs at least one frame.')
  first = _frame(first, 0, None)

  target = _target(path, '.mp4' if executable else '.gif')
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = _temporary_name(target)
  try:
    if executable:
      _write_mp4(first, rest, temporary, fps, executable)
    else:
      frames = [first] + [_frame(frame, i + 1, first.shape)
                          for i, frame in enumerate(rest)]
      _write_gif(frames, temporary, fps)
    os.replace(temporary, target)
  except BaseException:
    # Whatever went wrong, no partial file is left under either name.
    temporary.unlink(missing_ok=True)
    raise
  return target
