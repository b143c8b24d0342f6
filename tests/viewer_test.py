"""Tests of the browser viewer: its camera maths, its renders, and a real
headless Chromium driving a served page (skipped where Chromium is absent).

Set NERFACE_VIEWER_SCREENSHOT=docs/viewer.png to keep the browser test's
screenshot of the rendered avatar there (800 pixels wide), and
NERFACE_VIEWER_TEST_WORKDIR=W to run the browser test on workdir W's avatar
instead of the small test avatar.
"""

import dataclasses
import io
import json
import math
import os
import pathlib
import time

import numpy as np
from PIL import Image
import pytest

from nerface_jax import avatar as avatar_lib
from nerface_jax import camera
from nerface_jax import errors
from nerface_jax import renderer
from nerface_jax import viewer as viewer_lib

CHROMIUM = pathlib.Path('/usr/bin/chromium')
CHROMEDRIVER = pathlib.Path('/usr/bin/chromedriver')


@pytest.fixture(scope='module')
def viewer(trained_avatar):
  return viewer_lib.Viewer(trained_avatar)


def _random_rotation(rng):
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q *= np.sign(np.diag(r))
  return q * np.linalg.det(q)


def _assert_same_rays(model, c2w, intrinsics, height, width):
  wxyz, position = model.to_viewer(c2w)
  assert abs(np.linalg.norm(wxyz) - 1) < 1e-12
  back, back_intrinsics = model.from_viewer(wxyz, position, model.fov,
                                            height, width)
  pixels = camera.pixel_grid_np(height, width)
  origins, directions = camera.rays_np(pixels, intrinsics, c2w, height, width)
  origins2, directions2 = camera.rays_np(pixels, back_intrinsics, back,
                                         height, width)
  np.testing.assert_allclose(origins2, origins, rtol=0, atol=1e-5)
  np.testing.assert_allclose(directions2, directions, rtol=0, atol=1e-5)
  return wxyz, position


def test_every_training_camera_round_trips_to_its_rays(viewer):
  train = viewer.splits['train']
  model = viewer.camera
  assert train.intrinsics[0] < 0 < train.intrinsics[1]  # As released.
  mirror = np.diag([-1.0, 1.0, 1.0])
  np.testing.assert_array_equal(model.mirror, mirror)
  pixels = camera.pixel_grid_np(train.height, train.width)
  fx, fy, cx, cy = train.intrinsics
  for c2w in train.c2w:
    wxyz, position = _assert_same_rays(model, c2w, train.intrinsics,
                                       train.height, train.width)
    # The viewer's camera is a right-handed OpenCV camera (+z forward, +y
    # down) in the mirrored world: pixel (i, j) looks along
    # R [(i - W cx)/|fx|, (j - H cy)/|fy|, 1].
    rotation = viewer_lib.quaternion_to_matrix(wxyz)
    assert np.linalg.det(rotation) > 0.999
    cv = np.stack([(pixels[..., 0] - train.width * cx) / abs(fx),
                   (pixels[..., 1] - train.height * cy) / abs(fy),
                   np.ones(pixels.shape[:2])], -1)
    _, directions = camera.rays_np(pixels, train.intrinsics, c2w,
                                   train.height, train.width)
    np.testing.assert_allclose(cv @ rotation.T, directions @ mirror,
                               atol=1e-5)
    np.testing.assert_allclose(position, mirror @ c2w[:3, 3], atol=1e-12)


@pytest.mark.parametrize('signs', [(1, 1), (-1, 1), (1, -1), (-1, -1)])
def test_any_focal_signs_and_principal_point_round_trip(signs):
  rng = np.random.default_rng(0)
  intrinsics = np.array([signs[0] * 410.0, signs[1] * 400.0, 0.47, 0.53])
  model = viewer_lib.CameraModel(intrinsics, 300, 400)
  for _ in range(20):
    c2w = np.eye(4)
    c2w[:3, :3] = _random_rotation(rng)
    c2w[:3, 3] = rng.normal(size=3)
    _assert_same_rays(model, c2w, intrinsics, 300, 400)


