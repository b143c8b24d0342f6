"""What `render.py` runs: a split with its scores, orbits, expression sweeps
and reenactment, all written by one sequence writer.

Every mode writes, per frame, `<name>.png` (the render), `depth/<name>.png`
(colour-mapped depth), `normals/<name>.png` (camera-space normals), and at the
end one mp4 of the sequence. An output folder is either new, empty, or one
this module wrote before (it holds the marker file); nothing else is ever
overwritten.
"""

import json
import os
import pathlib
import sys
from typing import Any, Optional, Sequence

import numpy as np

from nerface_jax import avatar as avatar_lib
from nerface_jax import data
from nerface_jax import edits
from nerface_jax import scene
from nerface_jax import errors
from nerface_jax import evaluation
from nerface_jax import images
from nerface_jax import latents
from nerface_jax import renderer
from nerface_jax import video

MARKER = '.nerface-render'


def prepare_output(out: os.PathLike[str] | str) -> pathlib.Path:
  """Creates `out`, refusing a folder that holds files we did not write.

  A folder is ours when it holds the marker file of an earlier render or
  export (render.py and export.py share it); then its outputs are replaced.
  Anything else is never overwritten.
  """
  out = pathlib.Path(out).expanduser()
  if out.exists() and not out.is_dir():
    raise errors.RenderError(f'--out={out}: exists and is not a folder.')
  if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
    raise errors.RenderError(
        f'--out={out}: the folder holds files that render.py or export.py '
        'did not write; choose a new or empty --out folder.')
  out.mkdir(parents=True, exist_ok=True)
  (out / MARKER).write_text('Written by nerface-jax (render.py, export.py); '
                            'its outputs may be replaced.\n')
  return out


def _report(message: str):
  print(message, file=sys.stderr, flush=True)


class SequenceWriter:
  """Writes rendered frames (rgb, depth, normals) and one video of them."""

  def __init__(self, out: pathlib.Path, near: float, far: float,
               intrinsics: np.ndarray, fps: float):
    """Args: out, the prepared folder; near/far, the depth colour range;
    intrinsics [4], for the normals; fps, of the video."""
    self.out = out
    self.near, self.far = near, far
    self.intrinsics = np.asarray(intrinsics)
    self.fps = fps
    self._video_frames: list[np.ndarray] = []

  def add(self, name: str, result: dict[str, np.ndarray],
          prediction: Optional[np.ndarray] = None,
          video_frame: Optional[np.ndarray] = None):
    """Writes one frame.

    Args:
      name: file name without extension.
      result: the renderer's {'rgb', 'depth', 'acc'} of the frame.
      prediction: uint8 [H, W, 3] the quantised rgb (computed if None).
      video_frame: uint8 [H', W', 3] what the video shows (default: the
        prediction).
    """
    prediction = (images.to_uint8(result['rgb']) if prediction is None else
                  prediction)
    images.save_png(self.out / f'{name}.png', prediction)
    images.save_png(self.out / 'depth' / f'{name}.png', images.depth_image(
        result['depth'], self.near, self.far))
    images.save_png(self.out / 'normals' / f'{name}.png', images.normals_image(
        result['depth'], result['acc'], self.intrinsics))
    self._video_frames.append(prediction if video_frame is None else
                              video_frame)

  def finish(self, name: str) -> pathlib.Path:
    """Writes `<name>.mp4` of every added frame; returns its path."""
    return video.write_video(self._video_frames, self.out / name, self.fps)


def _writer(avatar: avatar_lib.Avatar, out: pathlib.Path,
            intrinsics: np.ndarray, fps: float) -> SequenceWriter:
  return SequenceWriter(out, avatar.config.data.near, avatar.config.data.far,
                        intrinsics, fps)


def render_split(avatar: avatar_lib.Avatar, out: os.PathLike[str] | str,
                 split: str, data_dir: Optional[str] = None,
                 latent: Optional[str] = None,
                 fps: float = 25.0) -> dict[str, Any]:
  """Renders and scores every frame of a split.

  Writes `out/<name>.png` (the dataset's image names), `out/depth/`,
  `out/normals/`, `out/metrics.json` and a video of prediction | truth.
  Frames of the avatar's own training split use their trained codes; others
  use `latent` (default eval.latent). With 'optimize' the scores of the mean
  code are reported beside (key 'without_optimize').

  Returns:
    The metrics.json content.
  """
  out = prepare_output(out)
  dataset = avatar_lib.load_dataset(avatar, split, data_dir)
  trained = avatar_lib.is_training_data(avatar, dataset, split)
  choice = latent or avatar.config.eval.latent
  report: dict[str, Any] = {'split': split, 'step': avatar.step,
                            'data_dir': str(dataset.path)}
  codes, used = avatar.split_codes(
      dataset, choice, trained,
      lambda done, total: _report(f'fitting latent codes: {done}/{total}'))
  writer = _writer(avatar, out, dataset.intrinsics, fps)

  def write(index, name, result, prediction, row):
    writer.add(name, result, prediction,
               video.side_by_side(prediction, dataset.images[index]))
    _report(f'{used}: frame {index + 1}/{dataset.num_frames} {name} '
            f'PSNR {row["psnr"]:.2f} dB')

  report.update({'latent': used, **evaluation.score_frames(
      avatar.renderer, dataset, codes, on_frame=write)})
  report['video'] = writer.finish('video').name
  if (choice == 'optimize' and used != latents.TRAINED and
      latents.gamma(avatar.host_params) is not None):
    mean_codes, mean_used = avatar.split_codes(dataset, 'mean', trained)
    report['without_optimize'] = {'latent': mean_used, **evaluation.score_frames(
        avatar.renderer, dataset, mean_codes)}
  with open(out / 'metrics.json', 'w') as f:
    json.dump(report, f, indent=2)
  return report


