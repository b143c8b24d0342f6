"""Tests of the NeRFace dataset loader on hand-written tiny datasets."""

import io
import json
import pathlib

import chex
import numpy as np
from PIL import Image
import pytest

from nerface_jax import data

H, W = 6, 8
INTRINSICS = [-12.0, 11.0, 0.4, 0.6]  # Signed fx, off-centre cx/cy.


def _rotation(seed):
  q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  # A rotation, not a reflection (which the loader refuses).
  return q * np.sign(np.linalg.det(q))


def _c2w(seed):
  m = np.eye(4)
  m[:3, :3] = _rotation(seed)
  m[:3, 3] = [0.01 * seed, -0.02, 0.5]
  return m


def _image(seed, h=H, w=W):
  return np.random.default_rng(100 + seed).integers(
      0, 256, (h, w, 3), dtype=np.uint8)


def _write_dataset(root: pathlib.Path, frames_per_split=None, expr_dim=5):
  """Writes a tiny dataset; returns {split: list of frame dicts} as written."""
  frames_per_split = frames_per_split or {'train': 2, 'val': 1, 'test': 1}
  (root / 'bg').mkdir(parents=True)
  Image.fromarray(_image(99)).save(root / data.BACKGROUND_FILE)
  written, index = {}, 0
  for split, count in frames_per_split.items():
    (root / split).mkdir()
    frames = []
    for _ in range(count):
      Image.fromarray(_image(index)).save(root / split / f'f_{index:04d}.png')
      frames.append({
          'file_path': f'./{split}/f_{index:04d}',
          'transform_matrix': _c2w(index).tolist(),
          'expression': [0.1 * index + k for k in range(expr_dim)],
          # Non-square and rows first: h from 0.1 to 0.9, w from 0.25 to 0.5.
          'bbox': [0.1, 0.9, 0.25, 0.5],
      })
      index += 1
    _dump(root, split, {'camera_angle_x': -0.7, 'intrinsics': INTRINSICS,
                        'frames': frames})
    written[split] = frames
  return written


def _dump(root, split, meta):
  with open(root / f'transforms_{split}.json', 'w') as f:
    json.dump(meta, f)


def _meta(root, split):
  with open(root / f'transforms_{split}.json') as f:
    return json.load(f)


def test_load_reproduces_the_written_values(tmp_path):
  written = _write_dataset(tmp_path)
  ds = data.load(tmp_path, 'train')
  chex.assert_shape(ds.images, (2, H, W, 3))
  assert ds.images.dtype == np.uint8 and ds.background.dtype == np.uint8
  np.testing.assert_array_equal(ds.images[1], _image(1))
  np.testing.assert_array_equal(ds.background, _image(99))
  chex.assert_trees_all_close(ds.intrinsics, np.float32(INTRINSICS))
  chex.assert_trees_all_close(
      ds.c2w, np.stack([_c2w(0), _c2w(1)]).astype(np.float32))
  chex.assert_trees_all_close(
      ds.expressions, np.float32([f['expression'] for f in written['train']]))
  chex.assert_trees_all_close(ds.bboxes[0], np.float32([0.1, 0.9, 0.25, 0.5]))
  assert ds.file_paths == ['./train/f_0000', './train/f_0001']
  assert (ds.height, ds.width, ds.expr_dim, ds.num_frames) == (H, W, 5, 2)


@pytest.mark.parametrize('shape,dtype', [((3, 5, 7, 3), np.uint8),
                                         ((11,), np.float32),
                                         ((2, 9), np.float64)])
def test_aligned_empty_is_aligned_and_writable(shape, dtype):
  # Several allocations: numpy's own alignment is only 16 bytes, so one
  # lucky buffer would not show the property.
  for _ in range(8):
    a = data.aligned_empty(shape, dtype)
    assert a.ctypes.data % 64 == 0
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
    a[...] = 1
    np.testing.assert_array_equal(a, np.ones(shape, dtype))


def test_loaded_images_are_aligned_for_zero_copy_placement(tmp_path):
  _write_dataset(tmp_path)
  for split in ('train', 'val', 'test'):
    assert data.load(tmp_path, split).images.ctypes.data % 64 == 0


