"""End-to-end tests of the video preprocessor on real fixture clips.

Skipped when MediaPipe / OpenCV are not installed or when ../shared/fixtures
is absent. Every conversion uses a 40-frame slice at a small output size; the
clean conversion is shared by the tests of one module.

The checks are made from the outside: the written dataset is read by the
project's loader, rays come from the training code's `camera.generate_rays`,
and landmark pixels are mapped into the crop here, by hand.
"""

import json
import pathlib
import subprocess
import sys
import zipfile

import chex
import numpy as np
from PIL import Image
import pytest

cv2 = pytest.importorskip('cv2')
pytest.importorskip('mediapipe')

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

from nerface_jax import camera  # pylint: disable=g-import-not-at-top
from nerface_jax import data  # pylint: disable=g-import-not-at-top
from nerface_jax import preprocess  # pylint: disable=g-import-not-at-top
from nerface_jax.preprocess import tracking  # pylint: disable=g-import-not-at-top
from nerface_jax.preprocess import video  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / 'shared' / 'fixtures'
MODEL = FIXTURES / 'face_landmarker.task'
CLIP = FIXTURES / 'videos' / 'hdtf_WDA_KatieHill_000.mp4'
FRAMES = 40
SIZE = 64
BLACK = (5, 6, 21)  # Frames cut to black in the skipped-frames test.
# Landmarks on bone (nose bridge, eye corners): expressions barely move them,
# so the neutral canonical mesh is a fair reference for them.
RIGID_LANDMARKS = (6, 168, 33, 133, 263, 362)

if not (MODEL.is_file() and CLIP.is_file()):
  pytest.skip(f'fixtures not found under {FIXTURES}', allow_module_level=True)


def _options(**changes) -> 'preprocess.Options':
  fields = dict(size=SIZE, tracker_model=str(MODEL), max_frames=FRAMES,
                debug_frames=2)
  fields.update(changes)
  return preprocess.Options(**fields)


def _quiet(line: str):
  del line


@pytest.fixture(scope='module')
def frames() -> np.ndarray:
  """uint8 [FRAMES, H, W, 3]: the slice, decoded once."""
  return np.stack([f for _, f in video.open_video(CLIP).frames(FRAMES)])


@pytest.fixture(scope='module')
def tracks(frames) -> tracking.Tracks:
  """Tracker output for the slice, as the test's reference."""
  return tracking.track(enumerate(frames), MODEL, 25.0, frames.shape[1],
                        frames.shape[2])


