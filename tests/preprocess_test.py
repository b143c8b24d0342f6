"""End-to-end tests of the video preprocessor on real fixture clips.

Skipped when MediaPipe / OpenCV are not installed or when ../shared/fixtures
is absent. Every conversion uses a 40-frame slice at a small output size; the
clean conversion is shared by the tests of one module.

The checks are made from the outside: the written dataset is read by the
project's loader, rays come from the training code's `camera.generate_rays`,
and landmark pixels are mapped into the crop here, by hand.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
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
from nerface_jax.preprocess import writer  # pylint: disable=g-import-not-at-top

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
  assert report['timings']['frames_per_second'] > 0
  assert set(report['timings']) >= {'track_s', 'write_s', 'background_s',
                                    'total_s'}


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


def _dead_pid() -> int:
  """The pid of a process that has exited and been reaped."""
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def test_stale_partial_folders_are_removed_live_ones_kept(tmp_path):
  out = tmp_path / 'me'
  host = writer.partial_path(out).name.rsplit('-', 1)[0].split(
      '.partial-', 1)[1]
  dead = _dead_pid()
  sleeper = subprocess.Popen([sys.executable, '-c',
                              'import time; time.sleep(60)'])
  try:
    stale = [writer.partial_path(out, dead),
             tmp_path / f'.me.partial-{dead}']  # Name of older versions.
    kept = [writer.partial_path(out, os.getpid()),  # This process's own.
            writer.partial_path(out, sleeper.pid),  # Another live run.
            tmp_path / f'.me.partial-other-host-{dead}',  # Not checkable.
            tmp_path / f'.mine.partial-{host}-{dead}',  # Another output.
            tmp_path / f'.me.partial-{host}-x{dead}']  # Not our name.
    for folder in stale + kept:
      (folder / 'train').mkdir(parents=True)
      (folder / 'train' / 'f_0000.png').write_bytes(b'half')
    lines = []
    removed = writer.remove_stale_partials(out, lines.append)
  finally:
    sleeper.kill()
    sleeper.wait()
  assert sorted(removed) == sorted(stale)
  assert [f for f in stale + kept if f.exists()] == kept
  assert sorted(lines) == sorted(
      [f'removed {f}, left by an interrupted run (process {dead} is gone).'
       for f in stale] +
      [f'leaving {kept[1]}: process {sleeper.pid} is still running (another '
       'run writing the same output?).'])
  assert writer.remove_stale_partials(tmp_path / 'absent' / 'me') == []


def test_stale_partial_folder_removal_is_said_on_stderr(tmp_path):
  out = tmp_path / 'busy'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  stale = writer.partial_path(out, _dead_pid())
  live = writer.partial_path(out, os.getpid())  # The test, alive.
  stale.mkdir()
  live.mkdir()
  result = _command_line(f'--video={CLIP}', f'--out={out}',
                         f'--tracker_model={MODEL}')
  assert result.returncode == 2, result.stderr
  lines = result.stderr.splitlines()
  assert len(lines) == 3, result.stderr
  assert set(lines[:2]) == {
      f'preprocess: removed {stale}, left by an interrupted run (process '
      f'{stale.name.rsplit("-", 1)[1]} is gone).',
      f'preprocess: leaving {live}: process {os.getpid()} is still running '
      '(another run writing the same output?).'}
  assert lines[2].startswith('preprocess.py: error: ')
  assert 'already holds other files' in lines[2]
  assert not stale.exists() and live.is_dir()
  assert (out / 'notes.txt').read_text() == 'mine'


def _command_line(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / 'preprocess.py'), *args],
                        capture_output=True, text=True, cwd=REPO, timeout=120,
                        check=False)


# (flags after --video/--out, the error line's start after the prefix).
# Bad values come with a video that does not exist: they are refused before
# the video is opened.
_BAD_VALUES = [
    (['--size=0'], '--size must be at least 8, got 0.'),
    (['--size=-64'], '--size must be at least 8, got -64.'),
    (['--max_frames=0'], '--max_frames must be positive, got 0.'),
    (['--max_frames=-3'], '--max_frames must be positive, got -3.'),
    (['--test_fraction=1'], '--test_fraction must be in (0, 1), got 1.0.'),
    (['--test_fraction=-0.1'], '--test_fraction must be in (0, 1)'),
    (['--test_fraction=nan'], '--test_fraction must be in (0, 1), got nan.'),
    (['--val_fraction=1.5'], '--val_fraction must be in (0, 1), got 1.5.'),
    (['--val_fraction=0'], '--val_fraction must be in (0, 1), got 0.0.'),
    (['--smooth=inf'], '--smooth must be a finite number >= 0, got inf.'),
    (['--crop_margin=-1'], '--crop_margin must be a finite number >= 0'),
    (['--seed=-1'], '--seed must be >= 0, got -1.'),
    (['--background=chroma'], '--background=chroma: unknown mode'),
    (['--background=color:0,300,0'], '--background=color:0,300,0: expected'),
    (['--background=file:/nowhere/empty.png'],
     '/nowhere/empty.png: background photo not found'),
    (['--size=abc'], 'flag --size=abc: invalid literal for int()'),
    (['--no_such_flag=1'], "Unknown command line flag 'no_such_flag'"),
    (['stray'], 'unexpected arguments: stray;'),
]


@pytest.mark.parametrize('args, message', _BAD_VALUES,
                         ids=[' '.join(a) for a, _ in _BAD_VALUES])
def test_command_line_refuses_bad_values_in_one_line(tmp_path, args,
                                                     message):
  result = _command_line(f'--video={tmp_path / "none.mp4"}',
                         f'--out={tmp_path / "out"}',
                         f'--tracker_model={MODEL}', *args)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith(f'preprocess.py: error: {message}'), (
      result.stderr)
  assert len(result.stderr.splitlines()) == 1, result.stderr
  assert result.stdout == ''
  assert sorted(p.name for p in tmp_path.iterdir()) == []


def _no_face_folder(tmp_path: pathlib.Path) -> str:
  folder = tmp_path / 'empty_room'
  folder.mkdir()
  for index in range(4):
    Image.fromarray(np.full((96, 128, 3), 40 * index, np.uint8)).save(
        folder / f'{index:03d}.png')
  return str(folder)


def _busy_folder(tmp_path: pathlib.Path) -> str:
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'notes.txt').write_text('mine')
  return str(CLIP)


def _garbage_video(tmp_path: pathlib.Path) -> str:
  (tmp_path / 'clip.mp4').write_bytes(b'\x00garbage' * 100)
  return str(tmp_path / 'clip.mp4')


def _plain_file(tmp_path: pathlib.Path) -> str:
  (tmp_path / 'notes.txt').write_text('mine')
  return str(CLIP)


def _wrong_size_photo(tmp_path: pathlib.Path) -> str:
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'bg.png')
  return str(CLIP)


# (makes the input and returns the video, extra flags, the error's text).
_BAD_INPUTS = {
    'missing video': (lambda t: str(t / 'none.mp4'), [],
                      '{t}/none.mp4: video not found.'),
    'not a video': (_garbage_video, [], '{t}/clip.mp4: cannot open as a video'),
    'no face': (_no_face_folder, [],
                '{t}/empty_room: no frame has a usable face'),
    'output holds other files': (
        _busy_folder, [], '{t}/out: the output folder already holds other '
        'files'),
    'background photo of another size': (
        _wrong_size_photo, ['--background=file:{t}/bg.png'],
        '{t}/bg.png: background photo is 8x8 pixels but the video frames '
        'are 512x512'),
    'output under a file': (
        _plain_file, ['--out={t}/notes.txt/out'],
        '{t}/notes.txt/out: cannot be created, {t}/notes.txt is a file'),
    'missing tracker model': (
        lambda t: str(CLIP), ['--tracker_model={t}/none.task'],
        '{t}/none.task: face tracker model not found.'),
}


@pytest.mark.parametrize('case', sorted(_BAD_INPUTS))
def test_command_line_reports_bad_input_in_one_line(tmp_path, case):
  make, extra, message = _BAD_INPUTS[case]
  video_arg = make(tmp_path)
  before = sorted(p.name for p in tmp_path.iterdir())
  extra = [e.format(t=tmp_path) for e in extra]
  defaults = {'--tracker_model': str(MODEL), '--out': str(tmp_path / 'out')}
  extra += [f'{flag}={value}' for flag, value in defaults.items()
            if not any(e.startswith(flag + '=') for e in extra)]
  result = _command_line(f'--video={video_arg}', f'--max_frames={FRAMES}',
                         f'--size={SIZE}', *extra)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.splitlines()
  # The error is the last line; before it only progress lines.
  assert lines[-1].startswith(
      'preprocess.py: error: ' + message.format(t=tmp_path)), result.stderr
  assert all(line.startswith('preprocess: ') for line in lines[:-1]), (
      result.stderr)
  assert 'Traceback' not in result.stderr
  # Nothing written, not even a staging folder.
  assert sorted(p.name for p in tmp_path.iterdir()) == before


# Loaded by the interrupted run's interpreter (PYTHONPATH): every frame
# written takes a while, so the writing pass lasts seconds on any machine
# and the Ctrl-C certainly lands in it.
_SLOW_WRITES = """
import time
from nerface_jax.preprocess import pipeline
_write_png = pipeline._write_png
def _slow(path, rgb):
  time.sleep(0.5)
  _write_png(path, rgb)
