"""Raw talking-head video -> NeRFace dataset folder (docs/architecture.md §3).

Two passes over the video keep memory at the size of the landmarks, not the
pixels: the first tracks every frame, which fixes the one square crop of the
whole video; the second crops, resizes and writes the kept frames and keeps
an evenly spread sample of them for the background estimate and the debug
overlays.

The same input and options give byte-identical output folders: every random
choice is seeded (the val draw with `Options.seed`, GrabCut's colour models
per call), results of the worker threads are placed by frame position, never
by completion order, and the only run-dependent values, the timings, sit in
one block of the report, `timings`.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Optional

import cv2
import numpy as np

from nerface_jax.preprocess import background as background_lib
from nerface_jax.preprocess import debug
from nerface_jax.preprocess import errors
from nerface_jax.preprocess import geometry
from nerface_jax.preprocess import tracking
from nerface_jax.preprocess import video as video_lib
from nerface_jax.preprocess import writer

# Bump when the same input and options would give a different dataset, so
# that a folder made by an older version is not taken for up to date.
FORMAT_VERSION = 2  # 2: index_map.npy.
BACKGROUND_FRAMES = 60  # Frames sampled for the background estimate.
DEBUG_SIZE = 512  # Overlays are drawn at least this large to be legible.
# zlib level of the PNGs: close to the smallest files at a fraction of the
# time of level 9.
PNG_COMPRESSION = 3


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything that shapes the dataset (the command-line flags).

  Attributes:
    size: int side of the written square images in pixels.
    tracker_model: path of face_landmarker.task; None looks in
      `tracking.default_model_path()`.
    test_fraction: the last fraction of the kept frames in time -> test.
    val_fraction: fraction of the remaining frames drawn at random -> val.
    max_frames: read only the first this many frames (None: all).
    background: 'auto', 'median', 'color', 'color:R,G,B' or 'file:PATH'.
    smooth: std in frames of a Gaussian temporal smoothing of poses and
      expressions (0: none).
    crop_margin: margin around the head (with hair) through all frames, as a
      fraction of the head box's longer side, before clipping to the frame.
    seed: int seed of the val draw.
    debug_frames: number of frames with tracking overlays in debug/.
  """
  size: int = 512
  tracker_model: Optional[str] = None
  test_fraction: float = 0.1
  val_fraction: float = 0.05
  max_frames: Optional[int] = None
  background: str = 'auto'
  smooth: float = 0.0
  crop_margin: float = 0.3
  seed: int = 0
  debug_frames: int = 6

  def validate(self):
    """Raises PreprocessError naming the first invalid option."""
    # Comparisons are False for NaN, and math.isfinite refuses infinity.
    checks = [
        (self.size >= 8, f'--size must be at least 8, got {self.size}.'),
        (0.0 < self.test_fraction < 1.0,
         f'--test_fraction must be in (0, 1), got {self.test_fraction}.'),
        (0.0 < self.val_fraction < 1.0,
         f'--val_fraction must be in (0, 1), got {self.val_fraction}.'),
        (self.max_frames is None or self.max_frames >= 1,
         f'--max_frames must be positive, got {self.max_frames}.'),
        (self.smooth >= 0.0 and math.isfinite(self.smooth),
         f'--smooth must be a finite number >= 0, got {self.smooth}.'),
        (self.crop_margin >= 0.0 and math.isfinite(self.crop_margin),
         f'--crop_margin must be a finite number >= 0, got '
         f'{self.crop_margin}.'),
        (self.seed >= 0, f'--seed must be >= 0, got {self.seed}.'),
        (self.debug_frames >= 0,
         f'--debug_frames must be >= 0, got {self.debug_frames}.'),
    ]
    for ok, message in checks:
      if not ok:
        raise errors.PreprocessError(message)
    background_lib.parse_spec(self.background)


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _fingerprint(video_sha: str, model_sha: str, options: Options) -> str:
  """Digest of everything the output depends on (not of file locations)."""
  fields = dataclasses.asdict(options)
  del fields['tracker_model']  # The model's content counts, not its path.
  spec = background_lib.parse_spec(options.background)
  if spec.path is not None:
    fields['background'] = 'file:' + _sha256(spec.path)
  payload = json.dumps({'version': FORMAT_VERSION, 'video': video_sha,
                        'model': model_sha, 'options': fields},
                       sort_keys=True)
  return hashlib.sha256(payload.encode()).hexdigest()


