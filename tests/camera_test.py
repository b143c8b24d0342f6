"""Tests of nerface_jax.camera against the docs/architecture.md §3 formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import camera

H, W = 5, 7  # Non-square on purpose: catches swapped rows and columns.
# Negative fx as in the released data, off-centre principal point.
INTRINSICS = np.array([-6.5, 5.25, 0.43, 0.61], np.float32)


def _random_c2w(rng: np.random.Generator, dtype=np.float32) -> np.ndarray:
  """A random rigid camera-to-world matrix (proper rotation from a QR)."""
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))  # Makes the factorisation unique.
  if np.linalg.det(q) < 0:
    q[:, 0] = -q[:, 0]
  c2w = np.eye(4)
  c2w[:3, :3] = q
  c2w[:3, 3] = rng.normal(size=3)
  return c2w.astype(dtype)


def _brute_force_ray(i, j, intrinsics, c2w, height, width):
  """One ray, written out from the formula in float64."""
  fx, fy, cx, cy = np.asarray(intrinsics, np.float64)
  d_cam = np.array([(i - width * cx) / fx, -(j - height * cy) / fy, -1.0])
  c2w = np.asarray(c2w, np.float64)
  return c2w[:3, 3], c2w[:3, :3] @ d_cam


def test_pixel_grid_values():
  grid = camera.pixel_grid(H, W)
  chex.assert_shape(grid, (H, W, 2))
  assert grid.dtype == jnp.float32
  for j in range(H):
    for i in range(W):
      np.testing.assert_array_equal(np.asarray(grid[j, i]), [i, j])


def test_image_rays_match_brute_force_loop():
  rng = np.random.default_rng(0)
  c2w = _random_c2w(rng)
  rays = camera.image_rays(INTRINSICS, c2w, H, W)
  chex.assert_shape([rays.origins, rays.directions], (H, W, 3))
  expected_o = np.zeros((H, W, 3))
  expected_d = np.zeros((H, W, 3))
  for j in range(H):
    for i in range(W):
      expected_o[j, i], expected_d[j, i] = _brute_force_ray(
          i, j, INTRINSICS, c2w, H, W)
  chex.assert_trees_all_close(
      (rays.origins, rays.directions),
      (expected_o.astype(np.float32), expected_d.astype(np.float32)),
      atol=1e-5, rtol=0)


def test_camera_space_depth_is_one():
  # Unnormalised directions: R^T d has z = -1, so t is the camera depth.
  c2w = _random_c2w(np.random.default_rng(1))
  rays = camera.image_rays(INTRINSICS, c2w, H, W)
  d_cam = np.asarray(rays.directions) @ c2w[:3, :3]
  np.testing.assert_allclose(d_cam[..., 2], -1.0, atol=1e-5)


def test_centre_ray_of_identity_camera():
  centre = jnp.array([W * INTRINSICS[2], H * INTRINSICS[3]])
  rays = camera.generate_rays(centre, INTRINSICS, jnp.eye(4), H, W)
  chex.assert_trees_all_close(rays.directions, jnp.array([0.0, 0.0, -1.0]),
                              atol=1e-6, rtol=0)
  chex.assert_trees_all_close(rays.origins, jnp.zeros(3), atol=0, rtol=0)


def test_identity_camera_axes():
  # +i goes right (x grows for fx > 0), +j goes down (y falls for fy > 0).
  intr = np.array([4.0, 4.0, 0.5, 0.5], np.float32)
  pixels = jnp.array([[W * 0.5 + 2.0, H * 0.5], [W * 0.5, H * 0.5 + 2.0]])
  d = camera.generate_rays(pixels, intr, jnp.eye(4), H, W).directions
  chex.assert_trees_all_close(d, jnp.array([[0.5, 0, -1], [0, -0.5, -1]]),
                              atol=1e-6, rtol=0)


def test_negative_fx_mirrors_left_right():
  rng = np.random.default_rng(2)
  c2w = _random_c2w(rng)
  flipped = INTRINSICS * np.array([-1, 1, 1, 1], np.float32)
  pixels = camera.pixel_grid(H, W)
  mirrored = pixels.at[..., 0].set(2 * W * INTRINSICS[2] - pixels[..., 0])
  rays_flipped = camera.generate_rays(pixels, flipped, c2w, H, W)
  rays_mirrored = camera.generate_rays(mirrored, INTRINSICS, c2w, H, W)
  chex.assert_trees_all_close(rays_flipped, rays_mirrored, atol=1e-5, rtol=0)
  # And it really changes the rays (the test would be void otherwise).
  rays = camera.generate_rays(pixels, INTRINSICS, c2w, H, W)
  assert np.abs(rays.directions - rays_flipped.directions).max() > 0.1


def test_vmap_over_frames_equals_loop():
  rng = np.random.default_rng(3)
  c2ws = np.stack([_random_c2w(rng) for _ in range(3)])
  batched = jax.vmap(lambda c: camera.image_rays(INTRINSICS, c, H, W))(c2ws)
  chex.assert_shape(batched.directions, (3, H, W, 3))
  # Plain broadcasting of a [F, 1, 1, 4, 4] camera must agree too.
  broadcast = camera.generate_rays(
      camera.pixel_grid(H, W), INTRINSICS, c2ws[:, None, None], H, W)
  for f in range(3):
    single = camera.image_rays(INTRINSICS, c2ws[f], H, W)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[f], batched), single,
                                atol=1e-6, rtol=0)
    chex.assert_trees_all_close(jax.tree.map(lambda x: x[f], broadcast),
                                single, atol=1e-6, rtol=0)


@pytest.mark.parametrize('rows', [4, 3])
def test_per_ray_cameras(rows):
  # Training rays: each ray has its own frame's c2w ([R, 4, 4] or [R, 3, 4]).
  rng = np.random.default_rng(4)
  num_rays = 6
  c2ws = np.stack([_random_c2w(rng) for _ in range(num_rays)])[:, :rows]
  pixels = np.stack([rng.integers(0, W, num_rays),
                     rng.integers(0, H, num_rays)], -1).astype(np.float32)
  rays = camera.generate_rays(pixels, INTRINSICS, c2ws, H, W)
  chex.assert_shape([rays.origins, rays.directions], (num_rays, 3))
  for r in range(num_rays):
    o, d = _brute_force_ray(*pixels[r], INTRINSICS, c2ws[r], H, W)
    np.testing.assert_allclose(rays.origins[r], o, atol=1e-5)
    np.testing.assert_allclose(rays.directions[r], d, atol=1e-5)


def test_per_ray_intrinsics_and_traced_size():
  # Per-ray intrinsics broadcast too; height and width may be traced scalars.
  rng = np.random.default_rng(5)
  c2w = _random_c2w(rng)
  intr = np.stack([INTRINSICS, INTRINSICS * np.array([2, -1, 1, 1])])
  pixels = np.array([[1.0, 2.0], [6.0, 0.0]], np.float32)
  fn = jax.jit(camera.generate_rays)
  rays = fn(pixels, intr, c2w, jnp.int32(H), jnp.int32(W))
  for r in range(2):
    o, d = _brute_force_ray(*pixels[r], intr[r], c2w, H, W)
    np.testing.assert_allclose(rays.origins[r], o, atol=1e-5)
    np.testing.assert_allclose(rays.directions[r], d, atol=1e-5)


# --- The numpy twins ---------------------------------------------------------


def _random_intrinsics(rng: np.random.Generator, count=None) -> np.ndarray:
  """(fx, fy, cx, cy) with either focal sign and an off-centre principal
  point; [4] or [count, 4]."""
  shape = () if count is None else (count,)
  focal = rng.uniform(3.0, 12.0, shape + (2,)) * rng.choice([-1.0, 1.0],
                                                             shape + (2,))
  centre = rng.uniform(0.3, 0.7, shape + (2,))
  return np.concatenate([focal, centre], axis=-1)


@pytest.mark.parametrize('seed', range(4))
def test_rays_np_equal_generate_rays(seed):
  rng = np.random.default_rng(10 + seed)
  height, width = int(rng.integers(3, 9)), int(rng.integers(3, 9))
  if height == width:
    width += 2  # Non-square, always.
  intr = _random_intrinsics(rng)
  if seed == 0:
    intr[0] = -abs(intr[0])  # The released data's negative fx, certainly.
  c2w = _random_c2w(rng)
  pixels = rng.uniform(-1.0, max(height, width), (11, 2))
  origins, directions = camera.rays_np(pixels, intr, c2w, height, width)
  assert isinstance(directions, np.ndarray) and directions.dtype == np.float64
  assert isinstance(origins, np.ndarray) and origins.dtype == np.float64
  chex.assert_shape([origins, directions], (11, 3))
  rays = camera.generate_rays(pixels, intr, c2w, height, width)
  np.testing.assert_allclose(origins, rays.origins, atol=1e-5, rtol=0)
  np.testing.assert_allclose(directions, rays.directions, atol=1e-5, rtol=0)
  # And the brute-force formula, in float64 to float64 precision.
  for r in range(11):
    o, d = _brute_force_ray(*pixels[r], intr, c2w, height, width)
    np.testing.assert_allclose(origins[r], o, atol=1e-12, rtol=0)
    np.testing.assert_allclose(directions[r], d, atol=1e-12, rtol=0)


@pytest.mark.parametrize('rows', [4, 3])
def test_rays_np_broadcast_per_ray_cameras_and_intrinsics(rows):
  rng = np.random.default_rng(20)
  num_rays = 6
  c2ws = np.stack([_random_c2w(rng) for _ in range(num_rays)])[:, :rows]
  intr = _random_intrinsics(rng, num_rays)
  pixels = rng.uniform(0.0, W, (num_rays, 2))
  origins, directions = camera.rays_np(pixels, intr, c2ws, H, W)
  rays = camera.generate_rays(pixels, intr, c2ws, H, W)
  np.testing.assert_allclose(origins, rays.origins, atol=1e-5, rtol=0)
  np.testing.assert_allclose(directions, rays.directions, atol=1e-5, rtol=0)
  # One camera per frame over a whole image: [F, 1, 1, 4, 4] x [H, W, 2].
  grid = camera.pixel_grid_np(H, W)
  origins, directions = camera.rays_np(grid, intr[0], c2ws[:, None, None], H,
                                       W)
  chex.assert_shape([origins, directions], (num_rays, H, W, 3))
  for f in range(num_rays):
    single = camera.image_rays(intr[0], c2ws[f], H, W)
    np.testing.assert_allclose(directions[f], single.directions, atol=1e-5,
                               rtol=0)
    np.testing.assert_allclose(origins[f], single.origins, atol=1e-5, rtol=0)


def test_pixel_grid_np_and_image_rays_np():
  np.testing.assert_array_equal(camera.pixel_grid_np(H, W),
                                camera.pixel_grid(H, W))
  assert camera.pixel_grid_np(H, W).dtype == np.float64
  rng = np.random.default_rng(21)
  for _ in range(3):
    intr, c2w = _random_intrinsics(rng), _random_c2w(rng)
    directions = camera.image_rays_np(intr, c2w, H, W)
    assert directions.dtype == np.float64
    chex.assert_shape(directions, (H, W, 3))
    np.testing.assert_allclose(directions,
                               camera.image_rays(intr, c2w, H, W).directions,
                               atol=1e-5, rtol=0)
    # [3, 4] works as [4, 4] does.
    np.testing.assert_array_equal(camera.image_rays_np(intr, c2w[:3], H, W),
                                  directions)


@pytest.mark.parametrize('batched', [False, True])
def test_project_np_inverts_rays_np(batched):
  rng = np.random.default_rng(30 + batched)
  num = 9
  height, width = 6, 11
  # float64 rotations: projection takes R^T for R^-1, exact only when R is
  # orthonormal to the precision compared.
  if batched:
    c2w = np.stack([_random_c2w(rng, np.float64) for _ in range(num)])
    intr = _random_intrinsics(rng, num)
  else:
    c2w = _random_c2w(rng, np.float64)
    intr = _random_intrinsics(rng)
  pixels = rng.uniform(-2.0, 12.0, (num, 2))
  t = rng.uniform(0.1, 3.0, num)
  origins, directions = camera.rays_np(pixels, intr, c2w, height, width)
  points = origins + t[:, None] * directions
  projected, depth = camera.project_np(points, intr, c2w, height, width)
  chex.assert_shape(projected, (num, 2))
  chex.assert_shape(depth, (num,))
  np.testing.assert_allclose(projected, pixels, atol=1e-9, rtol=0)
  np.testing.assert_allclose(depth, t, atol=1e-12, rtol=0)
  # Any batch shape: [3, 3, 3] points give [3, 3, 2] pixels.
  if not batched:
    grid, grid_depth = camera.project_np(points.reshape(3, 3, 3), intr, c2w,
                                         height, width)
    np.testing.assert_allclose(grid, pixels.reshape(3, 3, 2), atol=1e-9)
    np.testing.assert_allclose(grid_depth, t.reshape(3, 3), atol=1e-12)


def test_project_np_behind_the_camera_has_negative_depth():
  c2w = np.eye(4)
  c2w[:3, 3] = [0.1, -0.2, 0.5]
  intr = np.array([-6.5, 5.25, 0.43, 0.61])
  pixels, depth = camera.project_np(
      np.array([[0.1, -0.2, 0.0], [0.1, -0.2, 1.5]]), intr, c2w, H, W)
  np.testing.assert_allclose(depth, [0.5, -1.0])
  # On the optical axis, in front or behind: the principal point.
  np.testing.assert_allclose(pixels, [[W * 0.43, H * 0.61]] * 2, atol=1e-12)
