"""Tests of nerface_jax.synthetic: the dataset format and the 3D scene.

The scene is checked from the outside, as a loader and a NeRF see it: points
are projected with the json's numbers by inverting the docs/architecture.md §3
ray formula (written here in numpy), and rays are generated from the json by
that formula.
"""

import json
import math
import pathlib
import re

import chex
import numpy as np
from PIL import Image
import pytest

from nerface_jax import data
from nerface_jax import synthetic

SIZE = 64  # Pixels: fine enough for sub-centimetre geometric checks.
FRAMES = 12
SPLITS = ('train', 'val', 'test')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> pathlib.Path:
  return synthetic.write(tmp_path_factory.mktemp('synthetic') / 'person',
                         size=SIZE, frames=FRAMES, seed=0)


def _files(root: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob('*')) if p.is_file()}


def _metas(root: pathlib.Path) -> dict[str, dict]:
  return {s: json.loads((root / f'transforms_{s}.json').read_text())
          for s in SPLITS}


def _frames_in_time(root: pathlib.Path) -> list[dict]:
  """Every frame entry of every split, ordered by the global frame index."""
  frames = [f for meta in _metas(root).values() for f in meta['frames']]
  return sorted(frames, key=lambda f: f['file_path'][-4:])


def _index(frame: dict) -> int:
  return int(frame['file_path'][-4:])


def _ray(i, j, intrinsics, c2w, size):
  """Ray through pixel column i, row j: (origin [3], dir [3])."""
  fx, fy, cx, cy = intrinsics
  d_cam = np.array([(i - size * cx) / fx, -(j - size * cy) / fy, -1.0])
  c2w = np.asarray(c2w)
  return c2w[:3, 3], c2w[:3, :3] @ d_cam


def _project(point, intrinsics, c2w, size):
  """The ray formula inverted: (column i, row j, camera depth) of a point."""
  c2w = np.asarray(c2w)
  cam = c2w[:3, :3].T @ (np.asarray(point) - c2w[:3, 3])
  depth = -cam[2]
  fx, fy, cx, cy = intrinsics
  # From cam / depth = [(i - W cx) / fx, -(j - H cy) / fy, -1].
  return (size * cx + fx * cam[0] / depth, size * cy - fy * cam[1] / depth,
          depth)


def _front_c2w(yaw_deg: float = 0.0, pitch_deg: float = 0.0) -> np.ndarray:
  """A camera 0.5 from the head looking at it from yaw/pitch (degrees)."""
  yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
  forward = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch),
                      math.cos(yaw) * math.cos(pitch)])  # Camera +z axis.
  right = np.cross([0.0, 1.0, 0.0], forward)
  right /= np.linalg.norm(right)
  up = np.cross(forward, right)
  c2w = np.eye(4)
  c2w[:3, :3] = np.stack([right, up, forward], axis=1)
  c2w[:3, 3] = 0.5 * forward
  return c2w


def _expression(**coefficients) -> np.ndarray:
  expression = np.zeros(synthetic.EXPR_DIM)
  for name, value in coefficients.items():
    expression[getattr(synthetic, name)] = value
  return expression


def _differs(image: np.ndarray, background: np.ndarray) -> np.ndarray:
  return np.any(image != background, axis=-1)


# --- Determinism --------------------------------------------------------------


def test_write_is_deterministic_and_seeded(dataset, tmp_path):
  reference = _files(dataset)
  again = _files(synthetic.write(tmp_path / 'again', SIZE, FRAMES, seed=0))
  assert sorted(again) == sorted(reference)
  for name, content in reference.items():
    assert again[name] == content, name
  other = _files(synthetic.write(tmp_path / 'other', SIZE, FRAMES, seed=1))
  for split in SPLITS:
    name = f'transforms_{split}.json'
    assert other[name] != reference[name]
  common_images = [n for n in other if n in reference and n.endswith('.png')
                   and not n.startswith('bg')]
  assert common_images
  assert all(other[n] != reference[n] for n in common_images)
  # The background is the same for every seed: it is static scenery.
  assert other['bg/00050.png'] == reference['bg/00050.png']