def test_downscale_halves_size_and_focal_but_not_centre(tmp_path):
  _write_dataset(tmp_path)
  ds = data.load(tmp_path, 'test', downscale=2)
  chex.assert_shape(ds.images, (1, H // 2, W // 2, 3))
  chex.assert_shape(ds.background, (H // 2, W // 2, 3))
  chex.assert_trees_all_close(ds.intrinsics, np.float32([-6.0, 5.5, 0.4, 0.6]))
  # Box filtering: each output pixel is the mean of its 2x2 block.
  full = _image(3).astype(np.float64)
  expected = full.reshape(H // 2, 2, W // 2, 2, 3).mean(axis=(1, 3))
  np.testing.assert_allclose(ds.images[0], expected, atol=1.0)


def test_camera_angle_without_intrinsics_keeps_its_sign(tmp_path):
  _write_dataset(tmp_path)
  meta = _meta(tmp_path, 'val')
  del meta['intrinsics']
  _dump(tmp_path, 'val', meta)
  ds = data.load(tmp_path, 'val')
  focal = 0.5 * W / np.tan(0.5 * -0.7)
  chex.assert_trees_all_close(
      ds.intrinsics, np.float32([focal, focal, 0.5, 0.5]), rtol=1e-6)


def test_missing_bbox_means_whole_image(tmp_path):
  _write_dataset(tmp_path)
  meta = _meta(tmp_path, 'val')
  del meta['frames'][0]['bbox']
  _dump(tmp_path, 'val', meta)
  chex.assert_trees_all_close(data.load(tmp_path, 'val').bboxes,
                              np.float32([[0, 1, 0, 1]]))


@pytest.mark.parametrize('mode', ['RGBA', 'L', 'LA', 'P'])
def test_alpha_grey_and_palette_images_are_converted(tmp_path, mode):
  _write_dataset(tmp_path)
  rgb = Image.fromarray(_image(3))
  rgb.convert(mode).save(tmp_path / 'test' / 'f_0003.png')
  ds = data.load(tmp_path, 'test')
  chex.assert_shape(ds.images, (1, H, W, 3))
  np.testing.assert_array_equal(
      ds.images[0], np.asarray(rgb.convert(mode).convert('RGB')))


def test_splits_agree_and_prefix_is_in_time(tmp_path):
  _write_dataset(tmp_path, {'train': 4, 'val': 1, 'test': 1})
  splits = data.load_splits(tmp_path)
  assert list(splits) == ['train', 'val', 'test']
  first_half = splits['train'].prefix(0.5)
  assert first_half.file_paths == ['./train/f_0000', './train/f_0001']
  np.testing.assert_array_equal(first_half.images, splits['train'].images[:2])


def _set(split, frame, key, value):
  def mutate(root):
    meta = _meta(root, split)
    meta['frames'][frame][key] = value
    _dump(root, split, meta)
  return mutate


def _scaled_rotation(root):
  m = _c2w(1)
  m[:3, :3] *= 1.5
  _set('train', 1, 'transform_matrix', m.tolist())(root)


def _write_bytes(relative, payload):
  def mutate(root):
    (root / relative).write_bytes(payload)
  return mutate


def _remove(relative):
  def mutate(root):
    (root / relative).unlink()
  return mutate


def _resize_image(relative):
  def mutate(root):
    Image.fromarray(_image(0, H + 2, W)).save(root / relative)
  return mutate


def _empty_split(root):
  _dump(root, 'val', {'intrinsics': INTRINSICS, 'frames': []})


def _no_frames_key(root):
  _dump(root, 'val', {'intrinsics': INTRINSICS})


# (case id, mutation, split loaded (None: all via load_splits), message parts)
BAD_INPUTS = [
    ('missing_json', _remove('transforms_val.json'), 'val',
     ['transforms_val.json', 'not found']),
    ('malformed_json', _write_bytes('transforms_val.json', b'{"frames": ['),
     'val', ['transforms_val.json', 'JSON']),
    ('missing_image', _remove('train/f_0001.png'), 'train',
     ['transforms_train.json', 'frame 1', 'f_0001', 'not found']),
    ('corrupt_image', _write_bytes('train/f_0001.png', b'not a png'), 'train',
     ['transforms_train.json', 'frame 1', 'cannot read image']),
    ('missing_background', _remove('bg/00050.png'), 'train',
     ['00050.png', 'background']),
    ('image_size_disagrees', _resize_image('train/f_0001.png'), 'train',
     ['frame 1', 'f_0001', 'one size']),
    ('background_size_disagrees', _resize_image('bg/00050.png'), 'train',
     ['00050.png', 'background']),
    ('matrix_not_4x4', _set('train', 1, 'transform_matrix',
                            np.eye(4)[:3].tolist()), 'train',
     ['frame 1', 'f_0001', 'shape (4, 4)']),
    ('rotation_not_orthonormal', _scaled_rotation, 'train',
     ['frame 1', 'f_0001', 'orthonormal']),
    # A column-major export: every camera would sit at the origin.
    ('matrix_transposed', _set('train', 1, 'transform_matrix',
                               _c2w(1).T.tolist()), 'train',
     ['frame 1', 'f_0001', 'last row', 'transposed']),
    ('matrix_reflection', _set('train', 1, 'transform_matrix',
                               (_c2w(1) @ np.diag([1, 1, -1, 1])).tolist()),
     'train', ['frame 1', 'f_0001', 'reflection']),
    ('matrix_bottom_row', _set('train', 0, 'transform_matrix', (
        _c2w(0) + np.diag([0, 0, 0, 1.0])).tolist()), 'train',
     ['frame 0', 'last row', '[0, 0, 0, 1]']),
    ('principal_point_in_pixels', lambda root: _dump(root, 'val', {
        **_meta(root, 'val'), 'intrinsics': [-10.0, 10.0, 8.0, 8.0]}),
     'val', ['transforms_val.json', 'cx=8.0', 'fractions']),
    ('focal_in_image_widths', lambda root: _dump(root, 'val', {
        **_meta(root, 'val'), 'intrinsics': [-0.9, 0.9, 0.5, 0.5]}),
     'val', ['transforms_val.json', 'fx=-0.9', 'pixels']),
    ('expression_length_between_frames', _set('train', 1, 'expression',
                                              [0.0] * 4), 'train',
     ['frame 1', 'f_0001', '4 values', 'frame 0']),
    ('expression_length_between_splits', _set('test', 0, 'expression',
                                              [0.0] * 7), None,
     ['transforms_test.json', 'frame 0', '7 values', 'train split']),
    ('nan_expression', _set('train', 1, 'expression',
                            [0.0, float('nan'), 0.0, 0.0, 0.0]), 'train',
     ['frame 1', 'NaN']),
    ('inf_transform', _set('train', 0, 'transform_matrix',
                           [[float('inf')] * 4] * 4), 'train',
     ['frame 0', 'NaN or inf']),
    ('missing_expression', _set('val', 0, 'expression', None), 'val',
     ['frame 0', '"expression"']),
    ('bbox_outside', _set('train', 1, 'bbox', [0.1, 1.2, 0.0, 1.0]), 'train',
     ['frame 1', 'outside [0, 1]']),
    ('bbox_inverted', _set('train', 0, 'bbox', [0.8, 0.2, 0.0, 1.0]), 'train',
     ['frame 0', 'inverted']),
    ('empty_split', _empty_split, 'val', ['transforms_val.json', 'no frames']),
    ('no_frames_key', _no_frames_key, 'val', ['transforms_val.json',
                                              '"frames"']),
    ('nan_intrinsics', lambda root: _dump(root, 'val', {
        **_meta(root, 'val'), 'intrinsics': [float('nan'), 1, 0.5, 0.5]}),
     'val', ['transforms_val.json', 'intrinsics']),
]


@pytest.mark.parametrize('case,mutate,split,parts', BAD_INPUTS,
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_names_file_and_frame(tmp_path, case, mutate, split, parts):
  del case
  _write_dataset(tmp_path)
  mutate(tmp_path)
  with pytest.raises(data.DatasetError) as info:
    if split is None:
      data.load_splits(tmp_path)
    else:
      data.load(tmp_path, split)
  message = str(info.value)
  for part in parts:
    assert part in message, f'{part!r} not in {message!r}'


def test_missing_folder_and_bad_downscale(tmp_path):
  with pytest.raises(data.DatasetError, match='folder not found'):
    data.load(tmp_path / 'nope', 'train')
  _write_dataset(tmp_path)
  with pytest.raises(data.DatasetError, match='downscale'):
    data.load(tmp_path, 'train', downscale=0)


def test_background_optional_when_not_requested(tmp_path):
  _write_dataset(tmp_path)
  (tmp_path / data.BACKGROUND_FILE).unlink()
  assert data.load(tmp_path, 'train', background=False).background is None


# --- index_map.npy -----------------------------------------------------------

# The tiny dataset of `_write_dataset` with 3 train frames: video frames 0, 1
# and 3 train (rows 0..2 of transforms_train.json), 2 val, 4 test; the video
# had a skipped frame 5, which is not a row.
GOOD_MAP = [[0, 0], [1, 1], [2, -1], [3, 2], [4, -1], [6, -1]]


def _write_map(root, index_map, dtype=np.int64):
  np.save(root / data.INDEX_MAP_FILE, np.asarray(index_map, dtype))


def test_make_index_map():
  np.testing.assert_array_equal(
      data.make_index_map([0, 1, 2, 3, 4, 6], [0, 1, 3]), GOOD_MAP)
  assert data.make_index_map([0, 1, 2, 3, 4, 6], [0, 1, 3]).dtype == np.int64
  with pytest.raises(ValueError):
    data.make_index_map([0, 1], [0, 0])
  with pytest.raises(ValueError):
    data.make_index_map([0, 1], [2])


@pytest.mark.parametrize('dtype', [np.int64, np.int32, np.uint16, np.float64])
def test_valid_index_map_is_read_and_accepted(tmp_path, dtype):
  _write_dataset(tmp_path, {'train': 3, 'val': 1, 'test': 1})
  assert data.read_index_map(tmp_path) is None  # Optional.
  # Column 1 is -1 outside the train split; unsigned types have no -1.
  index_map = GOOD_MAP if dtype != np.uint16 else [[0, 0], [2, 1], [3, 2]]
  _write_map(tmp_path, index_map, dtype)
  read = data.read_index_map(tmp_path)
  assert read.dtype == np.int64
  np.testing.assert_array_equal(read, index_map)
  np.testing.assert_array_equal(data.read_index_map(tmp_path, num_train=3),
                                index_map)
  assert data.load_splits(tmp_path)['train'].num_frames == 3


def _bad(index_map, dtype=np.int64):
  return lambda root: _write_map(root, index_map, dtype)


def _bad_bytes(payload):
  return lambda root: (root / data.INDEX_MAP_FILE).write_bytes(payload)


def _npy_bytes(index_map):
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(index_map, np.int64))
  return buffer.getvalue()


def _object_array(root):
  array = np.empty((2, 2), object)
  array[:] = 1
  np.save(root / data.INDEX_MAP_FILE, array, allow_pickle=True)


# (case id, mutation, message parts); the dataset has 3 train frames.
BAD_MAPS = [
    ('not_npy', _bad_bytes(b'not an array'), ['not a .npy file']),
    ('truncated', lambda root: (root / data.INDEX_MAP_FILE).write_bytes(
        _npy_bytes(GOOD_MAP)[:-8]), ['not a readable .npy']),
    ('pickled_objects', _object_array, ['not a readable .npy']),
    ('one_column', _bad([0, 1, 2]), ['N x 2', 'shape (3,)']),
    ('three_columns', _bad([[0, 0, 0]]), ['N x 2', 'shape (1, 3)']),
    ('bool', _bad([[1, 1]], bool), ['integer array', 'bool']),
    ('fractional', _bad([[0, 0], [1, 1.5], [2, 2]], np.float64),
     ['row 1', 'not an integer']),
    ('nan', _bad([[0, 0], [1, 1], [float('nan'), 2]], np.float64),
     ['row 2', 'not an integer']),
    ('negative_frame', _bad([[-1, 0], [1, 1], [2, 2]]),
     ['row 0', 'negative video frame']),
    ('not_in_time_order', _bad([[0, 0], [2, 1], [2, 2]]),
     ['row 2', '[2, 2]', 'time order']),
    ('train_index_too_large', _bad([[0, 0], [1, 1], [2, 3]]),
     ['row 2', '[2, 3]', '[-1, 3)', '3 frames']),
    ('train_index_below_minus_one', _bad([[0, 0], [1, -2], [2, 1], [3, 2]]),
     ['row 1', '[-1, 3)']),
    ('train_index_twice', _bad([[0, 0], [1, 1], [2, 1], [3, 2]]),
     ['row 2', 'train index 1', 'already used by row 1']),
    ('train_frame_missing', _bad([[0, 0], [1, -1], [2, 2]]),
     ['names 2 train frames', 'has 3', 'train index 1']),
    ('empty', _bad(np.zeros((0, 2))), ['names 0 train frames']),
]


@pytest.mark.parametrize('case,mutate,parts', BAD_MAPS,
                         ids=[case[0] for case in BAD_MAPS])
def test_malformed_index_map_is_refused_naming_file_and_row(
    tmp_path, case, mutate, parts):
  del case
  _write_dataset(tmp_path, {'train': 3, 'val': 1, 'test': 1})
  mutate(tmp_path)
  for read in (data.read_index_map, data.load_splits):
    with pytest.raises(data.DatasetError) as info:
      read(tmp_path)
    message = str(info.value)
    assert str(tmp_path / 'index_map.npy') in message, message
    for part in parts:
      assert part in message, f'{part!r} not in {message!r}'


def test_index_map_is_checked_before_images_are_decoded(tmp_path,
                                                         monkeypatch):
  _write_dataset(tmp_path, {'train': 3, 'val': 1, 'test': 1})
  _write_map(tmp_path, [[0, 0], [1, 1]])

  def no_decoding(*args):
    raise AssertionError('decoded an image before checking the index map')

  monkeypatch.setattr(data, '_read_image', no_decoding)
  with pytest.raises(data.DatasetError, match='names 2 train frames'):
    data.load_splits(tmp_path)
