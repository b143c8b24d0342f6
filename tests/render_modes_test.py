"""Tests of what render.py runs: split scoring, sequences, outputs, errors."""

import json
import pathlib

import numpy as np
from PIL import Image
import pytest

from conftest import tiny_config
from nerface_jax import avatar as avatar_lib
from nerface_jax import camera
from nerface_jax import errors
from nerface_jax import render_modes
from nerface_jax import synthetic
from nerface_jax import train_lib


def _files(folder: pathlib.Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob('*')) if p.is_file()}


def test_split_render_names_metrics_and_determinism(trained_avatar, tmp_path):
  avatar = trained_avatar
  report = render_modes.render_split(avatar, tmp_path / 'a', 'test')
  dataset = avatar_lib.load_dataset(avatar, 'test')
  names = [pathlib.PurePosixPath(p).name for p in dataset.file_paths]
  for sub in ('', 'depth/', 'normals/'):
    assert sorted(p.name for p in (tmp_path / 'a' / sub).glob('*.png')) == (
        sorted(f'{n}.png' for n in names))
  saved = json.loads((tmp_path / 'a' / 'metrics.json').read_text())
  assert saved == json.loads(json.dumps(report))
  assert saved['latent'] == avatar.config.eval.latent
  assert [row['frame'] for row in saved['frames']] == names
  for key in ('psnr', 'ssim', 'l1', 'psnr_bbox', 'l1_bbox'):
    values = [row[key] for row in saved['frames']]
    assert saved['mean'][key] == pytest.approx(np.mean(values))
  assert saved['mean']['psnr'] > 20.0  # A trained face, not noise.
  assert saved['video'] == 'video.mp4'
  assert (tmp_path / 'a' / saved['video']).stat().st_size > 0
  # The scores are those of the PNGs written: rescoring the files agrees.
  from nerface_jax import metrics  # pylint: disable=g-import-not-at-top
  first = np.asarray(Image.open(tmp_path / 'a' / f'{names[0]}.png'))
  assert metrics.psnr(first, dataset.images[0]) == pytest.approx(
      saved['frames'][0]['psnr'], abs=1e-4)
  render_modes.render_split(avatar, tmp_path / 'b', 'test')
  a, b = _files(tmp_path / 'a'), _files(tmp_path / 'b')
  assert a.keys() == b.keys()
  for name in a:
    if name.endswith('.png') or name == 'metrics.json':
      assert a[name] == b[name], name


def test_train_split_uses_and_reports_the_trained_codes(trained_avatar,
                                                        tmp_path):
  report = render_modes.render_split(trained_avatar, tmp_path / 't', 'train',
                                     latent='optimize')
  # Fitting codes was asked for, but training frames have their own.
  assert report['latent'] == 'trained'
  assert 'without_optimize' not in report
  mean = render_modes.render_split(trained_avatar, tmp_path / 'm', 'train',
                                   data_dir=str(trained_avatar.meta[
                                       'data_dir']), latent='mean')
  assert mean['latent'] == 'trained'
  assert mean['mean']['psnr'] == pytest.approx(report['mean']['psnr'])


def test_sequences_write_rgb_depth_normals_and_video(trained_avatar, tmp_path):
  video = render_modes.render_orbit(trained_avatar, tmp_path, frame=1, num=3)
  assert video.name == 'orbit.mp4' and video.stat().st_size > 0
  names = [f'orbit_{n:04d}.png' for n in range(3)]
  for sub in ('', 'depth', 'normals'):
    assert sorted(p.name for p in (tmp_path / sub).glob('*.png')) == names
  frames = [np.asarray(Image.open(tmp_path / n)) for n in names]
  # The orbit moves the camera: consecutive frames differ.
  assert np.abs(frames[0].astype(int) - frames[1]).mean() > 0.5