@pytest.fixture(scope='module')
def dataset(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp('pre') / 'katie'
  preprocess.preprocess(CLIP, out, _options(), log=_quiet)
  return out


def _report(root: pathlib.Path) -> dict:
  return json.loads((root / 'preprocess_report.json').read_text())


def _frame_index(file_path: str) -> int:
  return int(file_path.rsplit('_', 1)[1])


def _crop_pixels(landmarks: np.ndarray, report: dict) -> np.ndarray:
  """Normalised landmarks [L, 2+] -> written-image pixels, by hand."""
  height, width = report['frame_size']
  crop, size = report['crop'], report['size']
  k = size / crop['side']
  # Corner coordinates of the frame -> pixel-centre coordinates of the crop.
  return np.stack([k * (landmarks[:, 0] * width - crop['x0']) - 0.5,
                   k * (landmarks[:, 1] * height - crop['y0']) - 0.5], -1)


def _distances_mm(root: pathlib.Path, tracks: tracking.Tracks,
                  principal_shift: float = 0.0) -> np.ndarray:
  """[frames, 468] distance in mm from each landmark's back-projected ray to
  its canonical mesh vertex, placed in the world by the written scale."""
  report = _report(root)
  vertices, _ = tracking.canonical_mesh(MODEL)
  scale = report['units_per_cm']
  world = vertices * scale
  distances = []
  for split, ds in data.load_splits(root).items():
    del split
    intrinsics = np.array(ds.intrinsics, np.float64)
    intrinsics[2] += principal_shift / ds.width
    for k, file_path in enumerate(ds.file_paths):
      pixels = _crop_pixels(tracks.landmarks[_frame_index(file_path), :468],
                            report)
      rays = camera.generate_rays(
          jnp.asarray(pixels, jnp.float32), jnp.asarray(intrinsics,
                                                        jnp.float32),
          jnp.asarray(ds.c2w[k]), ds.height, ds.width)
      origin = np.asarray(rays.origins, np.float64)
      direction = np.asarray(rays.directions, np.float64)
      direction /= np.linalg.norm(direction, axis=-1, keepdims=True)
      offset = world - origin
      along = np.sum(offset * direction, -1, keepdims=True)
      distances.append(np.linalg.norm(offset - along * direction, axis=-1)
                       / scale * 10.0)
  return np.array(distances)


def _check_index_map(root: pathlib.Path, written: list[int]):
  """index_map.npy: one row per written frame (video index, train row)."""
  index_map = np.load(root / 'index_map.npy')
  assert index_map.dtype == np.int64
  np.testing.assert_array_equal(index_map[:, 0], written)
  train = [_frame_index(p) for p in data.load(root, 'train').file_paths]
  expected = [train.index(f) if f in train else -1 for f in written]
  np.testing.assert_array_equal(index_map[:, 1], expected)
  np.testing.assert_array_equal(data.read_index_map(root), index_map)


def test_dataset_loads_with_rigid_normalised_cameras(dataset):
  splits = data.load_splits(dataset)
  report = _report(dataset)
  c2w = np.concatenate([ds.c2w for ds in splits.values()]).astype(np.float64)
  chex.assert_shape(c2w, (FRAMES, 4, 4))
  rotation = c2w[:, :3, :3]
  chex.assert_trees_all_close(
      np.einsum('nji,njk->nik', rotation, rotation),
      np.broadcast_to(np.eye(3), (FRAMES, 3, 3)), atol=1e-5)
  chex.assert_trees_all_close(np.linalg.det(rotation), np.ones(FRAMES),
                              atol=1e-5)
  chex.assert_trees_all_close(c2w[:, 3], np.tile([0.0, 0.0, 0.0, 1.0],
                                                 (FRAMES, 1)))
  distance = np.linalg.norm(c2w[:, :3, 3], axis=-1)
  np.testing.assert_allclose(distance.mean(), 0.5, atol=1e-5)
  # The camera sits in front of the face (+z of the canonical face).
  assert np.all(c2w[:, 2, 3] > 0.3)
  for ds in splits.values():
    assert ds.expr_dim == 52
    assert ds.images.shape[1:] == (SIZE, SIZE, 3)
    assert np.all((ds.expressions >= 0) & (ds.expressions <= 1))
    assert ds.background.shape == (SIZE, SIZE, 3)
  assert report['expression_names'][0] == '_neutral'
  assert len(report['expression_names']) == 52
  # Splits: every frame once, test = the last 10% in time, names = indices.
  indices = {s: sorted(_frame_index(p) for p in ds.file_paths)
             for s, ds in splits.items()}
  assert sorted(sum(indices.values(), [])) == list(range(FRAMES))
  assert indices['test'] == list(range(FRAMES - 4, FRAMES))
  assert len(indices['val']) >= 1
  assert report['frames_skipped'] == 0 and report['skipped'] == []
  _check_index_map(dataset, list(range(FRAMES)))


def test_landmark_rays_pass_near_canonical_vertices(dataset, tracks):
  distances = _distances_mm(dataset, tracks)
  median = np.median(distances, axis=0)  # Over frames.
  # The tracker itself reprojects its mesh 5-8 px off at 512 px (about
  # 3-5 mm at this distance); rigid landmarks do better than the mouth.
  assert np.all(median[list(RIGID_LANDMARKS)] < 5.0), median[
      list(RIGID_LANDMARKS)]
  assert np.median(median) < 5.0
  # The check is sensitive: a principal point 2 px off (16 px of the
  # original frame) moves the rays by about a centimetre.
  shifted = np.median(_distances_mm(dataset, tracks, principal_shift=2.0),
                      axis=0)
  assert np.median(shifted[list(RIGID_LANDMARKS)]) > 2.0 * np.median(
      median[list(RIGID_LANDMARKS)])


def test_black_frames_are_skipped_and_the_rest_stays_aligned(
    tmp_path, frames, dataset):
  folder = tmp_path / 'frames'
  folder.mkdir()
  for index, frame in enumerate(frames):
    image = np.zeros_like(frame) if index in BLACK else frame
    Image.fromarray(image).save(folder / f'img_{index}.png')
  out = tmp_path / 'out'
  report = preprocess.preprocess(folder, out, _options(), log=_quiet)
  assert [s['frame'] for s in report['skipped']] == list(BLACK)
  assert all(s['reason'] == 'no face' for s in report['skipped'])
  assert report['frames_kept'] == FRAMES - len(BLACK)
  assert report['crop'] == _report(dataset)['crop']
  clean_rotation = {_frame_index(p): ds.c2w[k, :3, :3].astype(np.float64)
                    for ds in data.load_splits(dataset).values()
                    for k, p in enumerate(ds.file_paths)}
  crop = report['crop']
  reference = np.stack([cv2.resize(
      f[crop['y0']:crop['y0'] + crop['side'],
        crop['x0']:crop['x0'] + crop['side']], (SIZE, SIZE),
      interpolation=cv2.INTER_AREA).astype(np.float64) for f in frames])
  seen = set()
  for ds in data.load_splits(out).values():
    for k, file_path in enumerate(ds.file_paths):
      index = _frame_index(file_path)
      seen.add(index)
      # Each written image is its own source frame, not a neighbour's.
      errors = np.mean((reference - ds.images[k]) ** 2, axis=(1, 2, 3))
      assert int(np.argmin(errors)) == index
      assert errors[index] < 1.0
      # Its pose is the clean run's pose of the same frame (the tracker
      # re-detects after a black frame, so agreement is close, not exact).
      rotation = ds.c2w[k, :3, :3].astype(np.float64)
      cosine = (np.trace(rotation.T @ clean_rotation[index]) - 1.0) / 2.0
      assert np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))) < 1.0
  assert seen == set(range(FRAMES)) - set(BLACK)
  # Skipped frames are not rows of the index map.
  _check_index_map(out, sorted(seen))