def test_quaternions_round_trip():
  rng = np.random.default_rng(1)
  for _ in range(200):
    rotation = _random_rotation(rng)
    q = viewer_lib.matrix_to_quaternion(rotation)
    np.testing.assert_allclose(viewer_lib.quaternion_to_matrix(q), rotation,
                               atol=1e-12)
  for angle in (0.0, math.pi):  # Trace -1 and 3: the branches' edges.
    for axis in np.eye(3):
      rotation = np.eye(3) + math.sin(angle) * np.cross(np.eye(3), axis) + (
          1 - math.cos(angle)) * (np.outer(axis, axis) - np.eye(3))
      q = viewer_lib.matrix_to_quaternion(rotation)
      np.testing.assert_allclose(viewer_lib.quaternion_to_matrix(q),
                                 rotation, atol=1e-12)


def test_orbit_looks_at_the_head_along_the_camera(viewer):
  c2w = viewer.front_c2w
  position, look_at, up = viewer.camera.orbit(c2w, viewer.centre)
  wxyz, _ = viewer.camera.to_viewer(c2w)
  rotation = viewer_lib.quaternion_to_matrix(wxyz)
  forward = (look_at - position) / np.linalg.norm(look_at - position)
  np.testing.assert_allclose(forward, rotation[:, 2], atol=1e-12)
  np.testing.assert_allclose(up, -rotation[:, 1], atol=1e-12)
  # The look-at point is the head centre's depth on the optical axis.
  depth = np.linalg.norm(look_at - position)
  centre = viewer.camera.mirror @ viewer.centre
  assert abs(depth - (centre - position) @ forward) < 1e-9


def test_render_sizes_and_the_background():
  assert viewer_lib.render_size(24, 1.0) == viewer_lib.RenderSize(24, 24, 24)
  size = viewer_lib.render_size(24, 1000 / 557)
  assert (size.width, size.padded) == (43, 45)  # Multiples of 24 / 8 = 3.
  assert viewer_lib.height_options(24) == [8, 12, 24, 48]
  assert viewer_lib.height_options(64) == [16, 32, 64, 128]
  # Every window between 1:2 and 3:1 uses a few widths per height.
  widths = {viewer_lib.render_size(64, a).padded
            for a in np.linspace(0.5, 3.0, 500)}
  assert len(widths) <= 21
  rng = np.random.default_rng(0)
  background = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
  same = viewer_lib.scaled_background(background, 0.49, 0.51,
                                      viewer_lib.RenderSize(24, 20, 20))
  np.testing.assert_array_equal(same, background)
  # Twice the height: every second pixel is a training pixel (about the
  # principal point), and padding repeats the last column.
  double = viewer_lib.scaled_background(background, 0.5, 0.5,
                                        viewer_lib.RenderSize(48, 40, 42))
  np.testing.assert_array_equal(double[::2, :40:2], background)
  np.testing.assert_array_equal(double[:, 40], double[:, 39])
  assert viewer_lib.scaled_background(
      None, 0.5, 0.5, viewer_lib.RenderSize(4, 5, 6)).shape == (4, 6, 3)


def _state(viewer, c2w, aspect, expression=None, latent=None):
  wxyz, position = viewer.camera.to_viewer(c2w)
  train = viewer.splits['train']
  return viewer_lib.ViewState(
      wxyz, position, viewer.camera.fov, aspect,
      train.expressions[viewer.front] if expression is None else expression,
      viewer.avatar.shared_code('mean') if latent is None else latent,
      np.eye(4))