# --- Format -------------------------------------------------------------------


def test_folder_has_the_nerface_format(dataset):
  metas = _metas(dataset)
  seen = []
  for split, meta in metas.items():
    assert list(meta) == ['camera_angle_x', 'intrinsics', 'frames']
    fx, fy, cx, cy = meta['intrinsics']
    assert fx < 0 < fy  # Signed like the released data.
    assert 0.4 < cx < 0.6 and 0.4 < cy < 0.6 and (cx, cy) != (0.5, 0.5)
    assert meta['camera_angle_x'] == pytest.approx(
        2 * math.atan(SIZE / (2 * fx)), rel=1e-6)
    assert meta['frames']
    for frame in meta['frames']:
      assert list(frame) == ['file_path', 'transform_matrix', 'expression',
                             'bbox']
      assert re.fullmatch(rf'\./{split}/f_\d{{4}}', frame['file_path'])
      seen.append(_index(frame))
      with Image.open(dataset / (frame['file_path'] + '.png')) as image:
        assert image.mode == 'RGB' and image.size == (SIZE, SIZE)
      expression = frame['expression']
      assert len(expression) == synthetic.EXPR_DIM == 76
      assert all(type(v) is float for v in expression)  # pylint: disable=unidiomatic-typecheck
      c2w = np.array(frame['transform_matrix'])
      chex.assert_shape(c2w, (4, 4))
      np.testing.assert_array_equal(c2w[3], [0, 0, 0, 1])
      rotation = c2w[:3, :3]
      np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-6)
      assert np.linalg.det(rotation) == pytest.approx(1.0, abs=1e-6)
      # The camera is about 0.5 from the head, as in the released data.
      assert 0.45 < np.linalg.norm(c2w[:3, 3]) < 0.55
      h_min, h_max, w_min, w_max = frame['bbox']
      assert 0.0 <= h_min < h_max <= 1.0 and 0.0 <= w_min < w_max <= 1.0
  assert sorted(seen) == list(range(FRAMES))
  # The test split is the end of the video; val is drawn from the rest.
  test = sorted(_index(f) for f in metas['test']['frames'])
  assert test == list(range(FRAMES - len(test), FRAMES))
  assert len(metas['val']['frames']) >= 1
  with Image.open(dataset / 'bg' / '00050.png') as bg:
    assert bg.mode == 'RGB' and bg.size == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(bg), synthetic.background(SIZE))


def test_loader_reads_the_folder(dataset):
  datasets = data.load_splits(dataset)
  assert sum(d.num_frames for d in datasets.values()) == FRAMES
  train = datasets['train']
  chex.assert_shape(train.images, (train.num_frames, SIZE, SIZE, 3))
  assert train.expr_dim == synthetic.EXPR_DIM
  np.testing.assert_array_equal(train.background,
                                synthetic.background(SIZE))


def test_index_map_matches_the_splits(dataset):
  index_map = np.load(dataset / 'index_map.npy')
  assert index_map.dtype == np.int64
  split = synthetic.splits(FRAMES, seed=0)
  # One row per frame of the video, in time order.
  np.testing.assert_array_equal(index_map[:, 0], np.arange(FRAMES))
  expected = np.full(FRAMES, -1)
  expected[split['train']] = np.arange(len(split['train']))
  np.testing.assert_array_equal(index_map[:, 1], expected)
  # Column 1 is the frame's row in transforms_train.json.
  train = _metas(dataset)['train']['frames']
  for frame, k in index_map[index_map[:, 1] >= 0]:
    assert _index(train[k]) == frame
  assert len(train) == np.sum(index_map[:, 1] >= 0)
  np.testing.assert_array_equal(data.read_index_map(dataset), index_map)