def test_auto_background_removes_the_person(dataset, frames, tracks):
  report = _report(dataset)
  bg = np.asarray(Image.open(dataset / 'bg' / '00050.png'), np.float64)
  chex.assert_shape(bg, (SIZE, SIZE, 3))
  crop = report['crop']
  for index in range(0, FRAMES, 5):
    frame = cv2.resize(frames[index][crop['y0']:crop['y0'] + crop['side'],
                                     crop['x0']:crop['x0'] + crop['side']],
                       (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    pixels = _crop_pixels(tracks.landmarks[index], report)
    # The inner face: the box of the eyes, nose and mouth landmarks.
    inner = pixels[[33, 263, 1, 13, 61, 291]]
    c0, r0 = np.floor(inner.min(0)).astype(int)
    c1, r1 = np.ceil(inner.max(0)).astype(int)
    face = np.abs(bg[r0:r1, c0:c1] - frame[r0:r1, c0:c1]).mean()
    assert face > 25.0, (index, face)
    # The top-left corner is wall in every frame of the clip: kept as seen.
    corner = np.abs(bg[:6, :6] - frame[:6, :6]).mean()
    assert corner < 8.0, (index, corner)
  assert 0.0 < report['background']['filled_fraction'] < 1.0


def test_debug_overlays_and_report(dataset):
  report = _report(dataset)
  overlays = sorted((dataset / 'debug').glob('overlay_f_*.png'))
  assert len(overlays) == 2
  assert (dataset / 'debug' / 'background.png').is_file()
  assert report['frames_decoded'] == FRAMES
  assert report['frames_per_second'] > 0
  assert set(report['timings_s']) >= {'track', 'write', 'background', 'total'}


def test_same_dataset_is_kept_different_one_is_refused(dataset):
  before = (dataset / 'transforms_train.json').stat().st_mtime_ns
  report = preprocess.preprocess(CLIP, dataset, _options(), log=_quiet)
  assert report == _report(dataset)
  assert (dataset / 'transforms_train.json').stat().st_mtime_ns == before
  with pytest.raises(preprocess.PreprocessError,
                     match='already holds a different dataset'):
    preprocess.preprocess(CLIP, dataset, _options(size=32), log=_quiet)
  assert (dataset / 'transforms_train.json').stat().st_mtime_ns == before


def test_output_with_other_files_is_refused(tmp_path):
  out = tmp_path / 'busy'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(preprocess.PreprocessError, match='other files'):
    preprocess.preprocess(CLIP, out, _options(), log=_quiet)
  assert (out / 'notes.txt').read_text() == 'mine'


def test_no_face_anywhere_is_an_error_and_writes_nothing(tmp_path):
  folder = tmp_path / 'empty_room'
  folder.mkdir()
  for index in range(4):
    Image.fromarray(np.full((96, 128, 3), 40 * index, np.uint8)).save(
        folder / f'{index:03d}.png')
  out = tmp_path / 'out'
  with pytest.raises(preprocess.PreprocessError,
                     match=r'empty_room: no frame has a usable face \(frames '
                     r'0 to 3: 4 x no face\)'):
    preprocess.preprocess(folder, out, _options(), log=_quiet)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['empty_room']


@pytest.mark.parametrize('content, message', [
    (b'', 'the video file is empty'),
    (b'\x00garbage' * 100, 'cannot open as a video'),
])
def test_unreadable_video_is_an_error(tmp_path, content, message):
  path = tmp_path / 'clip.mp4'
  path.write_bytes(content)
  with pytest.raises(preprocess.PreprocessError,
                     match=f'clip.mp4: {message}'):
    preprocess.preprocess(path, tmp_path / 'out', _options(), log=_quiet)


def test_image_folder_errors_name_the_file_and_frame(tmp_path):
  with pytest.raises(preprocess.PreprocessError, match='holds no images'):
    video.open_video(tmp_path)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'a_1.png')
  Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / 'a_2.png')
  (tmp_path / 'a_10.png').write_bytes(b'not a png')
  source = video.open_video(tmp_path)
  # Natural order: a_2 before a_10.
  assert [p.name for p in source.images] == ['a_1.png', 'a_2.png', 'a_10.png']
  with pytest.raises(preprocess.PreprocessError,
                     match=r'a_2.png: frame 1 is 6x8 pixels but frame 0 is '
                     '8x8'):
    list(source.frames())
  with pytest.raises(preprocess.PreprocessError,
                     match='a_10.png: frame 0: not a readable image'):
    video.read_image(tmp_path / 'a_10.png')


