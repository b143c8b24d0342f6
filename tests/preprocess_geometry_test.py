"""Unit tests of the preprocessor's pure parts: camera and crop geometry,
poses, smoothing, boxes, splits, the mesh decoder and the background maths.

No video and no tracker: a synthetic tracker camera is written here from
its definition (63 degree vertical field of view, principal point at the
frame's centre, normalised corner coordinates), and the training code's
`camera.generate_rays` is the reference for the dataset's ray formula.
"""

import math
import struct

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import camera
from nerface_jax.preprocess import errors
from nerface_jax.preprocess import geometry
from nerface_jax.preprocess import writer

FOV = 63.0


def _rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
  """float64 [3, 3] rotation by at most `max_angle` radians, random axis."""
  axis = rng.normal(size=3)
  axis /= np.linalg.norm(axis)
  angle = rng.uniform(-max_angle, max_angle)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                [-axis[1], axis[0], 0]])
  return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def _face_matrices(rng: np.random.Generator, count: int) -> np.ndarray:
  """float64 [count, 4, 4] face-to-camera poses like a tracker's (cm)."""
  matrices = np.tile(np.eye(4), (count, 1, 1))
  for m in matrices:
    m[:3, :3] = _rotation(rng, 0.4)
    m[:3, 3] = [rng.uniform(-4, 4), rng.uniform(-4, 4), rng.uniform(-40, -25)]
  return matrices


def _tracker_landmarks(points_cm: np.ndarray, matrix: np.ndarray, height: int,
                       width: int) -> np.ndarray:
  """What the tracker reports: normalised (x / W, y / H) of face points."""
  cam = points_cm @ matrix[:3, :3].T + matrix[:3, 3]
  focal = 0.5 * height / math.tan(math.radians(0.5 * FOV))
  x = 0.5 * width + focal * cam[:, 0] / -cam[:, 2]
  y = 0.5 * height - focal * cam[:, 1] / -cam[:, 2]
  return np.stack([x / width, y / height], -1)


def test_written_camera_sees_the_face_where_the_tracker_did():
  rng = np.random.default_rng(0)
  height, width, size = 480, 640, 96
  points = rng.uniform(-8, 8, size=(50, 3))  # Canonical face points, cm.
  matrices = _face_matrices(rng, 5)
  c2w, scale = geometry.camera_poses(matrices)
  crop = (150, 40, 300)  # Off-centre: the principal point is not the crop's.
  intrinsics = geometry.crop_intrinsics(height, width, crop, size, FOV)
  for matrix, pose in zip(matrices, c2w):
    landmarks = _tracker_landmarks(points, matrix, height, width)
    pixels = geometry.to_crop_pixels(landmarks, height, width, crop, size)
    # Rays of those pixels from the training code's camera pass through the
    # face points placed in the scaled world.
    rays = camera.generate_rays(jnp.asarray(pixels, jnp.float32),
                                jnp.asarray(intrinsics, jnp.float32),
                                jnp.asarray(pose, jnp.float32), size, size)
    origin = np.asarray(rays.origins, np.float64)
    direction = np.asarray(rays.directions, np.float64)
    offset = points * scale - origin
    # Directions have camera depth 1, so the point is origin + depth * d.
    depth = -(offset @ pose[:3, :3])[:, 2]
    chex.assert_trees_all_close(origin + depth[:, None] * direction,
                                points * scale, atol=2e-5)
    projected, _ = camera.project_np(points * scale, intrinsics, pose, size,
                                     size)
    chex.assert_trees_all_close(projected, pixels, atol=1e-7)


def test_crop_intrinsics_closed_form():
  # A 512 frame kept whole: the principal point is the centre, 255.5 in
  # pixel-centre coordinates, and the focal length that of 63 degrees.
  fx, fy, cx, cy = geometry.crop_intrinsics(512, 512, (0, 0, 512), 512, FOV)
  np.testing.assert_allclose([fx, fy], 256.0 / math.tan(math.radians(31.5)))
  np.testing.assert_allclose([cx * 512, cy * 512], [255.5, 255.5])
  # Halving the output halves the focal length; the centre stays mid-image.
  fx2, _, cx2, _ = geometry.crop_intrinsics(512, 512, (0, 0, 512), 256, FOV)
  np.testing.assert_allclose(fx2, fx / 2)
  np.testing.assert_allclose(cx2 * 256, 127.5)