def test_cache_folder_without_index_map_stays_valid(tmp_path, monkeypatch):
  # Folders cached before index_map.npy existed hold the same images and
  # json: they are complete and load.
  path = synthetic.ensure(tmp_path, size=16, frames=4, seed=2)
  (path / 'index_map.npy').unlink()
  monkeypatch.setattr(synthetic, 'write', None)  # Must not be called.
  assert synthetic.ensure(tmp_path, size=16, frames=4, seed=2) == path
  assert data.read_index_map(path) is None
  assert sum(d.num_frames for d in data.load_splits(path).values()) == 4


def test_splits_for_a_video_length():
  split = synthetic.splits(300, seed=3)
  assert len(split['test']) == 30
  np.testing.assert_array_equal(split['test'], np.arange(270, 300))
  assert len(split['val']) == round(0.05 * 270)
  everything = np.concatenate([split['train'], split['val'], split['test']])
  np.testing.assert_array_equal(np.sort(everything), np.arange(300))
  with pytest.raises(ValueError):
    synthetic.splits(2, seed=0)


def test_images_are_renders_of_the_json(dataset):
  """The stored frames are `render` of the json's own (rounded) numbers."""
  traj = synthetic.trajectory(FRAMES, seed=0)
  metas = _metas(dataset)
  for split in SPLITS:
    meta = metas[split]
    for frame in meta['frames'][:2]:
      f = _index(frame)
      image, _ = synthetic.render(
          np.array(frame['transform_matrix']), np.array(frame['expression']),
          SIZE, intrinsics=np.array(meta['intrinsics']),
          appearance=traj.appearance[f])
      with Image.open(dataset / (frame['file_path'] + '.png')) as stored:
        np.testing.assert_array_equal(image, np.asarray(stored))


# --- Geometry seen through the dataset camera ----------------------------------


def test_nose_tip_projects_where_the_rays_hit_it(dataset):
  """The key test: a known surface point, projected with the json's numbers.

  The ray through the projected pixel (generated from the json) must hit
  the head at that point: `render`'s depth there is the point's camera depth
  and the pixel shows the head, not the background.
  """
  bg = synthetic.background(SIZE)
  tip = np.array(synthetic.NOSE_TIP)
  metas = _metas(dataset)
  for frame in _frames_in_time(dataset):
    meta = metas[frame['file_path'].split('/')[1]]
    intrinsics = np.array(meta['intrinsics'])
    c2w = np.array(frame['transform_matrix'])
    expression = np.array(frame['expression'])
    i, j, depth = _project(tip, intrinsics, c2w, SIZE)
    assert 0.2 < depth < 0.8  # Inside near/far.
    col, row = int(round(i)), int(round(j))

    _, depth_map = synthetic.render(c2w, expression, SIZE,
                                    intrinsics=intrinsics, supersample=1)
    origin, direction = _ray(col, row, intrinsics, c2w, SIZE)
    hit = origin + depth_map[row, col] * direction
    # Within a pixel (in the world, at the tip's depth) of the tip: the
    # rounded pixel's ray passes less than 0.71 px from it.
    pixel = depth / abs(intrinsics[0])
    assert np.linalg.norm(hit - tip) < 1.0 * pixel, frame['file_path']
    assert abs(depth_map[row, col] - depth) < 0.5 * pixel

    # Exactly: shift the principal point so the tip falls on the pixel's
    # integer position; the ray through it then passes through the tip.
    shifted = intrinsics.copy()
    shifted[2] += (col - i) / SIZE
    shifted[3] += (row - j) / SIZE
    origin, direction = _ray(col, row, shifted, c2w, SIZE)
    np.testing.assert_allclose(origin + depth * direction, tip, atol=1e-7)
    _, depth_map = synthetic.render(c2w, expression, SIZE,
                                    intrinsics=shifted, supersample=1)
    assert depth_map[row, col] == pytest.approx(depth, rel=1e-5)

    with Image.open(dataset / (frame['file_path'] + '.png')) as stored:
      assert _differs(np.asarray(stored), bg)[row, col]