def test_missing_and_corrupt_models_say_where_to_download(tmp_path):
  missing = tmp_path / 'nowhere' / 'face_landmarker.task'
  with pytest.raises(preprocess.PreprocessError,
                     match=r'face tracker model not found\. Download '
                     r'face_landmarker\.task from https://'):
    preprocess.preprocess(CLIP, tmp_path / 'out',
                          _options(tracker_model=str(missing)), log=_quiet)
  corrupt = tmp_path / 'corrupt.task'
  corrupt.write_bytes(MODEL.read_bytes()[:100_000])
  with pytest.raises(preprocess.PreprocessError,
                     match=r'corrupt.task: not a valid face tracker model.*'
                     r'Download face_landmarker\.task'):
    tracking.check_model(corrupt)
  partial = tmp_path / 'partial.task'
  with zipfile.ZipFile(partial, 'w') as bundle:
    bundle.writestr('face_detector.tflite', b'x')
  with pytest.raises(preprocess.PreprocessError,
                     match=r'lacks face_landmarks_detector.tflite'):
    tracking.check_model(partial)
  # A bundle with every member but a broken network: MediaPipe's refusal
  # is reported as a model problem too.
  broken = tmp_path / 'broken.task'
  with zipfile.ZipFile(MODEL) as source, zipfile.ZipFile(broken, 'w') as out:
    for name in source.namelist():
      out.writestr(name, b'\x00' * 64 if name.endswith('.tflite')
                   else source.read(name))
  with pytest.raises(preprocess.PreprocessError,
                     match='MediaPipe cannot load the face tracker model'):
    tracking.track(iter([(0, np.zeros((8, 8, 3), np.uint8))]), broken, 25.0,
                   8, 8)
  assert not (tmp_path / 'out').exists()


def test_command_line_reports_errors_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / 'preprocess.py'),
       f'--video={tmp_path / "none.mp4"}', f'--out={tmp_path / "out"}',
       f'--tracker_model={MODEL}'],
      capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
  assert result.returncode == 1
  assert result.stderr.strip() == (
      f'preprocess.py: error: {tmp_path / "none.mp4"}: video not found.')