def test_camera_poses_are_rigid_inverses_at_mean_distance_half():
  rng = np.random.default_rng(1)
  matrices = _face_matrices(rng, 7)
  c2w, scale = geometry.camera_poses(matrices)
  chex.assert_shape(c2w, (7, 4, 4))
  rotation = c2w[:, :3, :3]
  chex.assert_trees_all_close(np.einsum('nji,njk->nik', rotation, rotation),
                              np.broadcast_to(np.eye(3), (7, 3, 3)),
                              atol=1e-12)
  chex.assert_trees_all_close(np.linalg.det(rotation), np.ones(7), atol=1e-12)
  np.testing.assert_allclose(
      np.linalg.norm(c2w[:, :3, 3], axis=-1).mean(), 0.5)
  # A face point p (cm) seen at camera point M p is, in the scaled world,
  # scale * p: c2w undoes M up to the scale.
  point = rng.normal(size=3) * 5
  for m, pose in zip(matrices, c2w):
    cam = m[:3, :3] @ point + m[:3, 3]
    chex.assert_trees_all_close(pose[:3, :3] @ (scale * cam) + pose[:3, 3],
                                scale * point, atol=1e-12)
  np.testing.assert_allclose(
      scale, 0.5 / np.mean([np.linalg.norm(m[:3, 3]) for m in matrices]))


def test_square_crop_covers_every_head_and_stays_in_the_frame():
  boxes = np.array([[300.0, 400.0, 200.0, 330.0], [320.0, 430.0, 210.0,
                                                   340.0]])
  x0, y0, side = geometry.square_crop(boxes, 720, 1280, margin=0.3)
  w, h = 130.0, 140.0  # The union box: 300..430 by 200..340.
  head = [300 - 0.15 * w, 430 + 0.15 * w, 200 - 0.27 * h, 340 + 0.15 * h]
  assert side == round(max(head[1] - head[0], head[3] - head[2]) * 1.6)
  assert x0 <= head[0] and x0 + side >= head[1]
  assert y0 <= head[2] and y0 + side >= head[3]
  # Too large for the frame: the largest square, shifted inside.
  x0, y0, side = geometry.square_crop(boxes, 300, 1280, margin=0.3)
  assert (y0, side) == (0, 300)
  assert 0 <= x0 <= 1280 - 300
  x0, y0, side = geometry.square_crop(boxes - [290, 290, 0, 0], 720, 1280,
                                      margin=0.3)
  assert x0 == 0


def test_face_bbox_grows_like_nerface_and_clips():
  # A landmark box of 0.2 x 0.4 of a 100-pixel crop, rows first.
  landmarks = np.array([[0.4, 0.3], [0.6, 0.3], [0.4, 0.7], [0.6, 0.7]])
  box = geometry.face_bbox(landmarks, 100, 100, (0, 0, 100))
  chex.assert_trees_all_close(
      box, np.array([0.3 - 0.27 * 0.4, 0.7 + 0.15 * 0.4, 0.4 - 0.15 * 0.2,
                     0.6 + 0.15 * 0.2]), atol=1e-12)
  edge = geometry.face_bbox(landmarks - [0.39, 0.25], 100, 100, (0, 0, 100))
  assert edge[0] == 0.0 and edge[2] == 0.0


def test_smoothing_keeps_constants_rigidity_and_reduces_jitter():
  rng = np.random.default_rng(2)
  times = np.array([0, 1, 2, 3, 4, 5, 6, 7, 30, 31, 32])  # A gap at 8..29.
  base = np.eye(4)
  base[:3, 3] = [0.0, 0.0, 0.5]
  constant = np.tile(base, (times.size, 1, 1))
  chex.assert_trees_all_close(geometry.smooth_poses(constant, times, 1.5),
                              constant, atol=1e-12)
  noisy = constant.copy()
  for pose in noisy:
    pose[:3, :3] = _rotation(rng, 0.05)
    pose[:3, 3] += rng.normal(scale=0.01, size=3)
  smooth = geometry.smooth_poses(noisy, times, 1.5)
  for pose in smooth:
    assert geometry.is_rigid(pose) is None
  assert (np.abs(smooth[:, :3, 3] - base[:3, 3]).mean()
          < np.abs(noisy[:, :3, 3] - base[:3, 3]).mean())
  # Frames across the gap (more than 3 sigma away) do not mix.
  values = np.where(times < 20, 0.0, 1.0)[:, None]
  smoothed = geometry.smooth_series(values, times, 1.5)
  chex.assert_trees_all_close(smoothed, values, atol=1e-12)
  # Brute force: one Gaussian-weighted mean.
  series = rng.normal(size=(times.size, 2))
  weights = np.exp(-0.5 * ((times[3] - times) / 1.5) ** 2)
  weights[np.abs(times[3] - times) > 4.5] = 0
  chex.assert_trees_all_close(
      geometry.smooth_series(series, times, 1.5)[3],
      weights @ series / weights.sum(), atol=1e-12)
  chex.assert_trees_all_close(geometry.smooth_series(series, times, 0.0),
                              series)