def _spread(count: int, wanted: int) -> np.ndarray:
  """Up to `wanted` distinct positions in [0, count) spread evenly in time."""
  if wanted <= 0 or count == 0:
    return np.zeros((0,), np.int64)
  return np.unique(np.round(np.linspace(0, count - 1, min(wanted, count))
                            ).astype(np.int64))


def _write_png(path: pathlib.Path, rgb: np.ndarray):
  """Writes uint8 [H, W, 3] RGB as PNG (imencode + tofile: any path)."""
  ok, encoded = cv2.imencode(
      '.png', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
      [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
  if not ok:
    raise OSError(f'{path}: PNG encoding failed.')
  encoded.tofile(path)


def _skip_summary(reasons: list[Optional[str]]) -> str:
  counts: dict[str, int] = {}
  for reason in reasons:
    if reason is not None:
      key = reason.split(' (')[0]
      counts[key] = counts.get(key, 0) + 1
  return ', '.join(f'{n} x {r}' for r, n in sorted(counts.items()))


def preprocess(video: str | pathlib.Path, out: str | pathlib.Path,
               options: Optional[Options] = None, *,
               log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
  """Converts a talking-head video into a NeRFace dataset folder.

  Writes `out/transforms_{train,val,test}.json`, `out/<split>/f_<frame>.png`
  (named by the frame's index in the video, so skipped frames leave gaps
  instead of shifting names), `out/bg/00050.png`, `out/index_map.npy` (one
  row per written frame: video frame index, train row or -1; skipped frames
  are not rows), `out/debug/` and `out/preprocess_report.json`.

  Args:
    video: a video file or a folder of images.
    out: the dataset folder to create (absent or empty), or one holding the
      same dataset already (then nothing is done).
    options: see `Options`.
    log: called with progress lines (default: print to stderr).

  Staging folders of `out` left by killed runs on this host are removed
  first (`writer.remove_stale_partials`), and said so through `log`.

  Returns:
    The report (also written to `out/preprocess_report.json`). Running the
    same command again writes the same bytes into every file but the
    report's `timings` block.

  Raises:
    PreprocessError: unreadable or empty video, missing or corrupt tracker
      model, no face in any frame, an output folder holding something else,
      or an invalid option; the message names the file and frame.
  """
  start = time.time()
  options = options or Options()
  if log is None:
    log = lambda line: print(f'preprocess: {line}', file=sys.stderr,
                             flush=True)
  options.validate()
  spec = background_lib.parse_spec(options.background)
  out = pathlib.Path(out).expanduser()
  source = video_lib.open_video(video)
  model_path = tracking.check_model(options.tracker_model)
  # A photo of the wrong size is refused before the long passes.
  photo = (background_lib.load_photo(spec.path, source.height, source.width)
           if spec.mode == 'file' else None)
  fingerprint = _fingerprint(source.fingerprint(), _sha256(model_path),
                             options)
  writer.remove_stale_partials(out, log)
  existing = writer.check_output(out, fingerprint, str(source.path))
  if existing is not None:
    log(f'{out} already holds this dataset; nothing to do.')
    return existing

  # Pass 1: track every frame.
  log(f'tracking {source.path} ({source.width}x{source.height}, '
      f'{source.fps:g} fps, about {source.frame_count} frames)')
  tracks = tracking.track(
      source.frames(options.max_frames), model_path, source.fps,
      source.height, source.width,
      progress=lambda n: log(f'tracked {n} frames'))
  time_track = time.time() - start
  kept = np.flatnonzero(tracks.valid)
  skipped = [{'frame': int(i), 'reason': tracks.reasons[i]}
             for i in np.flatnonzero(~tracks.valid)]
  if kept.size == 0:
    raise errors.PreprocessError(
        f'{source.path}: no frame has a usable face (frames 0 to '
        f'{tracks.num_frames - 1}: {_skip_summary(tracks.reasons)}). The '
        'preprocessor needs one person facing the camera.')
  log(f'{kept.size} of {tracks.num_frames} frames tracked'
      + (f'; skipped: {_skip_summary(tracks.reasons)}' if skipped else ''))
  positions = writer.splits(kept.size, options.test_fraction,
                            options.val_fraction, options.seed)

  # Camera, poses, expressions and boxes of the kept frames.
  height, width, size = source.height, source.width, options.size
  landmarks = tracks.landmarks[kept]
  crop = geometry.square_crop(
      geometry.landmark_boxes(landmarks, height, width), height, width,
      options.crop_margin)
  intrinsics = geometry.crop_intrinsics(height, width, crop, size,
                                        tracking.FOV_Y_DEGREES)
  c2w, scale = geometry.camera_poses(tracks.matrices[kept])
  if options.smooth > 0:
    c2w = geometry.smooth_poses(c2w, kept, options.smooth)
    # Averaging moves the mean distance a little off 0.5; rescale the world.
    factor = geometry.MEAN_DISTANCE / np.linalg.norm(c2w[:, :3, 3],
                                                     axis=-1).mean()
    c2w[:, :3, 3] *= factor
    scale *= factor
  expressions = np.clip(geometry.smooth_series(
      tracks.blendshapes[kept], kept, options.smooth), 0.0, 1.0)
  bboxes = np.stack([geometry.face_bbox(l, height, width, crop)
                     for l in landmarks])

  split_of = np.empty(kept.size, object)
  for split, where in positions.items():
    split_of[where] = split
  digits = max(4, len(str(tracks.num_frames - 1)))
  names = [f'{split_of[k]}/f_{kept[k]:0{digits}d}' for k in range(kept.size)]
  bg_positions = set(_spread(
      kept.size, BACKGROUND_FRAMES if spec.needs_frames else 0).tolist())
  debug_positions = set(_spread(kept.size, options.debug_frames).tolist())
  debug_size = max(size, DEBUG_SIZE)

  with writer.staging(out) as tmp:
    # Pass 2: crop, resize and write the kept frames.
    time_write = time.time()
    for split in writer.SPLITS:
      (tmp / split).mkdir()
    # Keyed by position k: what the threads return is placed by frame, not
    # by the order in which they finish.
    bg_frames = {}
    position_of = {int(f): k for k, f in enumerate(kept)}
    writes, masks, debug_images = collections.deque(), {}, {}
    decoded = 0
    # PNG encoding and GrabCut release the GIL: a few threads keep every
    # core busy while the main thread decodes.
    with concurrent.futures.ThreadPoolExecutor(
        min(4, os.cpu_count() or 1)) as pool:
      for index, rgb in source.frames(tracks.num_frames):
        decoded += 1
        k = position_of.get(index)
        if k is None:
          continue
        image = video_lib.crop_and_resize(rgb, crop, size)
        writes.append(pool.submit(_write_png, tmp / f'{names[k]}.png', image))
        if (k in bg_positions and spec.needs_masks) or k in debug_positions:
          # GrabCut sees the crop at its own resolution: a 64-pixel output
          # has too few pixels for its colour models, a 512-pixel one costs.
          work = min(background_lib.GRABCUT_SIZE, crop[2])
          masks[k] = pool.submit(
              background_lib.refine_mask,
              video_lib.crop_and_resize(rgb, crop, work),
              geometry.to_crop_pixels(landmarks[k], height, width, crop,
                                      work), size)
        if k in bg_positions:
          bg_frames[k] = image
        if k in debug_positions:
          debug_images[k] = video_lib.crop_and_resize(rgb, crop, debug_size)
        while len(writes) > 16:  # Bounds the images waiting in memory.
          writes.popleft().result()
      for future in writes:
        future.result()
      masks = {k: future.result() for k, future in masks.items()}
    if decoded != tracks.num_frames:
      raise errors.PreprocessError(
          f'{source.path}: the second read gave {decoded} frames, the first '
          f'{tracks.num_frames}; the file changed or does not decode the '
          'same way twice.')
    time_write = time.time() - time_write

    time_bg = time.time()
    if spec.mode == 'file':
      bg = video_lib.crop_and_resize(photo, crop, size)
      filled = np.zeros((size, size), bool)
    elif not spec.needs_frames:
      bg = np.broadcast_to(np.array(spec.color, np.uint8), (size, size, 3))
      filled = np.ones((size, size), bool)
    else:
      order = sorted(bg_frames)
      bg, filled = background_lib.estimate(
          np.stack([bg_frames[k] for k in order]),
          np.stack([masks[k] for k in order]) if spec.needs_masks else None,
          spec)
    (tmp / 'bg').mkdir()
    _write_png(tmp / 'bg' / '00050.png', bg)
    time_bg = time.time() - time_bg

    for split, where in positions.items():
      frames = [{
          'file_path': f'./{names[k]}',
          'transform_matrix': writer.round_floats(c2w[k]).tolist(),
          'expression': writer.round_floats(expressions[k]).tolist(),
          'bbox': writer.round_floats(bboxes[k]).tolist(),
      } for k in where]
      (tmp / f'transforms_{split}.json').write_text(
          writer.transforms_json(intrinsics, size, frames))
    writer.write_index_map(tmp, kept, positions['train'])

    time_debug = time.time()
    _write_debug(tmp / 'debug',
                 {k: (image, masks[k]) for k, image in debug_images.items()},
                 model_path, c2w, scale,
                 landmarks, bboxes, kept, tracks.reprojection, names, crop,
                 height, width, debug_size, bg, filled)
    time_debug = time.time() - time_debug

    total = time.time() - start
    distances = np.linalg.norm(c2w[:, :3, 3], axis=-1)
    report = {
        'video': str(source.path),
        'fingerprint': fingerprint,
        'format_version': FORMAT_VERSION,
        'frames_decoded': int(tracks.num_frames),
        'frames_kept': int(kept.size),
        'frames_skipped': len(skipped),
        'skipped': skipped,
        'splits': {s: int(p.size) for s, p in positions.items()},
        'frame_size': [height, width],
        'fps': source.fps,
        'crop': {'x0': crop[0], 'y0': crop[1], 'side': crop[2]},
        'size': size,
        'intrinsics': writer.round_floats(intrinsics).tolist(),
        'fov_y_degrees': tracking.FOV_Y_DEGREES,
        'units_per_cm': scale,
        'mean_camera_distance': float(distances.mean()),
        'camera_distance_range': [float(distances.min()),
                                  float(distances.max())],
        'reprojection_face_heights': {
            'median': float(np.median(tracks.reprojection[kept])),
            'max': float(np.max(tracks.reprojection[kept]))},
        'expression_names': tracks.blendshape_names,
        'background': {'mode': options.background,
                       'frames_used': len(bg_frames),
                       'filled_fraction': float(filled.mean())},
        'options': dataclasses.asdict(options),
        'tracker_model': str(model_path),
        # The one block that differs between runs of the same command.
        'timings': {'track_s': round(time_track, 3),
                    'write_s': round(time_write, 3),
                    'background_s': round(time_bg, 3),
                    'debug_s': round(time_debug, 3),
                    'total_s': round(total, 3),
                    'frames_per_second': round(tracks.num_frames / total, 2)},
    }
    writer.write_json(tmp / writer.REPORT_FILE, report)
  log(f'wrote {out}: {kept.size} frames (train {positions["train"].size}, '
      f'val {positions["val"].size}, test {positions["test"].size}), '
      f'{len(skipped)} skipped, '
      f'{report["timings"]["frames_per_second"]:.1f} frames/s')
  return report


def _write_debug(folder: pathlib.Path,
                 images: dict[int, tuple[np.ndarray, np.ndarray]],
                 model_path: pathlib.Path, c2w: np.ndarray, scale: float,
                 landmarks: np.ndarray, bboxes: np.ndarray, kept: np.ndarray,
                 reprojection: np.ndarray, names: list[str],
                 crop: tuple[int, int, int], height: int, width: int,
                 debug_size: int, bg: np.ndarray, filled: np.ndarray):
  """Writes overlays of a few frames, the background and its coverage."""
  # Here, not at the top: the library's camera brings JAX, a second of
  # start-up that a command refusing a bad flag should not pay.
  from nerface_jax import camera  # pylint: disable=g-import-not-at-top
  folder.mkdir()
  vertices, triangles = tracking.canonical_mesh(model_path)
  # The camera of the overlay image: the written one at debug resolution.
  intrinsics = geometry.crop_intrinsics(height, width, crop, debug_size,
                                        tracking.FOV_Y_DEGREES)
  overlays = []
  for k, (image, mask) in sorted(images.items()):
    mesh, _ = camera.project_np(vertices * scale, intrinsics, c2w[k],
                                debug_size, debug_size)
    points = geometry.to_crop_pixels(landmarks[k], height, width, crop,
                                     debug_size)
    # The background's person mask, at overlay resolution.
    mask = cv2.resize(mask.astype(np.uint8), (debug_size, debug_size),
                      interpolation=cv2.INTER_NEAREST).astype(bool)
    label = (f'{names[k]}  reproj {reprojection[kept[k]]:.3f} face h')
    overlays.append(debug.overlay(image, points, mesh, triangles, bboxes[k],
                                  mask, label))
    _write_png(folder / f'overlay_f_{kept[k]:04d}.png', overlays[-1])
  if overlays:
    _write_png(folder / 'overlays.png', debug.contact_sheet(overlays))
  _write_png(folder / 'background.png', bg)
  _write_png(folder / 'background_filled.png', debug.coverage(bg, filled))
