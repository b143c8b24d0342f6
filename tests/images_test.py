"""Tests of the image helpers."""

import numpy as np

from nerface_jax import images


def test_normals_of_a_plane_facing_the_camera_point_at_it():
  depth = np.full((8, 10), 0.5)
  image = images.normals_image(depth, np.ones((8, 10)),
                               np.float32([-12, 12, 0.5, 0.5]))
  np.testing.assert_allclose(image[2:-2, 2:-2].reshape(-1, 3).mean(0),
                             [128, 128, 255], atol=2)
  empty = images.normals_image(depth, np.zeros((8, 10)),
                               np.float32([-12, 12, 0.5, 0.5]))
  assert empty.max() == 0


def test_normals_of_a_tilted_plane_lean_the_right_way():
  # Depth growing to the right (fx > 0: columns grow along +x): the surface
  # recedes on the right, so its normal leans to +x (red above 128).
  cols = np.arange(10, dtype=np.float64)
  depth = np.tile(0.5 + 0.01 * cols, (8, 1))
  image = images.normals_image(depth, np.ones((8, 10)),
                               np.float32([12, 12, 0.5, 0.5]))
  assert image[4, 5, 0] > 145 and image[4, 5, 2] > 230


def test_to_uint8_rounds_and_clips():
  np.testing.assert_array_equal(
      images.to_uint8(np.array([-0.5, 0.0, 0.5 / 255, 1.5 / 255, 1.0, 2.0])),
      [0, 0, 1, 2, 255, 255])


def test_upscale_is_nearest_neighbour_to_the_width():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  big = images.upscale(image, 256)
  assert big.shape == (2 * 86, 3 * 86, 3)
  np.testing.assert_array_equal(big[::86, ::86], image)
  np.testing.assert_array_equal(big[85, 85], image[0, 0])
  wide = np.zeros((4, 300, 3), np.uint8)
  assert images.upscale(wide, 256) is wide


def test_depth_image_is_bright_near_and_dark_far():
  out = images.depth_image(np.array([[0.2, 0.8]]), 0.2, 0.8)
  assert out[0, 0].sum() > out[0, 1].sum()
