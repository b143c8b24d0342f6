"""Tests of device-side bbox-weighted ray sampling."""

import chex
import jax
import numpy as np
import pytest

from nerface_jax import camera
from nerface_jax import sampler

F, H, W, E = 3, 5, 7, 4
# Rows-first fractional boxes: a middle box, one touching the bottom-right
# corner, and one covering the whole frame.
BBOXES = np.array([[0.2, 0.6, 0.3, 0.7],
                   [0.6, 1.0, 0.5, 1.0],
                   [0.0, 1.0, 0.0, 1.0]], np.float32)


def _data(bbox_weight=0.9):
  rng = np.random.default_rng(0)
  c2w = np.tile(np.eye(4, dtype=np.float32), (F, 1, 1))
  c2w[:, :3, 3] = rng.normal(size=(F, 3))
  return sampler.prepare(
      images=rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8),
      c2w=c2w,
      expressions=rng.normal(size=(F, E)).astype(np.float32),
      bboxes=BBOXES,
      background=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
      intrinsics=np.array([-9.0, 8.0, 0.45, 0.55], np.float32),
      bbox_weight=bbox_weight)


def _brute_force_probabilities(bbox_weight):
  """The per-pixel weight map of the original code, applied as intended."""
  weights = np.full((F, H, W), 1.0 - bbox_weight)
  for f, (r0, r1, c0, c1) in enumerate(sampler.pixel_boxes(BBOXES, H, W)):
    weights[f, r0:r1, c0:c1] = bbox_weight
  return weights / weights.sum()


def test_pixel_boxes_truncate_like_the_original():
  boxes = sampler.pixel_boxes(BBOXES, H, W)
  np.testing.assert_array_equal(boxes, [[1, 3, 2, 4], [3, 5, 3, 7],
                                        [0, 5, 0, 7]])
  # A box thinner than a pixel still holds one pixel.
  thin = sampler.pixel_boxes(np.array([[0.5, 0.5, 0.99, 1.0]]), H, W)
  np.testing.assert_array_equal(thin, [[2, 3, 6, 7]])


@pytest.mark.parametrize('bbox_weight', [0.9, 0.3, 1.0])
def test_distribution_matches_the_weight_map(bbox_weight):
  data = jax.device_put(_data(bbox_weight))
  n = 400_000
  frame, pixels = jax.jit(sampler.sample_pixels, static_argnums=2)(
      jax.random.PRNGKey(1), data, n)
  frame, pixels = np.asarray(frame), np.asarray(pixels)
  assert frame.min() >= 0 and frame.max() < F
  assert pixels[:, 0].min() >= 0 and pixels[:, 0].max() < W
  assert pixels[:, 1].min() >= 0 and pixels[:, 1].max() < H
  counts = np.zeros((F, H, W))
  np.add.at(counts, (frame, pixels[:, 1], pixels[:, 0]), 1)
  expected = _brute_force_probabilities(bbox_weight) * n
  # Binomial z-scores per pixel; zero-probability pixels must never appear.
  z = (counts - expected) / np.sqrt(np.maximum(expected, 1e-9))
  assert np.all(counts[expected == 0] == 0)
  assert np.abs(z[expected > 0]).max() < 5.0, np.abs(z).max()


def test_batch_holds_the_drawn_pixels_rays_and_conditioning():
  data = jax.device_put(_data())
  batch = jax.jit(sampler.sample_batch, static_argnums=2)(
      jax.random.PRNGKey(2), data, 64)
  frame, pixels = sampler.sample_pixels(jax.random.PRNGKey(2), data, 64)
  host = jax.device_get(data)
  col, row = np.asarray(pixels[:, 0]), np.asarray(pixels[:, 1])
  frame = np.asarray(frame)
  chex.assert_trees_all_close(
      batch.rgb, host.images[frame, row, col].astype(np.float32) / 255)
  chex.assert_trees_all_close(
      batch.background, host.background[row, col].astype(np.float32) / 255)
  chex.assert_trees_all_close(batch.expression, host.expressions[frame])
  np.testing.assert_array_equal(batch.frame, frame)
  for r in range(0, 64, 7):
    ray = camera.generate_rays(np.float32([col[r], row[r]]), host.intrinsics,
                               host.c2w[frame[r]], H, W)
    chex.assert_trees_all_close(batch.rays.origins[r], ray.origins, atol=1e-6)
    chex.assert_trees_all_close(batch.rays.directions[r], ray.directions,
                                atol=1e-6)


def test_sampling_compiles_once_and_depends_only_on_the_key():
  data = jax.device_put(_data())
  draw = chex.assert_max_traces(sampler.sample_batch, n=1)
  draw = jax.jit(draw, static_argnums=2)
  a = draw(jax.random.PRNGKey(3), data, 32)
  b = draw(jax.random.PRNGKey(3), data, 32)
  c = draw(jax.random.PRNGKey(4), data, 32)
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a.frame, c.frame) or not np.array_equal(
      a.rgb, c.rgb)


def test_bad_bbox_weight_is_rejected():
  with pytest.raises(ValueError, match='bbox_weight'):
    _data(1.5)
  with pytest.raises(ValueError, match='no pixel'):
    sampler.prepare(np.zeros((1, 2, 2, 3), np.uint8), np.eye(4)[None],
                    np.zeros((1, 1)), np.array([[0, 1, 0, 1]]), None,
                    np.ones(4), 0.0)