def test_a_view_at_a_training_camera_is_that_frames_render(viewer):
  avatar = viewer.avatar
  train = viewer.splits['train']
  front = viewer.front
  code = viewer.code('frame', 'train', front)
  expected = avatar.render(renderer.dataset_inputs(train, front, code))
  frame = viewer.render(_state(viewer, train.c2w[front], 1.0, latent=code),
                        train.height)
  assert frame.image.shape == (train.height, train.width, 3)
  np.testing.assert_allclose(frame.c2w, train.c2w[front], atol=1e-6)
  np.testing.assert_allclose(frame.intrinsics, train.intrinsics, atol=1e-6)
  diff = np.abs(frame.image.astype(int) - (expected['rgb'] * 255 + 0.5)
                .clip(0, 255).astype(int))
  assert diff.max() <= 1


def test_a_padded_wide_view_equals_the_unpadded_render(viewer):
  """The padding columns of a bucketed width change nothing shown."""
  avatar = viewer.avatar
  state = _state(viewer, viewer.front_c2w, 1.8)
  size = viewer_lib.render_size(24, 1.8)
  assert size.padded > size.width
  frame = viewer.render(state, 24)
  c2w, intrinsics = viewer.camera.from_viewer(
      state.wxyz, state.position, state.fov, size.height, size.width)
  exact = avatar.render(renderer.frame_inputs(
      c2w, intrinsics, state.expression, state.latent,
      viewer_lib.scaled_background(viewer.background, intrinsics[2],
                                   intrinsics[3], viewer_lib.RenderSize(
                                       size.height, size.width, size.width)),
      size.height, size.width), size.height, size.width)
  diff = np.abs(frame.image.astype(int) -
                (exact['rgb'] * 255 + 0.5).clip(0, 255).astype(int))
  assert diff.max() <= 1


def test_a_full_render_stops_between_chunks(viewer):
  state = _state(viewer, viewer.front_c2w, 1.0)
  size = viewer_lib.render_size(48, 1.0)
  assert size.rays // viewer.chunk_for(size) >= 4
  with pytest.raises(renderer.RenderInterrupted):
    viewer.render(state, 48, should_stop=lambda: True)


def test_auto_preview_fits_the_time_budget(viewer):
  # pylint: disable=protected-access
  saved = (dict(viewer._seconds), set(viewer._compiled))
  try:
    viewer._seconds.clear()
    assert viewer.auto_preview(24, 1.0) == 8  # Nothing measured: smallest.
    size = viewer_lib.render_size(24, 1.0)
    viewer._compiled.discard((size, 256))
    # The first render compiles: not counted.
    assert viewer._record(size, 256, 9.0)
    assert viewer.estimate(size) is None
    assert not viewer._record(size, 256, 0.4)  # 144 rays in 0.1 s.
    assert viewer.auto_preview(24, 1.0) == 12
    assert abs(viewer.estimate(viewer_lib.render_size(48, 1.0)) - 1.6) < 1e-9
    viewer._record(size, 256, 0.0)  # Smoothed: (0.4 + 0) / 2.
    assert viewer.estimate(size) == pytest.approx(0.2)
    assert viewer.auto_preview(24, 1.0) == 24
    assert viewer.auto_preview(48, 1.0) == 24  # 48 rows: 0.8 s.
  finally:
    viewer._seconds, viewer._compiled = saved


def test_chunks_follow_the_measured_speed(viewer):
  # pylint: disable=protected-access
  saved = (dict(viewer._seconds), dict(viewer._chunks), viewer.avatar)
  try:
    viewer.avatar = dataclasses.replace(viewer.avatar, renderer=(
        dataclasses.replace(viewer.avatar.renderer, chunk=8192)))
    viewer._seconds.clear()
    viewer._chunks.clear()
    big = viewer_lib.RenderSize(256, 256, 256)  # 65,536 rays.
    assert viewer.chunk_for(big) == 8192  # Nothing measured: render.chunk.
    small = viewer_lib.RenderSize(8, 8, 8)
    viewer._seconds[small] = 64 * 1e-5  # 5,000 rays per CHUNK_SECONDS.
    assert viewer.chunk_for(big) == 4096
    assert viewer.chunk_for(viewer_lib.RenderSize(32, 32, 32)) == 256
    viewer._seconds[small] = 64 * 1e-3
    assert viewer.chunk_for(big) == 4096  # Kept: no recompilation.
    assert viewer.chunk_for(viewer_lib.RenderSize(64, 64, 64)) == 256
  finally:
    viewer._seconds, viewer._chunks, viewer.avatar = saved