def render_sequence(avatar: avatar_lib.Avatar, out: pathlib.Path, prefix: str,
                    c2w: np.ndarray, expressions: np.ndarray,
                    codes: np.ndarray, intrinsics: np.ndarray,
                    background: Optional[np.ndarray],
                    fps: float) -> pathlib.Path:
  """Renders given cameras, expressions and codes as `<prefix>_<n>` frames.

  Args:
    avatar: the Avatar.
    out: the prepared output folder.
    prefix: names the frames and the video.
    c2w: float [N, 4, 4].
    expressions: float [N, E].
    codes: float [L] (one for all frames) or [N, L].
    intrinsics: float [4].
    background: uint8 [H, W, 3] or None (black).
    fps: of the video.

  Returns:
    The video's path.
  """
  codes = np.broadcast_to(codes, (len(c2w), np.shape(codes)[-1]))
  writer = _writer(avatar, out, intrinsics, fps)
  for n, (pose, expression, code) in enumerate(zip(c2w, expressions, codes)):
    inputs = renderer.frame_inputs(pose, intrinsics, expression, code,
                                   background, avatar.height, avatar.width)
    writer.add(f'{prefix}_{n:04d}', avatar.render(inputs))
    _report(f'{prefix}: frame {n + 1}/{len(c2w)}')
  return writer.finish(prefix)


def _checked_frame(dataset: data.Dataset, split: str, frame: int):
  if not 0 <= frame < dataset.num_frames:
    raise errors.RenderError(f'--frame={frame} is outside the {split} split '
                             f'({dataset.num_frames} frames).')


def render_orbit(avatar: avatar_lib.Avatar, out, split: str = 'train',
                 frame: int = 0, num: int = 60, latent: Optional[str] = None,
                 fps: float = 25.0) -> pathlib.Path:
  """Novel views: a yaw/pitch path around the head with frame `frame`'s
  expression (of `split`); the camera starts at the most frontal pose."""
  out = prepare_output(out)
  dataset = avatar_lib.load_dataset(avatar, split)
  _checked_frame(dataset, split, frame)
  centre = scene.head_centre(dataset.c2w)
  front = dataset.c2w[edits.frontal_index(dataset.c2w, centre)]
  return render_sequence(
      avatar, out, 'orbit', edits.orbit_poses(front, centre, num),
      np.tile(dataset.expressions[frame], (num, 1)),
      avatar.frame_code(split, frame, latent), dataset.intrinsics,
      dataset.background, fps)


def render_expression(avatar: avatar_lib.Avatar, out, coeffs: Sequence[int],
                      low: float = -1.0, high: float = 1.0, num: int = 30,
                      split: str = 'train', frame: int = 0,
                      latent: Optional[str] = None,
                      fps: float = 25.0) -> pathlib.Path:
  """Sweeps expression coefficients `coeffs` from `low` to `high` in the
  pose of frame `frame` (the original's mouth-opening demo)."""
  out = prepare_output(out)
  dataset = avatar_lib.load_dataset(avatar, split)
  _checked_frame(dataset, split, frame)
  expressions = edits.expression_sweep(dataset.expressions[frame], coeffs,
                                       low, high, num)
  return render_sequence(
      avatar, out, 'expression', np.tile(dataset.c2w[frame], (num, 1, 1)),
      expressions, avatar.frame_code(split, frame, latent),
      dataset.intrinsics, dataset.background, fps)


def render_reenact(avatar: avatar_lib.Avatar, out, driving: str,
                   driving_split: str = 'test', neutral: Optional[int] = None,
                   driving_neutral: Optional[int] = None,
                   latent: Optional[str] = None,
                   fps: float = 25.0) -> pathlib.Path:
  """Drives the avatar with another dataset's expressions and head rotations
  (delta transfer around both neutral frames and frontal poses)."""
  out = prepare_output(out)
  target = avatar_lib.load_dataset(avatar, 'train')
  try:
    driver = data.load(driving, driving_split, background=False,
                       expr_dim=avatar.expr_dim,
                       expr_origin=f'the avatar (step {avatar.step})')
  except data.DatasetError as e:
    raise errors.RenderError(f'--driving: {e}') from None
  target_centre = scene.head_centre(target.c2w)
  driver_centre = scene.head_centre(driver.c2w)
  expressions, poses = edits.reenactment(
      target.expressions[edits.neutral_index(target.expressions, neutral)],
      target.c2w[edits.frontal_index(target.c2w, target_centre)],
      target_centre, driver.expressions,
      driver.expressions[edits.neutral_index(driver.expressions,
                                             driving_neutral)],
      driver.c2w, driver.c2w[edits.frontal_index(driver.c2w, driver_centre)])
  return render_sequence(avatar, out, 'reenact', poses, expressions,
                         avatar.shared_code(latent), target.intrinsics,
                         target.background, fps)