def test_bbox_holds_the_face(dataset):
  metas = _metas(dataset)
  for frame in _frames_in_time(dataset):
    meta = metas[frame['file_path'].split('/')[1]]
    c2w = np.array(frame['transform_matrix'])
    h_min, h_max, w_min, w_max = frame['bbox']
    for point in [synthetic.NOSE_TIP, *synthetic.EYE_CENTRES]:
      i, j, _ = _project(point, meta['intrinsics'], c2w, SIZE)
      assert h_min * SIZE < j < h_max * SIZE and w_min * SIZE < i < w_max * SIZE
    # A face, not the whole frame: the neck and background stay outside.
    assert (h_max - h_min) < 0.8 and (w_max - w_min) < 0.8


def test_background_is_exact_away_from_the_head(dataset):
  bg = synthetic.background(SIZE)
  traj = synthetic.trajectory(FRAMES, seed=0)
  metas = _metas(dataset)
  for frame in _frames_in_time(dataset)[::3]:
    meta = metas[frame['file_path'].split('/')[1]]
    _, depth = synthetic.render(
        np.array(frame['transform_matrix']), np.array(frame['expression']),
        SIZE, intrinsics=np.array(meta['intrinsics']),
        appearance=traj.appearance[_index(frame)])
    # Pixels more than one pixel away from any pixel whose centre ray hits.
    near = np.isfinite(depth)
    padded = np.pad(near, 2)
    for dj in range(-2, 3):
      for di in range(-2, 3):
        near = near | padded[2 + dj:2 + dj + SIZE, 2 + di:2 + di + SIZE]
    assert 0.2 < near.mean() < 0.8
    with Image.open(dataset / (frame['file_path'] + '.png')) as stored:
      stored = np.asarray(stored)
    np.testing.assert_array_equal(stored[~near], bg[~near])
    # And the head does show: its pixels mostly differ from the background.
    assert _differs(stored, bg)[np.isfinite(depth)].mean() > 0.95


def test_supersampling_averages_subpixel_rays():
  """A pixel is the mean of rays at offsets around its integer position."""
  size, supersample = 24, 2
  c2w, expression = _front_c2w(15.0, 5.0), _expression(JAW=0.7)
  intrinsics = synthetic.default_intrinsics(size)
  image, depth = synthetic.render(c2w, expression, size,
                                  supersample=supersample)
  offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
  singles = []
  for dj in offsets:
    for di in offsets:
      # A ray through (i + di, j + dj) is the ray through (i, j) of a camera
      # whose principal point moved by (-di, -dj) pixels.
      shifted = intrinsics.copy()
      shifted[2] -= di / size
      shifted[3] -= dj / size
      singles.append(synthetic.render(c2w, expression, size,
                                      intrinsics=shifted, supersample=1)[0])
  singles = np.stack(singles).astype(np.float64)
  # The single-ray images and the result were each rounded to integers.
  assert np.abs(image - singles.mean(axis=0)).max() <= 1.0
  # Not vacuous: along edges the sub-pixel rays see different things.
  assert np.sum(np.ptp(singles, axis=0).max(axis=-1) > 40) > size
  _, centre_depth = synthetic.render(c2w, expression, size, supersample=1)
  np.testing.assert_array_equal(depth, centre_depth)


# --- Expression and appearance -------------------------------------------------


def test_jaw_changes_the_silhouette():
  size = 96
  c2w = _front_c2w(10.0, -5.0)
  bg = synthetic.background(size)
  closed, closed_depth = synthetic.render(c2w, _expression(JAW=0.0), size)
  opened, opened_depth = synthetic.render(c2w, _expression(JAW=1.0), size)
  silhouette_change = _differs(closed, bg) != _differs(opened, bg)
  assert silhouette_change.sum() >= 20
  assert np.sum(np.isfinite(closed_depth) != np.isfinite(opened_depth)) >= 20
  # A dark mouth cavity appears below the nose.
  _, tip_row, _ = _project(synthetic.NOSE_TIP,
                           synthetic.default_intrinsics(size), c2w, size)
  below = np.arange(size)[:, None] > tip_row
  dark = lambda image: np.sum((image.max(axis=-1) < 70) & below)
  assert dark(opened) > dark(closed) + 10


