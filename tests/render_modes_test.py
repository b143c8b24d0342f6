"""Tests of rendering a trained avatar: split scoring, paths, edits, errors."""

import json
import math
import pathlib
import sys

import chex
import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from nerface_jax import render_lib
from nerface_jax import synthetic
from nerface_jax import train_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'configs'))
import person  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A small avatar of the built-in person, trained enough to have a face."""
  root = tmp_path_factory.mktemp('render')
  config = person.get_config('tiny')
  config.data.cache_dir = str(root / 'cache')
  config.data.synthetic_size = 24
  config.data.synthetic_frames = 40
  for key, value in {
      'train.max_steps': 400, 'train.lr': 5e-3, 'train.lr_decay_steps': 400,
      'train.batch_rays': 512, 'train.log_every': 100,
      'train.eval_every': 400, 'train.checkpoint_every': 400,
      'model.trunk_width': 64, 'model.xyz_freqs': 6, 'model.color_width': 16,
      'render.num_coarse': 16, 'render.num_fine': 16}.items():
    section, name = key.split('.')
    config[section][name] = value
  train_lib.train_and_evaluate(config, str(root / 'work'))
  return root / 'work'


@pytest.fixture(scope='module')
def avatar(workdir):
  return render_lib.load_avatar(workdir)


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def test_split_render_names_metrics_and_determinism(avatar, tmp_path):
  report = render_lib.render_split(avatar, tmp_path / 'a', 'test')
  dataset = render_lib.load_dataset(avatar, 'test')
  names = [pathlib.PurePosixPath(p).name for p in dataset.file_paths]
  for sub in ('', 'depth/', 'normals/'):
    assert sorted(p.name for p in (tmp_path / 'a' / sub).glob('*.png')) == (
        sorted(f'{n}.png' for n in names))
  saved = json.loads((tmp_path / 'a' / 'metrics.json').read_text())
  assert saved == json.loads(json.dumps(report))
  assert [row['frame'] for row in saved['frames']] == names
  for key in ('psnr', 'ssim', 'l1', 'psnr_bbox', 'l1_bbox'):
    values = [row[key] for row in saved['frames']]
    assert saved['mean'][key] == pytest.approx(np.mean(values))
  assert saved['mean']['psnr'] > 20.0  # A trained face, not noise.
  assert (tmp_path / 'a' / saved['video']).stat().st_size > 0
  render_lib.render_split(avatar, tmp_path / 'b', 'test')
  a, b = _files(tmp_path / 'a'), _files(tmp_path / 'b')
  assert a.keys() == b.keys()
  for name in a:
    if name.endswith('.png') or name == 'metrics.json':
      assert a[name] == b[name], name


def test_padding_over_four_devices_equals_one_device(avatar):
  dataset = render_lib.load_dataset(avatar, 'val')
  inputs = render_lib.frame_inputs(dataset, 0, avatar.latent('mean'))
  out = {}
  for count in (1, 4):
    mesh = Mesh(np.asarray(jax.devices()[:count]), ('data',))
    chunk_fn = render_lib.make_render_chunk(avatar.model, mesh)
    from nerface_jax import parallel  # pylint: disable=g-import-not-at-top
    params = parallel.replicate(avatar.host_params, mesh)
    # 24 * 24 = 576 pixels in chunks of 100: the last chunk is padded.
    out[count] = render_lib.render_frame(chunk_fn, params, inputs,
                                         dataset.height, dataset.width, 100,
                                         mesh)
  chex.assert_trees_all_close(out[1], out[4], atol=1e-5)
  chex.assert_shape(out[4]['rgb'], (dataset.height, dataset.width, 3))


def test_jaw_sweep_changes_the_mouth_more_than_the_forehead(avatar, tmp_path):
  render_lib.render_expression(avatar, tmp_path, [synthetic.JAW], 0.0, 1.0, 2,
                               split='train', frame=0)
  closed, opened = (np.asarray(
      __import__('PIL.Image').Image.open(tmp_path / f'expression_{n:04d}.png'),
      np.float64) for n in range(2))
  dataset = render_lib.load_dataset(avatar, 'train')
  size = dataset.height
  # Project the nose tip and the eyes to find the mouth and forehead rows.
  rays_to = lambda p: _project(p, dataset.c2w[0], dataset.intrinsics, size)
  nose_col, nose_row = rays_to(np.asarray(synthetic.NOSE_TIP))
  eye_row = min(rays_to(np.asarray(e))[1] for e in synthetic.EYE_CENTRES)
  col = int(round(nose_col))
  diff = np.abs(opened - closed).mean(-1)
  mouth = diff[int(nose_row) + 1:min(size, int(nose_row) + 6),
               max(0, col - 3):col + 4].mean()
  forehead = diff[max(0, int(eye_row) - 6):max(1, int(eye_row) - 1),
                  max(0, col - 3):col + 4].mean()
  print("mouth", mouth, "forehead", forehead)
  assert mouth > 2 * forehead + 1.0, (mouth, forehead)


def _project(point, c2w, intrinsics, size):
  fx, fy, cx, cy = intrinsics
  cam = np.linalg.inv(c2w) @ np.append(point, 1.0)
  depth = -cam[2]
  return (size * cx + fx * cam[0] / depth, size * cy - fy * cam[1] / depth)


def test_optimizing_the_code_fits_the_frame(avatar):
  dataset = render_lib.load_dataset(avatar, 'val')
  fit = render_lib.make_latent_fitter(avatar)
  device_data = jax.device_put(jax.tree.map(np.asarray, __import__(
      'nerface_jax.sampler').sampler.prepare(
          dataset.images, dataset.c2w, dataset.expressions, dataset.bboxes,
          dataset.background, dataset.intrinsics, 0.9)))
  init = np.tile(avatar.latent('mean'), (2, 1))
  codes, trace = fit(device_data, np.int32([0, 0]), init, jax.random.PRNGKey(0))
  chex.assert_shape(codes, init.shape)
  trace = np.asarray(trace)
  assert trace[-3:].mean() < trace[:3].mean()


def test_reenacting_with_own_data_reproduces_expressions_and_rotations():
  rng = np.random.default_rng(0)
  traj = synthetic.trajectory(20, seed=3)
  c2w, expressions = traj.c2w, traj.expressions
  centre = render_lib.head_centre(c2w)
  front = render_lib.frontal_index(c2w, centre)
  neutral = render_lib.neutral_index(expressions, None)
  out_expr, out_c2w = render_lib.reenactment(
      expressions[neutral], c2w[front], centre, expressions,
      expressions[neutral], c2w, c2w[front])
  chex.assert_trees_all_close(out_expr, expressions.astype(np.float32),
                              atol=1e-6)
  chex.assert_trees_all_close(out_c2w[:, :3, :3],
                              c2w[:, :3, :3].astype(np.float32), atol=1e-5)
  # A driver with an offset neutral moves the target by the difference only.
  shift = rng.normal(size=expressions.shape[1])
  out_expr, _ = render_lib.reenactment(
      expressions[neutral], c2w[front], centre, expressions + shift,
      expressions[neutral] + shift, c2w, c2w[front])
  chex.assert_trees_all_close(out_expr, expressions.astype(np.float32),
                              atol=1e-5)


def test_head_centre_and_orbit_keep_looking_at_the_head():
  traj = synthetic.trajectory(30, seed=1)
  centre = render_lib.head_centre(traj.c2w)
  # The synthetic head sits at the origin; the cameras look at about it.
  assert np.linalg.norm(centre) < 0.03
  poses = render_lib.orbit_poses(traj.c2w[0], centre, 16)
  chex.assert_trees_all_close(poses[0], traj.c2w[0].astype(np.float32),
                              atol=1e-6)
  for pose in poses:
    # Rigid, and the optical axis misses the centre by no more than before.
    chex.assert_trees_all_close(pose[:3, :3].T @ pose[:3, :3], np.eye(3),
                                atol=1e-5)
    axis = -pose[:3, 2] / np.linalg.norm(pose[:3, 2])
    offset = centre - pose[:3, 3]
    miss = np.linalg.norm(offset - axis * (offset @ axis))
    first_axis = -traj.c2w[0][:3, 2]
    first_offset = centre - traj.c2w[0][:3, 3]
    first_miss = np.linalg.norm(first_offset - first_axis *
                                (first_offset @ first_axis))
    assert miss == pytest.approx(first_miss, abs=1e-5)
  yaw = [math.degrees(math.atan2(p[0, 2], p[2, 2])) for p in poses]
  assert max(yaw) - min(yaw) > 30


def test_normals_of_a_plane_facing_the_camera_point_at_it():
  depth = np.full((8, 10), 0.5)
  image = render_lib.normals_image(depth, np.ones((8, 10)),
                                   np.float32([-12, 12, 0.5, 0.5]))
  np.testing.assert_allclose(image[2:-2, 2:-2].reshape(-1, 3).mean(0),
                             [128, 128, 255], atol=2)
  empty = render_lib.normals_image(depth, np.zeros((8, 10)),
                                   np.float32([-12, 12, 0.5, 0.5]))
  assert empty.max() == 0


def test_errors_are_clear(avatar, workdir, tmp_path):
  with pytest.raises(render_lib.RenderError, match='no checkpoint'):
    (tmp_path / 'empty_work').mkdir()
    render_lib.load_avatar(tmp_path / 'empty_work')
  with pytest.raises(render_lib.RenderError, match='outside the expression'):
    render_lib.render_expression(avatar, tmp_path / 'sweep', [76])
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'notes.txt').write_text('mine')
  with pytest.raises(render_lib.RenderError, match='did not write'):
    render_lib.render_split(avatar, busy, 'test')
  assert (busy / 'notes.txt').read_text() == 'mine'
  assert sorted(p.name for p in busy.iterdir()) == ['notes.txt']
  # Another dataset with a different expression length.
  other = synthetic.write(tmp_path / 'other', size=24, frames=12, seed=5)
  for split in ('train', 'val', 'test'):
    path = other / f'transforms_{split}.json'
    meta = json.loads(path.read_text())
    for frame in meta['frames']:
      frame['expression'] = frame['expression'][:52]
    path.write_text(json.dumps(meta))
  with pytest.raises(render_lib.RenderError, match='52 values'):
    render_lib.render_split(avatar, tmp_path / 'o', 'test', str(other))
  with pytest.raises(render_lib.RenderError, match='--driving'):
    render_lib.render_reenact(avatar, tmp_path / 'r', str(other))
  small = synthetic.write(tmp_path / 'small', size=16, frames=12, seed=5)
  with pytest.raises(render_lib.RenderError, match='16x16'):
    render_lib.render_split(avatar, tmp_path / 's', 'test', str(small))