pipeline._write_png = _slow
"""


def test_command_line_interrupted_says_so_and_leaves_nothing(tmp_path):
  shim = tmp_path / 'shim'
  shim.mkdir()
  (shim / 'sitecustomize.py').write_text(_SLOW_WRITES)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(shim), str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')]
                                if p]))
  work = tmp_path / 'work'
  work.mkdir()
  process = subprocess.Popen(
      [sys.executable, str(REPO / 'preprocess.py'), f'--video={CLIP}',
       f'--out={work / "out"}', f'--tracker_model={MODEL}', f'--size={SIZE}',
       f'--max_frames={FRAMES}'], cwd=REPO, env=env, stderr=subprocess.PIPE,
      stdout=subprocess.DEVNULL, text=True,
      # A test run started in the background (`cmd &` in a script) ignores
      # SIGINT, and a child would inherit that and never see the Ctrl-C.
      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  try:
    deadline = time.monotonic() + 120
    while (not list(work.glob('.out.partial-*'))
           and process.poll() is None):
      assert time.monotonic() < deadline
      time.sleep(0.02)
    process.send_signal(signal.SIGINT)  # Ctrl-C while writing.
    _, stderr = process.communicate(timeout=120)
  finally:
    process.kill()
  returncode = process.returncode
  assert returncode == 130, stderr
  assert stderr.splitlines()[-1] == (
      'preprocess.py: error: interrupted; nothing was written to --out.')
  assert 'Traceback' not in stderr
  assert list(work.iterdir()) == []