@pytest.mark.parametrize('coefficient, eye', [('BLINK_L', 0), ('BLINK_R', 1)])
def test_blink_changes_its_eye_only(coefficient, eye):
  size = 96
  c2w = _front_c2w(-12.0, 6.0)
  intrinsics = synthetic.default_intrinsics(size)
  opened, _ = synthetic.render(c2w, _expression(), size)
  closed, _ = synthetic.render(c2w, _expression(**{coefficient: 1.0}), size)
  rows, cols = np.nonzero(_differs(opened, closed))
  assert rows.size >= 10
  i, j, depth = _project(synthetic.EYE_CENTRES[eye], intrinsics, c2w, size)
  # Everything that changed lies within the eyelid sphere's image (its
  # projected radius, widened for perspective and the pixel footprint).
  radius = 1.1 * synthetic.LID_RADIUS * abs(intrinsics[0]) / depth + 1.5
  assert np.max(np.hypot(cols - i, rows - j)) < radius


def test_brows_move_the_brows_only():
  size = 96
  c2w = _front_c2w(5.0, 0.0)
  low, _ = synthetic.render(c2w, _expression(BROWS=-1.0), size)
  high, _ = synthetic.render(c2w, _expression(BROWS=1.0), size)
  rows, _ = np.nonzero(_differs(low, high))
  assert rows.size >= 10
  # All changes are above the eyes (smaller row numbers).
  _, eye_row, _ = _project(synthetic.EYE_CENTRES[0],
                           synthetic.default_intrinsics(size), c2w, size)
  assert rows.max() < eye_row


def test_other_coefficients_change_nothing():
  rng = np.random.default_rng(0)
  c2w = _front_c2w(8.0, -3.0)
  expression = _expression(JAW=0.4, BLINK_L=0.3, BROWS=0.5)
  image, depth = synthetic.render(c2w, expression, SIZE)
  noisy = expression.copy()
  noisy[40] = 1.0
  noisy[4:] += rng.normal(size=synthetic.EXPR_DIM - 4)
  noisy_image, noisy_depth = synthetic.render(c2w, noisy, SIZE)
  np.testing.assert_array_equal(noisy_image, image)
  np.testing.assert_array_equal(noisy_depth, depth)


def test_appearance_changes_colour_not_geometry():
  c2w = _front_c2w(0.0, 0.0)
  bg = synthetic.background(SIZE)
  neutral, depth = synthetic.render(c2w, _expression(), SIZE)
  lit, lit_depth = synthetic.render(c2w, _expression(), SIZE,
                                    appearance=np.array([0.4, -0.2, 0.08]))
  np.testing.assert_array_equal(lit_depth, depth)
  head = np.isfinite(depth)
  assert _differs(neutral, lit)[head].mean() > 0.5
  np.testing.assert_array_equal(lit[~_differs(neutral, bg)],
                                bg[~_differs(neutral, bg)])


# --- The video ----------------------------------------------------------------