def test_sequences_replay_the_data_and_transfer_a_driver(trained_avatar,
                                                         viewer):
  train = viewer.splits['train']
  for split, dataset in viewer.splits.items():
    sequence = viewer.sequences[split]
    assert sequence.split == split and len(sequence) == dataset.num_frames
    # From the frontal camera, a frame's head motion gives its own camera.
    np.testing.assert_allclose(sequence.motions @ viewer.front_c2w,
                               dataset.c2w, atol=1e-5)
  # Driven by its own training frames: the same expressions, and the same
  # head rotations about the head centre (translations are not moved over).
  driven = viewer_lib.Viewer(trained_avatar, str(train.path), 'train')
  sequence = driven.sequences[viewer_lib.DRIVING]
  assert sequence.split is None
  np.testing.assert_allclose(sequence.expressions, train.expressions,
                             atol=1e-6)
  poses = sequence.motions @ viewer.front_c2w
  np.testing.assert_allclose(poses[:, :3, :3], train.c2w[:, :3, :3],
                             atol=1e-5)
  with pytest.raises(errors.RenderError, match='--driving'):
    viewer_lib.Viewer(trained_avatar, str(train.path / 'nothing'))


def test_expression_labels(tmp_path):
  assert viewer_lib.expression_labels(tmp_path, 3) == ['0', '1', '2']
  (tmp_path / 'preprocess_report.json').write_text(json.dumps(
      {'expression_names': ['_neutral', 'browDownLeft', 'jawOpen']}))
  assert viewer_lib.expression_labels(tmp_path, 3) == [
      '0 _neutral', '1 browDownLeft', '2 jawOpen']
  # A report of another length is not this data's.
  assert viewer_lib.expression_labels(tmp_path, 4) == ['0', '1', '2', '3']
  synthetic = tmp_path / 'synthetic_s24_f40_seed0_v1'
  synthetic.mkdir()
  labels = viewer_lib.expression_labels(synthetic, 76)
  assert labels[:5] == ['0 jaw open', '1 blink left', '2 blink right',
                        '3 brows up', '4']


def test_save_writes_the_image_and_its_camera(viewer, tmp_path):
  frame = viewer.render(_state(viewer, viewer.front_c2w, 1.0), 24)
  workdir = viewer.avatar.workdir
  viewer.avatar.workdir = tmp_path
  try:
    first = viewer.save(frame, {'frame': ['train', 3]})
    second = viewer.save(frame, {})
  finally:
    viewer.avatar.workdir = workdir
  assert first == tmp_path / 'viewer' / 'view_0001.png'
  assert second.name == 'view_0002.png'
  np.testing.assert_array_equal(np.asarray(Image.open(first)), frame.image)
  meta = json.loads(first.with_suffix('.json').read_text())
  assert meta['frame'] == ['train', 3] and meta['height'] == 24
  np.testing.assert_allclose(meta['c2w'], frame.c2w)


# --- A real browser -----------------------------------------------------------


@pytest.fixture(scope='module')
def browser():
  if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(f'no {CHROMIUM} / {CHROMEDRIVER}: install the Debian '
                'packages chromium and chromium-driver (.ci/run does) to run '
                'the browser test')
  webdriver = pytest.importorskip(
      'selenium.webdriver', reason='selenium is not installed (pip install '
      '-r requirements-dev.txt)')
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = str(CHROMIUM)
  for arg in ('--headless=new', '--no-sandbox', '--enable-unsafe-swiftshader',
              '--use-angle=swiftshader', '--window-size=1000,700',
              '--disable-dev-shm-usage', '--force-device-scale-factor=1'):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)),
                            options=options)
  driver.set_page_load_timeout(60)
  try:
    yield driver
  finally:
    driver.quit()