@pytest.mark.parametrize('count', [3, 10, 40, 1001])
def test_splits_partition_with_test_last_in_time(count):
  parts = writer.splits(count, 0.1, 0.05, seed=0)
  everything = np.sort(np.concatenate(list(parts.values())))
  np.testing.assert_array_equal(everything, np.arange(count))
  assert all(p.size >= 1 for p in parts.values())
  assert parts['test'].min() > max(parts['train'].max(), parts['val'].max())
  if count >= 40:
    assert parts['test'].size == round(0.1 * count)
  again = writer.splits(count, 0.1, 0.05, seed=0)
  np.testing.assert_array_equal(again['val'], parts['val'])


def test_splits_need_three_frames():
  with pytest.raises(errors.PreprocessError, match='only 2 frame'):
    writer.splits(2, 0.1, 0.05, seed=0)


def test_round_floats_keeps_seven_significant_digits():
  values = np.array([0.0, 1.23456789, -9.87654321e-5, 123456.789])
  chex.assert_trees_all_close(writer.round_floats(values),
                              np.array([0.0, 1.234568, -9.876543e-5,
                                        123456.8]), rtol=1e-12)


def _varint(value: int) -> bytes:
  out = b''
  while True:
    byte, value = value & 0x7F, value >> 7
    out += bytes([byte | (0x80 if value else 0)])
    if not value:
      return out


def _field(number: int, wire: int, payload: bytes) -> bytes:
  return _varint(number << 3 | wire) + payload


def _mesh_message(vertices, uv, triangles, packed: bool) -> bytes:
  """A Mesh3d-like message written by hand (fields 1, 2, 3, 4)."""
  floats = np.concatenate([vertices, uv], axis=1).reshape(-1)
  body = _field(1, 0, _varint(0)) + _field(2, 0, _varint(0))
  if packed:
    raw = struct.pack(f'<{floats.size}f', *floats)
    body += _field(3, 2, _varint(len(raw)) + raw)
    raw = b''.join(_varint(int(i)) for i in np.ravel(triangles))
    body += _field(4, 2, _varint(len(raw)) + raw)
  else:
    body += b''.join(_field(3, 5, struct.pack('<f', f)) for f in floats)
    body += b''.join(_field(4, 0, _varint(int(i)))
                     for i in np.ravel(triangles))
  return body


@pytest.mark.parametrize('packed', [True, False])
def test_parse_canonical_mesh_decodes_hand_written_protobuf(packed):
  # tracking imports MediaPipe only inside `track`: this runs without it.
  from nerface_jax.preprocess import tracking  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  vertices = rng.normal(size=(6, 3)).astype(np.float32)
  uv = rng.uniform(size=(6, 2)).astype(np.float32)
  triangles = np.array([[0, 1, 2], [3, 4, 5], [5, 300, 1]])
  mesh = _mesh_message(vertices, uv, triangles, packed)
  # Top level: field 1 = the mesh, then an unrelated field that is skipped.
  metadata = (_field(1, 2, _varint(len(mesh)) + mesh)
              + _field(2, 2, _varint(3) + b'abc'))
  parsed_vertices, parsed_triangles = tracking.parse_canonical_mesh(metadata)
  chex.assert_trees_all_close(parsed_vertices, vertices.astype(np.float64))
  np.testing.assert_array_equal(parsed_triangles, triangles)


# ---------------------------------------------------------------------------
# Background maths (OpenCV).


def test_masked_median_matches_a_loop():
  pytest.importorskip('cv2')
  from nerface_jax.preprocess import background  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  frames = rng.integers(0, 256, size=(7, 5, 6, 3), dtype=np.uint8)
  visible = rng.uniform(size=(7, 5, 6)) < 0.6
  visible[:, 0, 0] = False  # Never seen.
  visible[:, 0, 1] = [True, True, False, False, False, False, False]  # Even.
  median, count = background.masked_median(frames, visible)
  for r in range(5):
    for c in range(6):
      assert count[r, c] == visible[:, r, c].sum()
      samples = frames[visible[:, r, c], r, c].astype(np.float64)
      if samples.size == 0:
        assert np.all(np.isnan(median[r, c]))
      else:
        np.testing.assert_allclose(median[r, c], np.median(samples, axis=0))
  plain, _ = background.masked_median(frames)
  np.testing.assert_allclose(plain, np.median(frames, axis=0))