def test_trajectory_is_a_smooth_talking_head_video():
  traj = synthetic.trajectory(300, seed=0)
  chex.assert_shape(traj.c2w, (300, 4, 4))
  chex.assert_shape(traj.expressions, (300, synthetic.EXPR_DIM))
  chex.assert_shape(traj.appearance, (300, synthetic.APPEARANCE_DIM))
  # The camera, seen from the head: yaw within +-20 deg, pitch within +-10.
  position = traj.c2w[:, :3, 3]
  yaw = np.degrees(np.arctan2(position[:, 0], position[:, 2]))
  pitch = np.degrees(np.arcsin(position[:, 1] / np.linalg.norm(position,
                                                               axis=1)))
  assert np.abs(yaw).max() < 22.0 and np.ptp(yaw) > 15.0
  assert np.abs(pitch).max() < 13.0 and np.ptp(pitch) > 5.0
  assert np.mean(position[:, 2]) == pytest.approx(0.5, abs=0.03)
  # Video-like: consecutive frames differ a little.
  assert np.abs(np.diff(yaw)).max() < 2.0
  expr = traj.expressions
  assert 0.0 <= expr[:, synthetic.JAW].min() and (
      expr[:, synthetic.JAW].max() > 0.8)
  assert expr[:, synthetic.BLINK_L].max() == 1.0
  assert np.abs(expr[:, synthetic.BROWS]).max() <= 1.0
  # The tracker-like rest: small and temporally smooth.
  rest = expr[:, 4:]
  assert 0.01 < rest.std() < 0.1
  assert np.abs(np.diff(rest, axis=0)).mean() < 0.5 * rest.std()
  # The lighting drifts from frame to frame.
  assert np.all(np.abs(np.diff(traj.appearance, axis=0)).sum(axis=1) > 0)
  assert traj.appearance[:, 0].std() > 0.1


# --- Writing, caching and the command line ------------------------------------


def test_ensure_generates_once(tmp_path, monkeypatch):
  path = synthetic.ensure(tmp_path, size=16, frames=4, seed=2)
  assert path == tmp_path / f'synthetic_s16_f4_seed2_v{synthetic.VERSION}'
  assert (path / 'transforms_train.json').is_file()

  def fail(*args, **kwargs):
    raise AssertionError('ensure rewrote a complete dataset')

  monkeypatch.setattr(synthetic, 'write', fail)
  assert synthetic.ensure(tmp_path, size=16, frames=4, seed=2) == path


def test_ensure_accepts_a_folder_finished_by_another_process(tmp_path,
                                                              monkeypatch):
  real_write = synthetic.write

  def lose_the_race(path, size, frames, seed):
    real_write(path, size, frames, seed)  # The other process, first.
    raise FileExistsError(f'{path} exists and is not empty')

  monkeypatch.setattr(synthetic, 'write', lose_the_race)
  path = synthetic.ensure(tmp_path, size=16, frames=4, seed=0)
  assert (path / 'transforms_test.json').is_file()

  def fail_for_real(path, size, frames, seed):
    del path, size, frames, seed
    raise PermissionError('read-only cache')

  monkeypatch.setattr(synthetic, 'write', fail_for_real)
  with pytest.raises(PermissionError):
    synthetic.ensure(tmp_path, size=16, frames=4, seed=1)


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
  calls = []
  real_render = synthetic._render  # pylint: disable=protected-access

  def crash_later(*args):
    calls.append(1)
    if len(calls) == 3:
      raise RuntimeError('disk full')
    return real_render(*args)

  monkeypatch.setattr(synthetic, '_render', crash_later)
  with pytest.raises(RuntimeError):
    synthetic.write(tmp_path / 'person', size=16, frames=6)
  assert list(tmp_path.iterdir()) == []


def test_write_refuses_a_non_empty_folder(tmp_path):
  (tmp_path / 'person').mkdir()
  (tmp_path / 'person' / 'notes.txt').write_text('keep me')
  with pytest.raises(FileExistsError):
    synthetic.write(tmp_path / 'person', size=16, frames=4)
  assert (tmp_path / 'person' / 'notes.txt').read_text() == 'keep me'


def test_command_line(tmp_path, capsys):
  synthetic.main([str(tmp_path / 'cli'), '--size', '16', '--frames', '5',
                  '--seed', '4'])
  assert 'Wrote' in capsys.readouterr().out
  assert _files(tmp_path / 'cli') == _files(
      synthetic.write(tmp_path / 'api', size=16, frames=5, seed=4))