@pytest.fixture
def served(request):
  pytest.importorskip('viser')
  workdir = os.environ.get('NERFACE_VIEWER_TEST_WORKDIR')
  viewer = (viewer_lib.Viewer(avatar_lib.load(workdir)) if workdir else
            request.getfixturevalue('viewer'))
  server = viewer_lib.ViewerServer(viewer, '127.0.0.1', 0)
  try:
    yield server
  finally:
    server.stop()


def _screenshot(driver) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png()))
                    .convert('RGB'))


def _canvas_part(driver, shot: np.ndarray) -> tuple[np.ndarray, tuple]:
  """(A part of the canvas that no overlay covers, the canvas rectangle
  (x, y, w, h) and the part's (x0, x1, y0, y1) in it): the GUI panel floats
  on the right, viser's notice on software WebGL at the top left, the axes
  at the bottom left."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  rect = driver.find_element(By.TAG_NAME, 'canvas').rect
  x, y = int(rect['x']), int(rect['y'])
  w, h = int(rect['width']), int(rect['height'])
  x0, x1, y0, y1 = int(0.1 * w), int(0.62 * w), int(0.3 * h), int(0.88 * h)
  return (shot[y + y0:y + y1, x + x0:x + x1], (x, y, w, h),
          (x0, x1, y0, y1))


def _shown_in(driver, image: np.ndarray) -> tuple[float, np.ndarray]:
  """(correlation of the page's canvas with `image` stretched over it, the
  screenshot)."""
  shot = _screenshot(driver)
  part, (_, _, w, h), (x0, x1, y0, y1) = _canvas_part(driver, shot)
  stretched = np.asarray(Image.fromarray(image).resize(
      (w, h), Image.Resampling.BILINEAR))[y0:y1, x0:x1]
  a = part.astype(np.float64).mean(-1).ravel()
  b = stretched.astype(np.float64).mean(-1).ravel()
  if a.std() < 1 or b.std() < 1:
    return 0.0, shot
  return float(np.corrcoef(a, b)[0, 1]), shot


def _rounded(frame):
  return None if frame is None else np.round(frame.c2w, 4).tolist()


def _wait_shown(driver, view, predicate, what, keep, timeout=120.0):
  """Waits for a full frame meeting `predicate`, then for the page to show
  it; returns (frame, screenshot)."""
  assert view.wait_for(lambda v: v.shown_full and predicate(v.shown),
                       timeout), (
                           f'no full frame {what} within {timeout} s; the '
                           f'last: c2w {_rounded(view.shown)}, '
                           f'camera {view.camera_state()}')
  end = time.monotonic() + 30
  while True:
    frame = view.shown
    correlation, shot = _shown_in(driver, frame.image)
    if correlation > 0.95 and view.shown is frame:
      return frame, shot
    if time.monotonic() > end:
      Image.fromarray(shot).save(keep / 'failed_page.png')
      Image.fromarray(frame.image).save(keep / 'failed_frame.png')
      pytest.fail(f'the page does not show the frame {what} (correlation '
                  f'{correlation:.2f}; see {keep}/failed_*.png)')
    time.sleep(0.3)


def _marker_at(driver, shot: np.ndarray) -> np.ndarray:
  """Canvas pixel (x, y) of the magenta marker sphere's centre."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  rect = driver.find_element(By.TAG_NAME, 'canvas').rect
  x, y = int(rect['x']), int(rect['y'])
  part = shot[y:y + int(rect['height']), x:x + int(rect['width'])].astype(int)
  mask = np.minimum(part[..., 0], part[..., 2]) - part[..., 1] > 60
  assert mask.sum() > 10, 'the marker is not drawn'
  rows, cols = np.nonzero(mask)
  return np.array([cols.mean(), rows.mean()])