def test_estimate_removes_a_moving_person_and_fills_the_unseen():
  pytest.importorskip('cv2')
  from nerface_jax.preprocess import background  # pylint: disable=g-import-not-at-top
  size = 32
  rng = np.random.default_rng(5)
  scene = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
  frames, masks = [], []
  for k in range(10):
    frame = scene.copy()
    person = np.zeros((size, size), bool)
    person[8:, 4 + k:14 + k] = True  # A "person" sliding to the right.
    person[20:, :] = True  # A desk that never moves: never seen.
    frame[person] = [200, 30, 30]
    frames.append(frame)
    masks.append(person)
  bg, filled = background.estimate(np.stack(frames), np.stack(masks),
                                    background.parse_spec('auto'))
  # Everything seen in at least a fifth of the frames is the scene.
  seen = (~np.stack(masks)).sum(0) >= 2
  np.testing.assert_array_equal(bg[seen], scene[seen])
  np.testing.assert_array_equal(filled, ~seen)
  # The fill takes colours of the seen scene, not the person's red.
  assert np.abs(bg[~seen].astype(float) - [200, 30, 30]).sum(-1).min() > 60
  lo, hi = scene[seen].min(0), scene[seen].max(0)
  assert np.all((bg[~seen] >= lo) & (bg[~seen] <= hi))
  # A green screen: one colour, the visible samples' median.
  green = np.stack(frames).copy()
  green[~np.stack(masks)] = [0, 177, 64]
  bg, filled = background.estimate(green, np.stack(masks),
                                   background.parse_spec('color'))
  assert np.all(bg == [0, 177, 64]) and filled.all()


def test_inpaint_of_a_hole_in_a_flat_image_is_flat():
  pytest.importorskip('cv2')
  from nerface_jax.preprocess import background  # pylint: disable=g-import-not-at-top
  image = np.full((20, 24, 3), [10, 120, 250], np.uint8)
  hole = np.zeros((20, 24), bool)
  hole[5:15, 3:20] = True
  damaged = image.copy()
  damaged[hole] = 0
  np.testing.assert_array_equal(background.inpaint(damaged, hole), image)
  # A left-right ramp: the fill stays between the ramp's ends.
  ramp = np.repeat(np.linspace(0, 240, 24)[None, :, None], 20, 0)
  ramp = np.repeat(ramp, 3, 2).astype(np.uint8)
  filled = background.inpaint(np.where(hole[..., None], 0, ramp), hole)
  np.testing.assert_array_equal(filled[~hole], ramp[~hole])
  assert np.all(np.diff(filled[10, :, 0].astype(int)) >= -25)


@pytest.mark.parametrize('value, message', [
    ('paint', 'unknown mode'),
    ('color:1,2', 'expected color:R,G,B'),
    ('color:0,300,0', 'expected color:R,G,B'),
    ('file:/nonexistent/empty.png', 'background photo not found'),
])
def test_background_spec_errors(value, message):
  pytest.importorskip('cv2')
  from nerface_jax.preprocess import background  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.PreprocessError, match=message):
    background.parse_spec(value)


def test_person_mask_covers_face_hair_and_body_not_the_corners():
  pytest.importorskip('cv2')
  from nerface_jax.preprocess import background  # pylint: disable=g-import-not-at-top
  size = 100
  angles = np.linspace(0, 2 * np.pi, 40, endpoint=False)
  # An elliptic "face" 30 wide, 40 tall, centred at (50, 45).
  face = np.stack([50 + 15 * np.cos(angles), 45 + 20 * np.sin(angles)], -1)
  mask = background.person_mask(face, size)
  assert mask[45, 50] and mask[45, 36] and mask[45, 64]  # Face.
  assert mask[int(25 - 0.5 * 40 * background.HEAD_TOP), 50]  # Hair above.
  assert mask[99, 50] and mask[99, 20]  # Neck and shoulders.
  assert not mask[0, 0] and not mask[0, 99] and not mask[40, 2]


def test_background_photo_is_cropped_like_the_frames(tmp_path):
  cv2 = pytest.importorskip('cv2')
  from nerface_jax.preprocess import background  # pylint: disable=g-import-not-at-top
  photo = np.random.default_rng(6).integers(0, 256, (30, 40, 3), np.uint8)
  path = tmp_path / 'empty scene.png'
  cv2.imwrite(str(path), photo[..., ::-1])  # OpenCV writes BGR.
  spec = background.parse_spec(f'file:{path}')
  bg = background.from_photo(spec.path, 30, 40, (5, 2, 20), 20)
  np.testing.assert_array_equal(bg, photo[2:22, 5:25])
  with pytest.raises(errors.PreprocessError,
                     match=r'empty scene.png: background photo is 40x30 '
                     r'pixels but the video frames are 64x48'):
    background.from_photo(spec.path, 48, 64, (0, 0, 20), 20)
