"""Tests of the mp4 writer and the side-by-side helper."""

import os
import weakref

import imageio.v2 as imageio
import numpy as np
import pytest

from nerface_jax import video


def _frames(count: int, height: int, width: int) -> list[np.ndarray]:
  """Smooth, distinct uint8 frames (a gradient moving with the frame index)."""
  rows = np.linspace(0, 1, height)[:, None]
  cols = np.linspace(0, 1, width)[None, :]
  frames = []
  for f in range(count):
    phase = f / count
    rgb = np.stack([np.broadcast_to(rows, (height, width)),
                    np.broadcast_to((cols + phase) % 1.0, (height, width)),
                    np.full((height, width), phase)], axis=-1)
    frames.append(np.round(rgb * 255).astype(np.uint8))
  return frames


def _decode(path) -> tuple[np.ndarray, dict]:
  """uint8 [N, H, W, 3] frames of a video and imageio's metadata."""
  with imageio.get_reader(str(path), format='FFMPEG') as reader:
    # Not list(reader): its length is inf for ffmpeg, which list() trusts.
    return np.stack([frame for frame in reader]), reader.get_meta_data()


def test_mp4_decodes_to_the_frames_padded_to_even(tmp_path):
  frames = _frames(6, 33, 47)
  written = video.write_video(iter(frames), tmp_path / 'out' / 'render',
                              fps=20)
  assert written == tmp_path / 'out' / 'render.mp4'
  assert os.listdir(tmp_path / 'out') == ['render.mp4']
  decoded, meta = _decode(written)
  assert meta['codec'] == 'h264'
  assert meta['pix_fmt'].startswith('yuv420p')
  assert meta['fps'] == 20
  # Padded by one row and one column, not rescaled.
  assert decoded.shape == (6, 34, 48, 3)
  # Lossy, but close: H.264 and half-resolution colour cost a few levels on
  # this smooth pattern (about 4 here; far more if frames were rescaled).
  want = np.stack(frames).astype(int)
  assert np.abs(decoded[:, :33, :47].astype(int) - want).mean() < 8.0
  # The padding repeats the last row and column (black would be far off).
  assert np.abs(decoded[:, 33, :47].astype(int) - want[:, 32]).mean() < 8.0
  assert np.abs(decoded[:, :33, 47].astype(int) - want[:, :, 46]).mean() < 8.0


def test_even_sizes_are_kept_and_names_get_mp4(tmp_path):
  frames = _frames(3, 48, 40)
  written = video.write_video(frames, tmp_path / 'clip.mp4')
  assert written == tmp_path / 'clip.mp4' and written.name == 'clip.mp4'
  decoded, meta = _decode(written)
  # 40 is no multiple of 16: imageio would have rescaled it to 48.
  assert decoded.shape == (3, 48, 40, 3)
  assert meta['fps'] == 25  # The default.
  assert np.abs(decoded.astype(int) - np.stack(frames)).mean() < 8.0
  # A dot in the name is kept, not taken for an extension.
  assert video.write_video(frames, tmp_path / 'orbit.v2').name == 'orbit.v2.mp4'


def test_frames_are_streamed_not_held(tmp_path):
  refs = []

  def frames():
    for i in range(8):
      frame = np.full((8, 8, 3), 30 * i, np.uint8)  # Made here, held nowhere.
      # By the time frame i is asked for, frames before i - 1 are freed.
      alive = [i for i, ref in enumerate(refs) if ref() is not None]
      assert alive == ([len(refs) - 1] if refs else []), alive
      refs.append(weakref.ref(frame))
      yield frame

  written = video.write_video(frames(), tmp_path / 'clip')
  assert _decode(written)[0].shape[0] == 8


def _nothing_left(folder) -> bool:
  return not folder.exists() or os.listdir(folder) == []


def test_bad_frames_are_value_errors_naming_the_frame(tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match='at least one frame'):
    video.write_video([], out / 'clip')
  with pytest.raises(ValueError, match='at least one frame'):
    video.write_video(iter([]), out / 'clip')
  with pytest.raises(ValueError, match='Frame 0: expected uint8'):
    video.write_video([np.zeros((4, 4, 3), np.float32)], out / 'clip')
  assert _nothing_left(out)
  # Found mid-stream, after frames went to ffmpeg.
  frames = _frames(2, 8, 8) + [np.zeros((8, 8, 3), np.float32)]
  with pytest.raises(ValueError, match='Frame 2: expected uint8'):
    video.write_video(frames, out / 'clip')
  frames = _frames(3, 8, 8) + _frames(1, 8, 10)
  with pytest.raises(ValueError, match='Frame 3 has shape .*one size'):
    video.write_video(frames, out / 'clip')
  with pytest.raises(ValueError, match='Frame 1: expected uint8'):
    video.write_video(_frames(1, 8, 8) + [np.zeros((8, 8), np.uint8)],
                      out / 'clip')
  with pytest.raises(ValueError, match='fps'):
    video.write_video(_frames(1, 8, 8), out / 'clip', fps=0)
  assert _nothing_left(out)


def test_failing_frame_source_leaves_nothing_behind(tmp_path):
  def frames():
    yield from _frames(3, 8, 8)
    raise RuntimeError('renderer crashed')

  with pytest.raises(RuntimeError, match='renderer crashed'):
    video.write_video(frames(), tmp_path / 'clip')
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('count', [1, 40])
def test_failing_encoder_is_an_encoder_error(tmp_path, monkeypatch, count):
  # 1 small frame fits in the pipe before ffmpeg exits; 40 larger ones break
  # the pipe: both must be reported.
  monkeypatch.setattr(video, 'CODEC', 'no_such_encoder')
  with pytest.raises(video.EncoderError):
    video.write_video(_frames(count, 64, 64), tmp_path / 'clip')
  assert os.listdir(tmp_path) == []


def test_missing_ffmpeg_is_an_encoder_error(tmp_path, monkeypatch):
  # imageio-ffmpeg takes the executable this variable names, unchecked.
  monkeypatch.setenv('IMAGEIO_FFMPEG_EXE', str(tmp_path / 'no-ffmpeg'))
  with pytest.raises(video.EncoderError):
    video.write_video(_frames(2, 8, 8), tmp_path / 'out' / 'clip')
  assert os.listdir(tmp_path / 'out') == []


def test_side_by_side_pads_heights():
  a = np.full((4, 3, 3), 10, np.uint8)
  b = np.full((6, 2, 3), 0.5, np.float32)
  grey = np.linspace(0, 1, 5 * 2).reshape(5, 2)
  out = video.side_by_side(a, b, grey)
  assert out.dtype == np.uint8
  assert out.shape == (6, 7, 3)
  np.testing.assert_array_equal(out[:4, :3], a)
  np.testing.assert_array_equal(out[4:, :3], 0)
  np.testing.assert_array_equal(out[:, 3:5], 128)
  np.testing.assert_array_equal(out[:5, 5:, 1], np.round(grey * 255))
  np.testing.assert_array_equal(out[:5, 5:, 0], out[:5, 5:, 2])
  np.testing.assert_array_equal(out[5:, 5:], 0)