def _marker_expected(viewer, state, point, width, height) -> np.ndarray:
  """Where the browser's camera (principal point at the canvas centre)
  draws the dataset-world `point`, from the camera state the server saw."""
  wxyz, position, fov, _ = state
  c2w, intrinsics = viewer.camera.from_viewer(wxyz, position, fov, height,
                                              width)
  intrinsics[2:] = 0.5
  pixel, depth = camera.project_np(point, intrinsics, c2w, height, width)
  assert depth > 0
  return pixel + 0.5  # Pixel centres are at +0.5 on the canvas.


def _page_text(driver) -> str:
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  return driver.find_element(By.TAG_NAME, 'body').text


def test_a_browser_shows_and_drives_the_avatar(browser, served, tmp_path):
  from selenium.webdriver.common.action_chains import ActionChains  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  started = time.monotonic()
  viewer = served.viewer
  browser.get(served.url)
  view = served.wait_for_view(60)
  assert view is not None, 'the page never connected'

  # viser's notice about software WebGL (expected here) covers a corner.
  for button in browser.find_elements(
      By.CSS_SELECTOR, '.mantine-Notification-root button'):
    try:
      button.click()
    except Exception:  # pylint: disable=broad-except
      pass
  # The first full frame is the most frontal training camera, exactly.
  first, shot = _wait_shown(browser, view, lambda f: True, 'at all',
                             tmp_path)
  np.testing.assert_allclose(first.c2w, viewer.front_c2w, atol=1e-3)
  Image.fromarray(shot).save(tmp_path / 'first.png')
  text = _page_text(browser)
  assert 'WebGL unavailable' not in text and 'Connecting' not in text, text
  assert 'ms/frame' in text and 'rays/s' in text, text
  part = _canvas_part(browser, shot)[0]
  assert part.std() > 10, 'the canvas is blank'
  copy_to = os.environ.get('NERFACE_VIEWER_SCREENSHOT')
  if copy_to:
    # A frame whose status shows the render time, not the compilation.
    view._touch()  # pylint: disable=protected-access
    _, shot = _wait_shown(browser, view, lambda f: f is not first, 'again',
                          tmp_path)
    small = Image.fromarray(shot)
    small = small.resize((800, round(800 * small.height / small.width)),
                         Image.Resampling.LANCZOS)
    small.save(copy_to, optimize=True)

  # A marker in the browser's own 3D scene, off the optical axis, is drawn
  # where our conversion of the browser's camera projects it: the browser's
  # camera is the one we render with (rotation, mirror, position, fov).
  front = viewer.front_c2w
  point = viewer.centre + 0.04 * front[:3, 0] + 0.03 * front[:3, 1]
  view.client.scene.add_icosphere(
      '/marker', radius=0.004, color=(255, 0, 255),
      position=viewer.camera.mirror @ point)
  rect = browser.find_element(By.TAG_NAME, 'canvas').rect
  canvas_size = (int(rect['width']), int(rect['height']))

  def check_marker(state):
    end = time.monotonic() + 20
    while True:
      try:
        found = _marker_at(browser, _screenshot(browser))
        break
      except AssertionError:
        if time.monotonic() > end:
          raise
        time.sleep(0.3)
    expected = _marker_expected(viewer, state, point, *canvas_size)
    assert np.abs(found - expected).max() < 3, (found, expected)

  check_marker(view.camera_state())

  # An expression slider, moved with the mouse.
  label = browser.find_element(
      By.XPATH, f"//*[normalize-space(text())='{viewer.labels[0]}']")
  thumb = label.find_element(By.XPATH, "following::*[@role='slider'][1]")
  browser.execute_script('arguments[0].scrollIntoView({block: "center"});',
                         thumb)
  before = float(view.expression[0])
  mid = 0.5 * (float(viewer.low[0]) + float(viewer.high[0]))
  step = 50 if before < mid else -50  # Towards the far end.
  ActionChains(browser).click_and_hold(thumb).move_by_offset(
      step, 0).move_by_offset(step, 0).release().perform()
  assert view.wait_for(lambda v: abs(v.expression[0] - before) > 1e-3, 30), (
      'the server did not see the slider move')
  moved = float(view.expression[0])
  assert abs(float(thumb.get_attribute('aria-valuenow')) - moved) < 1e-3
  second, shot2 = _wait_shown(
      browser, view, lambda f: f.state.expression[0] == np.float32(moved),
      'with the moved slider', tmp_path)
  assert np.abs(second.image.astype(int) - first.image).mean() > 0.2
  assert np.abs(shot2.astype(int) - shot).mean() > 0.2

  # A drag across the canvas turns the camera.
  camera_before = view.camera_state()
  canvas = browser.find_element(By.TAG_NAME, 'canvas')
  width = canvas.rect['width']
  chain = ActionChains(browser).move_to_element_with_offset(
      canvas, -int(width * 0.25), 0).click_and_hold()
  for _ in range(6):
    chain = chain.move_by_offset(15, 0).pause(0.05)
  chain.release().perform()
  assert view.wait_for(
      lambda v: not np.allclose(v.camera_state()[0], camera_before[0],
                                atol=1e-3), 30), 'the drag did not move the camera'
  turned = view.camera_state()
  third, shot3 = _wait_shown(
      browser, view, lambda f: np.allclose(f.state.wxyz, turned[0]),
      'after the drag', tmp_path)
  check_marker(view.camera_state())
  assert np.abs(third.image.astype(int) - second.image).mean() > 0.2
  assert np.abs(shot3.astype(int) - shot2).mean() > 0.2
  assert not np.allclose(third.c2w, second.c2w, atol=1e-3)

  # "Save image" on the page writes the full frame into the workdir.
  saved_dir = pathlib.Path(viewer.avatar.workdir) / viewer_lib.SAVE_DIR
  old = set(saved_dir.glob('view_*.png'))
  browser.find_element(By.XPATH,
                       "//button[normalize-space()='Save image']").click()
  end = time.monotonic() + 60
  while not set(saved_dir.glob('view_*.png')) - old:
    assert time.monotonic() < end, 'Save image wrote nothing'
    time.sleep(0.2)
  (new,) = set(saved_dir.glob('view_*.png')) - old
  time.sleep(0.5)
  assert np.asarray(Image.open(new)).shape == view.shown.image.shape
  new.unlink()
  new.with_suffix('.json').unlink(missing_ok=True)

  # Play through the page: frames of the train split go by; pause keeps the
  # last one's expression in the view.
  play = browser.find_element(By.XPATH, "//button[normalize-space()='Play']")
  shown = view.frames_shown
  play.click()
  assert view.wait_for(lambda v: v.frames_shown >= shown + 3, 120)
  assert view.playing
  browser.find_element(By.XPATH,
                       "//button[normalize-space()='Pause']").click()
  assert view.wait_for(lambda v: not v.playing, 30)
  train = viewer.splits['train']
  np.testing.assert_array_equal(view.expression,
                                train.expressions[view.index])

  # Picking a frame snaps the browser's camera to it.
  view.pick('test', 0)
  test = viewer.splits['test']
  _wait_shown(browser, view,
              lambda f: np.allclose(f.c2w, test.c2w[0], atol=1e-3),
              'at the picked test frame', tmp_path)

  # A second tab is a view of its own, with its own thread and state.
  browser.switch_to.new_window('tab')
  browser.get(served.url)
  end = time.monotonic() + 60
  while len(served.views) < 2 and time.monotonic() < end:
    time.sleep(0.1)
  views = list(served.views.values())
  assert len(views) == 2, 'the second tab did not connect'
  other = next(v for v in views if v is not view)
  assert other.wait_for(lambda v: v.shown_full, 120)
  assert other._thread is not view._thread  # pylint: disable=protected-access
  assert other.expression[0] != np.float32(moved)
  print(f'browser test: {time.monotonic() - started:.1f} s; first tab: '
        f'{view.frames_shown} frames shown ({view.previews_shown} previews), '
        f'{view.abandoned} full renders abandoned, {view.camera_updates} '
        'camera messages')