def test_jaw_sweep_changes_the_mouth_more_than_the_forehead(trained_avatar,
                                                            tmp_path):
  avatar = trained_avatar
  render_modes.render_expression(avatar, tmp_path, [synthetic.JAW], 0.0, 1.0,
                                 2, split='train', frame=0)
  closed, opened = (np.asarray(
      Image.open(tmp_path / f'expression_{n:04d}.png'), np.float64)
                    for n in range(2))
  dataset = avatar_lib.load_dataset(avatar, 'train')
  size = dataset.height
  project = lambda p: camera.project_np(
      np.asarray(p, np.float64), dataset.intrinsics, dataset.c2w[0], size,
      size)[0]
  nose_col, nose_row = project(synthetic.NOSE_TIP)
  eye_row = min(project(e)[1] for e in synthetic.EYE_CENTRES)
  col = int(round(nose_col))
  diff = np.abs(opened - closed).mean(-1)
  mouth = diff[int(nose_row) + 1:min(size, int(nose_row) + 6),
               max(0, col - 3):col + 4].mean()
  forehead = diff[max(0, int(eye_row) - 6):max(1, int(eye_row) - 1),
                  max(0, col - 3):col + 4].mean()
  assert mouth > 2 * forehead + 1.0, (mouth, forehead)


def test_errors_are_clear(trained_avatar, tmp_path):
  avatar = trained_avatar
  with pytest.raises(errors.RenderError, match='no checkpoint'):
    (tmp_path / 'empty_work').mkdir()
    avatar_lib.load(tmp_path / 'empty_work')
  with pytest.raises(errors.RenderError, match='outside the expression'):
    render_modes.render_expression(avatar, tmp_path / 'sweep', [76])
  with pytest.raises(errors.RenderError, match='outside the train split'):
    render_modes.render_orbit(avatar, tmp_path / 'orbit', frame=10_000)
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'notes.txt').write_text('mine')
  with pytest.raises(errors.RenderError, match='did not write'):
    render_modes.render_split(avatar, busy, 'test')
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
  with pytest.raises(errors.RenderError, match='52 values'):
    render_modes.render_split(avatar, tmp_path / 'o', 'test', str(other))
  with pytest.raises(errors.RenderError, match='--driving'):
    render_modes.render_reenact(avatar, tmp_path / 'r', str(other))
  small = synthetic.write(tmp_path / 'small', size=16, frames=12, seed=5)
  with pytest.raises(errors.RenderError, match='16x16'):
    render_modes.render_split(avatar, tmp_path / 's', 'test', str(small))


@pytest.fixture(scope='module')
def partial_avatar(tmp_path_factory):
  """An avatar trained on the first half of its training frames."""
  root = tmp_path_factory.mktemp('partial')
  config = tiny_config(root / 'cache', **{'data.train_fraction': 0.5})
  train_lib.train_and_evaluate(config, str(root / 'work'))
  return avatar_lib.load(root / 'work')


def test_frames_past_the_trained_prefix_render_with_the_shared_code(
    partial_avatar, tmp_path):
  avatar = partial_avatar
  train = avatar_lib.load_dataset(avatar, 'train')
  rows = avatar.num_train_frames
  assert rows < train.num_frames
  report = render_modes.render_split(avatar, tmp_path / 'split', 'train')
  assert len(report['frames']) == train.num_frames
  assert report['latent'] == f'trained+{avatar.config.eval.latent}'
  codes, _ = avatar.split_codes(train, None, trained=True)
  gamma = np.asarray(avatar.host_params['latent']['gamma'])
  np.testing.assert_array_equal(codes[:rows], gamma)
  np.testing.assert_allclose(codes[rows:], np.tile(gamma.mean(0), (
      train.num_frames - rows, 1)), rtol=1e-6)
  past = train.num_frames - 1
  render_modes.render_orbit(avatar, tmp_path / 'orbit', frame=past, num=2)
  render_modes.render_expression(avatar, tmp_path / 'expr', [0], num=2,
                                 frame=past)
  np.testing.assert_allclose(avatar.frame_code('train', past),
                             gamma.mean(0), rtol=1e-6)
  np.testing.assert_array_equal(avatar.frame_code('train', 1), gamma[1])
