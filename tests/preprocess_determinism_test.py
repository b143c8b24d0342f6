"""The preprocessor is a function of its input: the same command twice gives
byte-identical output folders, and a run killed mid-way leaves nothing that
the next run does not clean up.

Runs `preprocess.py` as a separate process each time (a fresh OpenCV, fresh
threads: what "the same command twice" means to a user) on a 30-frame slice
of a fixture clip at 64 pixels. Skipped when MediaPipe / OpenCV are not
installed or ../shared/fixtures is absent.
"""

import concurrent.futures
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

cv2 = pytest.importorskip('cv2')
pytest.importorskip('mediapipe')

from nerface_jax.preprocess import background  # pylint: disable=g-import-not-at-top
from nerface_jax.preprocess import geometry  # pylint: disable=g-import-not-at-top
from nerface_jax.preprocess import tracking  # pylint: disable=g-import-not-at-top
from nerface_jax.preprocess import video  # pylint: disable=g-import-not-at-top
from nerface_jax.preprocess import writer  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / 'shared' / 'fixtures'
MODEL = FIXTURES / 'face_landmarker.task'
CLIP = FIXTURES / 'videos' / 'hdtf_WDA_KatieHill_000.mp4'
FRAMES = 30
SIZE = 64
# The report's only run-dependent values; everything else must match.
TIMINGS = 'timings'
TIMING_FIELDS = {'track_s', 'write_s', 'background_s', 'debug_s', 'total_s',
                 'frames_per_second'}

if not (MODEL.is_file() and CLIP.is_file()):
  pytest.skip(f'fixtures not found under {FIXTURES}', allow_module_level=True)


def _command(out: pathlib.Path) -> list[str]:
  return [sys.executable, str(REPO / 'preprocess.py'), f'--video={CLIP}',
          f'--out={out}', f'--tracker_model={MODEL}', f'--size={SIZE}',
          f'--max_frames={FRAMES}', '--background=auto', '--debug_frames=3']


def _run(out: pathlib.Path) -> subprocess.CompletedProcess:
  result = subprocess.run(_command(out), capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  return result


def _files(root: pathlib.Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob('*')
                if p.is_file())


def _partials(out: pathlib.Path) -> list[pathlib.Path]:
  return sorted(out.parent.glob(f'.{out.name}.partial-*'))


def _killed_mid_way(out: pathlib.Path) -> pathlib.Path:
  """Starts a run and SIGKILLs it once it writes; returns what it left."""
  process = subprocess.Popen(_command(out), cwd=REPO,
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  try:
    deadline = time.monotonic() + 240
    while not _partials(out) and process.poll() is None:
      assert time.monotonic() < deadline, 'the run never started writing'
      time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
  finally:
    process.wait()
  assert process.returncode == -signal.SIGKILL, 'finished before the kill'
  assert not out.exists()
  (left,) = _partials(out)
  assert left.name.endswith(f'-{process.pid}')
  return left


def test_same_command_gives_byte_identical_output(tmp_path):
  out_a, out_b = tmp_path / 'a', tmp_path / 'b'
  # A killed run leaves its staging folder; the next run removes it, says
  # so on stderr, and writes exactly what an undisturbed run writes.
  left = _killed_mid_way(out_a)
  first = _run(out_a)
  assert f'removed {left}, left by an interrupted run' in first.stderr
  assert _partials(out_a) == []
  second = _run(out_b)
  assert 'removed' not in second.stderr

  files = _files(out_a)
  assert files == _files(out_b)
  assert {'bg/00050.png', 'debug/background.png',
          'debug/background_filled.png', 'debug/overlays.png',
          writer.REPORT_FILE, 'transforms_train.json',
          'index_map.npy'} <= set(files)
  assert len(files) > FRAMES
  different = [f for f in files if f != writer.REPORT_FILE
               and (out_a / f).read_bytes() != (out_b / f).read_bytes()]
  assert different == []
  # The report: equal but for its timings block.
  report_a = json.loads((out_a / writer.REPORT_FILE).read_text())
  report_b = json.loads((out_b / writer.REPORT_FILE).read_text())
  assert set(report_a.pop(TIMINGS)) == TIMING_FIELDS
  assert set(report_b.pop(TIMINGS)) == TIMING_FIELDS
  assert report_a == report_b
  assert 0.0 < report_a['background']['filled_fraction'] < 1.0


@pytest.fixture(scope='module')
def grabcut_inputs() -> list[tuple[np.ndarray, np.ndarray]]:
  """(frame at GrabCut's resolution, landmark pixels) of 8 frames."""
  frames = [f for _, f in video.open_video(CLIP).frames(40)][::5]
  height, width = frames[0].shape[:2]
  tracks = tracking.track(enumerate(frames), MODEL, 5.0, height, width)
  assert tracks.valid.all()
  crop = geometry.square_crop(
      geometry.landmark_boxes(tracks.landmarks, height, width), height,
      width, 0.3)
  work = min(background.GRABCUT_SIZE, crop[2])
  return [(video.crop_and_resize(f, crop, work),
           geometry.to_crop_pixels(l, height, width, crop, work))
          for f, l in zip(frames, tracks.landmarks)]


def test_person_mask_depends_on_its_frame_alone(grabcut_inputs):
  # Unseeded, GrabCut's k-means++ start draws from OpenCV's per-thread RNG,
  # so a mask changed with the calls made before it on the same thread.
  def masks(inputs):
    return [background.refine_mask(image, pixels, SIZE)
            for image, pixels in inputs]

  reference = masks(grabcut_inputs)
  assert all(0.05 < m.mean() < 0.95 for m in reference)
  cv2.setRNGSeed(12345)  # Whatever state the thread was left in.
  again = masks(grabcut_inputs[::-1])  # And the other way round.
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    threaded = list(pool.map(lambda args: background.refine_mask(*args, SIZE),
                             grabcut_inputs))
  for k, mask in enumerate(reference):
    np.testing.assert_array_equal(again[-1 - k], mask, err_msg=f'frame {k}')
    np.testing.assert_array_equal(threaded[k], mask, err_msg=f'frame {k}')
