"""Tests of the video writer and the side-by-side helper."""

import os
import stat
import subprocess

import numpy as np
from PIL import Image
from PIL import ImageSequence
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


def _fake_ffmpeg(folder, script: str) -> str:
  """An executable named ffmpeg in `folder` running a shell `script`."""
  path = folder / 'ffmpeg'
  path.write_text('#!/bin/sh\n' + script)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


def _no_ffmpeg(monkeypatch):
  monkeypatch.setattr(video, 'find_ffmpeg', lambda: None)


def test_gif_fallback_decodes_to_the_frames(tmp_path, monkeypatch):
  _no_ffmpeg(monkeypatch)
  frames = _frames(5, 18, 22)
  written = video.write_video(frames, tmp_path / 'out' / 'orbit.mp4', fps=20)
  assert written == tmp_path / 'out' / 'orbit.gif'
  assert sorted(os.listdir(tmp_path / 'out')) == ['orbit.gif']
  with Image.open(written) as gif:
    assert gif.format == 'GIF'
    assert gif.info.get('loop') == 0
    decoded = [np.asarray(frame.convert('RGB'))
               for frame in ImageSequence.Iterator(gif)]
    assert gif.info['duration'] == 50
  assert len(decoded) == len(frames)
  for got, want in zip(decoded, frames):
    assert got.shape == want.shape
    # A 256-colour palette per frame: close, not exact.
    assert np.abs(got.astype(int) - want).mean() < 4.0


def test_encoder_gif_is_forced_even_with_ffmpeg(tmp_path, monkeypatch):
  monkeypatch.setattr(video, 'find_ffmpeg', lambda: '/nonexistent/ffmpeg')
  written = video.write_video(iter(_frames(2, 12, 12)), tmp_path / 'v',
                              encoder='gif')
  assert written == tmp_path / 'v.gif'
  with Image.open(written) as gif:
    assert gif.n_frames == 2


def test_real_ffmpeg_writes_an_mp4(tmp_path):
  executable = video.find_ffmpeg()
  if executable is None:
    pytest.skip('no ffmpeg executable on this machine')
  # Odd sizes: padded to even for yuv420p.
  frames = _frames(6, 17, 23)
  written = video.write_video(frames, tmp_path / 'render', fps=25)
  assert written == tmp_path / 'render.mp4'
  assert written.stat().st_size > 0
  assert os.listdir(tmp_path) == ['render.mp4']
  # Decode it again: 6 frames of 18x24 yuv420p.
  probe = subprocess.run(
      [executable, '-v', 'error', '-i', str(written), '-f', 'rawvideo',
       '-pix_fmt', 'rgb24', 'pipe:1'], capture_output=True, check=True)
  decoded = np.frombuffer(probe.stdout, np.uint8).reshape(-1, 18, 24, 3)
  assert decoded.shape[0] == len(frames)
  error = np.abs(decoded[:, :17, :23].astype(int) - np.stack(frames)).mean()
  assert error < 8.0


def test_failing_encoder_leaves_nothing_behind(tmp_path, monkeypatch):
  # Writes a partial output (its last argument) and fails, like an ffmpeg
  # without libx264 would.
  fake = _fake_ffmpeg(tmp_path, 'for last; do :; done\n'
                      'echo partial > "$last"\n'
                      'echo "Unknown encoder libx264" >&2\nexit 3\n')
  monkeypatch.setattr(video, 'find_ffmpeg', lambda: fake)
  out = tmp_path / 'out'
  with pytest.raises(video.EncoderError, match='Unknown encoder libx264'):
    video.write_video(_frames(40, 64, 64), out / 'clip')
  assert os.listdir(out) == []


def test_fake_encoder_output_is_renamed_into_place(tmp_path, monkeypatch):
  # Reads every byte of stdin into its output file: the raw frames (padded
  # to even sizes) must arrive intact and end up under the final name.
  fake = _fake_ffmpeg(tmp_path, 'for last; do :; done\ncat > "$last"\n')
  monkeypatch.setattr(video, 'find_ffmpeg', lambda: fake)
  frames = _frames(3, 5, 7)
  written = video.write_video(frames, tmp_path / 'out' / 'clip.mp4')
  assert written == tmp_path / 'out' / 'clip.mp4'
  assert os.listdir(tmp_path / 'out') == ['clip.mp4']
  raw = np.frombuffer(written.read_bytes(), np.uint8).reshape(3, 6, 8, 3)
  np.testing.assert_array_equal(raw[:, :5, :7], np.stack(frames))
  # The padding repeats the last row and column.
  np.testing.assert_array_equal(raw[:, 5, :7], np.stack(frames)[:, 4])
  np.testing.assert_array_equal(raw[:, :5, 7], np.stack(frames)[:, :, 6])


def test_bad_frames_leave_nothing_behind(tmp_path, monkeypatch):
  _no_ffmpeg(monkeypatch)
  frames = _frames(2, 8, 8) + _frames(1, 8, 9)
  with pytest.raises(ValueError, match='one size'):
    video.write_video(frames, tmp_path / 'clip')
  fake = _fake_ffmpeg(tmp_path, 'for last; do :; done\ncat > "$last"\n')
  monkeypatch.setattr(video, 'find_ffmpeg', lambda: fake)
  with pytest.raises(ValueError, match='one size'):
    video.write_video(frames, tmp_path / 'clip')
  assert sorted(os.listdir(tmp_path)) == ['ffmpeg']
  with pytest.raises(ValueError, match='at least one frame'):
    video.write_video([], tmp_path / 'clip')
  with pytest.raises(ValueError, match='uint8'):
    video.write_video([np.zeros((4, 4, 3), np.float32)], tmp_path / 'clip')


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
