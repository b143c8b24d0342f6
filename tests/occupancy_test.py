"""Tests of nerface_jax.occupancy: the grid, ray-box, guided samples, chunks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import occupancy
from nerface_jax import rendering
from nerface_jax import sampling

BOX_MIN = np.array([-1.0, -1.0, -1.0], np.float32)
BOX_MAX = np.array([1.0, 1.0, 1.0], np.float32)

_sample = jax.jit(occupancy.sample, static_argnames=('num_samples',
                                                     'num_probe'))


def _random_rays(key, num):
  """Rays from a shell around the box towards random points near it."""
  k1, k2 = jax.random.split(key)
  origins = 3.0 * jax.random.normal(k1, (num, 3))
  targets = 1.3 * jax.random.uniform(k2, (num, 3), minval=-1.0, maxval=1.0)
  d = targets - origins
  # Unnormalised like the camera's: the length is arbitrary, t scales with it.
  return origins, d / jnp.linalg.norm(d, axis=-1, keepdims=True) * 0.7


def test_ray_box_matches_dense_marching():
  origins, dirs = _random_rays(jax.random.PRNGKey(0), 300)
  # Axis-parallel rays (zero direction components), inside and outside slabs.
  origins = jnp.concatenate([origins, jnp.array(
      [[0.5, 0.2, 3.0], [1.5, 0.2, 3.0], [0.0, 0.0, 0.0]])])
  dirs = jnp.concatenate([dirs, jnp.array(
      [[0.0, 0.0, -1.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])])
  near, far = 0.5, 12.0
  t_in, t_out, hit = occupancy.ray_box(origins, dirs, BOX_MIN, BOX_MAX, near,
                                       far)
  chex.assert_shape([t_in, t_out, hit], (303,))
  t_in, t_out, hit = np.asarray(t_in), np.asarray(t_out), np.asarray(hit)
  ts = np.linspace(near, far, 12001)
  step = ts[1] - ts[0]
  o, d = np.asarray(origins, np.float64), np.asarray(dirs, np.float64)
  pts = o[:, None] + ts[None, :, None] * d[:, None]
  inside = np.all((pts >= BOX_MIN) & (pts <= BOX_MAX), axis=-1)
  checked = 0
  for r in range(len(o)):
    if not inside[r].any():
      assert not hit[r], r
      continue
    first, last = ts[inside[r]][[0, -1]]
    if last - first < 3 * step:
      continue  # Too short for the marching reference to be trusted.
    checked += 1
    assert hit[r], r
    np.testing.assert_allclose(t_in[r], first, atol=1.5 * step)
    np.testing.assert_allclose(t_out[r], last, atol=1.5 * step)
  assert checked > 100
  np.testing.assert_array_equal(np.asarray(hit[-3:]), [True, False, True])
  # The origin is inside the box: it enters at near.
  np.testing.assert_allclose(t_in[-1], near)


def test_update_running_max_warmup_and_emptying():
  g = 4
  grid = occupancy.create(BOX_MIN, BOX_MAX, g)
  assert bool(jnp.all(grid.occupied)) and int(grid.step) == 0
  rng = np.random.default_rng(0)
  old = np.zeros(g**3, np.float32)
  for i in range(5):
    new = rng.uniform(0.0, 1.0, g**3).astype(np.float32)
    new[0] = 0.0  # One cell that never has any density.
    grid = occupancy.update(grid, new, decay=0.9, threshold=0.01,
                            warmup_steps=3)
    old = np.maximum(0.9 * old, new)
    chex.assert_trees_all_close(grid.density.reshape(-1), old, atol=1e-6)
    assert int(grid.step) == i + 1
    if i < 3:
      assert bool(jnp.all(grid.occupied)), i  # Warm-up: nothing culled.
    else:
      occ = np.asarray(grid.occupied).reshape(-1)
      assert not occ[0]
      np.testing.assert_array_equal(occ[1:], old[1:] > 0.01)
  # Decay forgets: after a spike, only decay * spike is left next update.
  grid = occupancy.update(grid, np.full(g**3, 5.0, np.float32), decay=0.5)
  grid = occupancy.update(grid, np.zeros(g**3, np.float32), decay=0.5)
  np.testing.assert_allclose(grid.density, 2.5)
  # The threshold follows the mean when the field is faint everywhere.
  faint = occupancy.create(BOX_MIN, BOX_MAX, g)
  dens = np.full(g**3, 1e-4, np.float32)
  dens[:8] = 2e-3
  faint = occupancy.update(faint, dens, warmup_steps=0)
  np.testing.assert_array_equal(
      np.asarray(faint.occupied).reshape(-1), dens > 1e-4)


def test_dilate_and_cell_lookup():
  g = 8
  grid = occupancy.create(BOX_MIN, BOX_MAX, g)
  dens = np.zeros((g, g, g), np.float32)
  dens[3, 4, 5] = 1.0
  one = occupancy.update(grid, dens.reshape(-1), warmup_steps=0)
  assert int(one.occupied.sum()) == 1
  grown = occupancy.update(grid, dens.reshape(-1), warmup_steps=0, dilate=1)
  expect = np.zeros((g, g, g), bool)
  expect[2:5, 3:6, 4:7] = True
  np.testing.assert_array_equal(grown.occupied, expect)
  centres = occupancy.cell_centres(one)
  chex.assert_shape(centres, (g**3, 3))
  # Flat order: cell (3, 4, 5) is row (3 * g + 4) * g + 5.
  flat = (3 * g + 4) * g + 5
  np.testing.assert_allclose(centres[flat], [-0.125, 0.125, 0.375])
  occ = occupancy.occupied_at(one, centres)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(occ)), [flat])
  # Jittered points stay inside their own cell.
  jit = occupancy.cell_centres(one, jax.random.PRNGKey(3))
  assert np.abs(np.asarray(jit - centres)).max() <= 0.125 + 1e-6
  assert np.abs(np.asarray(jit - centres)).max() > 0.05
  np.testing.assert_array_equal(occupancy.occupied_at(one, jit), occ)
  # Outside the box is never occupied, even next to an occupied cell.
  full = occupancy.create(BOX_MIN, BOX_MAX, g)
  assert not bool(occupancy.occupied_at(full, jnp.array([1.01, 0.0, 0.0])))
  t = jnp.array([[0.5, 1.5, 2.5]])
  along = occupancy.occupied_along(full, jnp.array([[0.0, 0.0, 2.0]]),
                                   jnp.array([[0.0, 0.0, -1.0]]), t)
  np.testing.assert_array_equal(along, [[False, True, True]])


def _shell_grid(g=16):
  """A grid occupied only in a spherical shell 0.4 < r < 0.7."""
  grid = occupancy.create(BOX_MIN, BOX_MAX, g)
  r = np.linalg.norm(np.asarray(occupancy.cell_centres(grid)), axis=-1)
  dens = ((r > 0.4) & (r < 0.7)).astype(np.float32)
  return occupancy.update(grid, dens, warmup_steps=0)


@pytest.mark.parametrize('num_probe', [None, 96])
def test_samples_sorted_in_range_and_in_occupied_cells(num_probe):
  grid = _shell_grid()
  origins, dirs = _random_rays(jax.random.PRNGKey(1), 512)
  near, far = 0.5, 9.0
  # Both jitter settings for the exact segments (one compile each, shared
  # with the tests below); the probed variant once, with a key.
  for key in (None, jax.random.PRNGKey(2))[(num_probe is not None):]:
    t, any_occ = _sample(key, grid, origins, dirs, near, far, num_samples=32,
                         num_probe=num_probe)
    chex.assert_shape(t, (512, 32))
    chex.assert_shape(any_occ, (512,))
    t = np.asarray(t)
    assert np.all(np.diff(t, axis=-1) >= 0)
    assert np.all((t >= np.float32(near)) & (t <= np.float32(far)))
    np.testing.assert_array_equal(t[:, -1], np.float32(far))
    # Reference any_occupied: dense marching through the grid.
    ts = jnp.linspace(near, far, 4000)[None].repeat(512, 0)
    dense = np.asarray(occupancy.occupied_along(grid, origins, dirs, ts))
    any_occ = np.asarray(any_occ)
    assert 50 < any_occ.sum() < 500
    np.testing.assert_array_equal(any_occ[dense.any(-1)], True)
    occ = np.asarray(occupancy.occupied_along(grid, origins, dirs,
                                              jnp.asarray(t[:, :-1])))
    rows = occ[any_occ]
    if num_probe is None:
      # Exact cell segments: all but rounding-level cases at a cell face.
      assert not dense[~any_occ].any()
      assert rows.mean() > 0.999, rows.mean()
      eps = 1e-4
      near_occ = (occ
                  | np.asarray(occupancy.occupied_along(
                      grid, origins, dirs, jnp.asarray(t[:, :-1] - eps)))
                  | np.asarray(occupancy.occupied_along(
                      grid, origins, dirs, jnp.asarray(t[:, :-1] + eps))))
      assert near_occ[any_occ].all()
    else:
      # Probed segments straddle cell faces: most, not all, samples inside.
      assert rows.mean() > 0.97, rows.mean()


def test_empty_grid_has_no_occupied_rays():
  g = 16
  grid = occupancy.create(BOX_MIN, BOX_MAX, g)
  grid = occupancy.update(grid, np.zeros(g**3, np.float32), warmup_steps=0)
  assert not bool(grid.occupied.any())
  origins, dirs = _random_rays(jax.random.PRNGKey(4), 512)
  for num_probe in (None, 96):
    t, any_occ = _sample(jax.random.PRNGKey(5), grid, origins, dirs, 0.5, 9.0,
                         num_samples=32, num_probe=num_probe)
    assert not bool(any_occ.any())
    t = np.asarray(t)
    assert np.all(np.isfinite(t)) and np.all(np.diff(t, axis=-1) >= 0)
    assert np.all((t >= 0.5) & (t <= 9.0))


def test_full_grid_gives_stratified_samples():
  grid = occupancy.create(BOX_MIN, BOX_MAX, 16)  # All occupied.
  # Start inside the box so the part of the ray in it is [near, t_exit].
  n_rays, num = 512, 32
  k1, k2 = jax.random.split(jax.random.PRNGKey(6))
  origins = jax.random.uniform(k1, (n_rays, 3), minval=-0.5, maxval=0.5)
  dirs = jax.random.normal(k2, (n_rays, 3))
  near, far = 0.0, 10.0
  t_in, t_out, hit = occupancy.ray_box(origins, dirs, BOX_MIN, BOX_MAX, near,
                                       far)
  assert bool(hit.all())
  t, any_occ = _sample(jax.random.PRNGKey(7), grid, origins, dirs, near, far,
                       num_samples=num, num_probe=None)
  assert bool(any_occ.all())
  n = num - 1
  rel = (np.asarray(t[:, :-1], np.float64) - np.asarray(t_in)[:, None]) / (
      np.asarray(t_out - t_in)[:, None])
  # Sample i lies in stratum i of the ray's part in the box ...
  lower = np.arange(n) / n
  assert np.all(rel >= lower - 1e-4) and np.all(rel <= lower + 1 / n + 1e-4)
  # ... uniformly: KS statistic of the within-stratum position against U(0, 1)
  # (15872 draws: the 1% critical value is 1.63 / sqrt(15872) = 0.013).
  within = np.sort(((rel - lower) * n).reshape(-1))
  ecdf = np.arange(1, within.size + 1) / within.size
  ks = np.max(np.abs(ecdf - within))
  assert ks < 0.013, ks
  # Without a key: the midpoints of the strata.
  t0, _ = _sample(None, grid, origins, dirs, near, far, num_samples=num,
                  num_probe=None)
  rel0 = (np.asarray(t0[:, :-1]) - np.asarray(t_in)[:, None]) / (
      np.asarray(t_out - t_in)[:, None])
  np.testing.assert_allclose(rel0, np.broadcast_to((lower + 0.5 / n), rel0.shape),
                             atol=1e-4)


def test_active_rays_and_compact_scatter_round_trip():
  trans = jnp.array([1.0, 1e-4, 0.5, 1e-3, 2e-3, 0.0, 0.9])
  active = np.asarray(occupancy.active_rays(trans))
  np.testing.assert_array_equal(active, [1, 0, 1, 0, 1, 0, 1])
  idx = np.flatnonzero(active)
  gather, valid = occupancy.compact(idx, 3)
  chex.assert_shape([gather, valid], (2, 3))
  np.testing.assert_array_equal(gather[valid], idx)
  assert valid.sum() == 4 and set(gather[~valid]) <= set(idx)
  # A pass on the packed rays, scattered back: active rays get new values,
  # the others keep theirs, padding lanes change nothing.
  rng = np.random.default_rng(0)
  colours = rng.uniform(size=(7, 3)).astype(np.float32)
  before = colours.copy()
  packed = colours[gather] * 2.0 + 1.0
  packed[~valid] = -99.0
  out = occupancy.scatter(colours, packed, gather, valid)
  np.testing.assert_allclose(out[active], colours[active] * 2.0 + 1.0)
  np.testing.assert_array_equal(out[~active], colours[~active])
  np.testing.assert_array_equal(colours, before)  # The target is untouched.
  none_g, none_v = occupancy.compact(np.zeros((0,), int), 4)
  chex.assert_shape([none_g, none_v], (0, 4))
  np.testing.assert_array_equal(
      occupancy.scatter(colours, np.zeros((0, 4, 3)), none_g, none_v), colours)


# The toy avatar: a soft ball (sigma falls to 0 at R) with a smooth colour.
_RADIUS = 0.5


def _field(points):
  r2 = jnp.sum(points**2, axis=-1)
  sigma = 40.0 * jnp.maximum(1.0 - r2 / _RADIUS**2, 0.0)
  rgb = 0.5 + 0.4 * jnp.sin(3.0 * points + jnp.array([0.0, 1.0, 2.0]))
  return sigma, rgb


@functools.partial(jax.jit, static_argnames=('num',))
def _render_dense(origins, dirs, bg, near, far, num):
  t = sampling.stratified(None, near, far, origins.shape[:1], num)
  sigma, rgb = _field(origins[:, None] + t[..., None] * dirs[:, None])
  return rendering.composite(rgb, sigma, t, dirs, bg).rgb


@functools.partial(jax.jit, static_argnames=('num',))
def _render_grid(grid, origins, dirs, bg, near, far, num):
  t, any_occ = occupancy.sample(None, grid, origins, dirs, near, far, num)
  sigma, rgb = _field(origins[:, None] + t[..., None] * dirs[:, None])
  out = rendering.composite(rgb, sigma, t, dirs, bg).rgb
  # What the renderer does: rays crossing no occupied cell skip the network.
  return jnp.where(any_occ[:, None], out, bg), any_occ


def test_grid_guided_render_matches_dense_render():
  g = 32
  grid = occupancy.create(BOX_MIN, BOX_MAX, g)
  key = jax.random.PRNGKey(8)
  for _ in range(3):  # Jittered refreshes, as during training.
    key, rng = jax.random.split(key)
    sigma, _ = _field(occupancy.cell_centres(grid, rng))
    # Opacity-like values: sigma times a cell's size.
    grid = occupancy.update(grid, sigma * (2.0 / g), warmup_steps=0, dilate=1)
  frac = float(grid.occupied.mean())
  assert 0.03 < frac < 0.15, frac  # The ball and its margin, not the box.

  # A camera at z = 3 looking down -z: directions with z = -1 (depth = t).
  n = 32
  xs = np.linspace(-0.3, 0.3, n, dtype=np.float32)
  px, py = np.meshgrid(xs, xs)
  dirs = jnp.asarray(np.stack([px, py, -np.ones_like(px)], -1).reshape(-1, 3))
  origins = jnp.broadcast_to(jnp.array([0.05, -0.03, 3.0]), dirs.shape)
  bg = jnp.stack([0.2 + 0.6 * (px.reshape(-1) + 0.3), jnp.full(n * n, 0.1),
                  jnp.full(n * n, 0.9)], -1)
  near, far = 1.0, 5.0
  dense = np.asarray(_render_dense(origins, dirs, bg, near, far, num=2048))
  guided, any_occ = _render_grid(grid, origins, dirs, bg, near, far, num=32)
  guided, any_occ = np.asarray(guided), np.asarray(any_occ)

  # Closest approach of each ray to the ball's centre.
  o, d = np.asarray(origins, np.float64), np.asarray(dirs, np.float64)
  tc = -np.sum(o * d, -1) / np.sum(d * d, -1)
  dist = np.linalg.norm(o + tc[:, None] * d, axis=-1)
  through = dist < _RADIUS
  assert 0.2 < through.mean() < 0.8
  assert any_occ[through].all()
  assert (~any_occ).sum() > 64  # Far rays skip the network entirely.
  err = np.abs(guided - dense).max(-1)
  assert err[through].max() < 1e-2, err[through].max()
  # Rays missing the ball: exactly the background.
  np.testing.assert_array_equal(guided[~through], np.asarray(bg)[~through])
  # The same 32 samples spread uniformly do much worse (measured 0.044 against
  # 0.003): the grid is what helps.
  uniform = np.asarray(_render_dense(origins, dirs, bg, near, far, num=32))
  assert np.abs(uniform - dense).max(-1)[through].max() > 2e-2


def test_cell_face_crossings_are_merged_in_order_as_a_sort_would():
  # Rays in every direction, some parallel to a face or to an axis, with
  # origins inside and outside the box.
  rng = np.random.default_rng(3)
  num = 512
  o = rng.normal(size=(num, 3)).astype(np.float32) * 2
  d = rng.normal(size=(num, 3)).astype(np.float32)
  d[:32, 0] = 0.0
  d[32:64, 1] = 1e-13
  d[64:96] = [0.0, 0.0, -1.0]
  grid = occupancy.create(-np.ones(3), np.ones(3), 16)
  t_enter, t_exit, hit = occupancy.ray_box(o, d, grid.box_min, grid.box_max,
                                           0.0, 10.0)
  t_enter = jnp.where(hit, t_enter, 0.0)
  t_exit = jnp.where(hit, t_exit, 10.0)
  edges = occupancy._segments(  # pylint: disable=protected-access
      grid, jnp.asarray(o), jnp.asarray(d), t_enter, t_exit, None)
  # Brute force: every plane crossing, clipped, sorted.
  planes = np.linspace(-1.0, 1.0, 17)
  safe = np.where(np.abs(d) < 1e-12, np.where(d < 0, -1e-12, 1e-12), d)
  cross = (planes[None, None, :] - o[..., None]) / safe[..., None]
  cross = np.clip(cross.reshape(num, -1), np.asarray(t_enter)[:, None],
                  np.asarray(t_exit)[:, None])
  expected = np.sort(np.concatenate(
      [np.asarray(t_enter)[:, None], cross, np.asarray(t_exit)[:, None]],
      axis=1), axis=1)
  chex.assert_shape(edges, expected.shape)
  assert np.all(np.diff(np.asarray(edges), axis=1) >= 0)
  np.testing.assert_allclose(edges, expected, rtol=0, atol=1e-5)


def test_without_margin_undoes_the_dilation_and_keeps_a_warming_grid():
  g = 16
  grid = occupancy.create(BOX_MIN, BOX_MAX, g)
  r = np.linalg.norm(np.asarray(occupancy.cell_centres(grid)), axis=-1)
  dens = np.where((r > 0.4) & (r < 0.7), 0.5, 0.0).astype(np.float32)
  tight = occupancy.update(grid, dens, warmup_steps=0)
  grown = occupancy.update(grid, dens, warmup_steps=0, dilate=1)
  assert grown.occupied.sum() > tight.occupied.sum() > 0
  np.testing.assert_array_equal(
      occupancy.without_margin(grown, threshold=0.01).occupied,
      tight.occupied)
  # While warming up every cell is occupied: nothing is culled yet.
  warming = occupancy.update(grid, dens, warmup_steps=5, dilate=1)
  assert bool(warming.occupied.all())
  np.testing.assert_array_equal(
      occupancy.without_margin(warming, threshold=0.01).occupied, True)


def test_coarse_walk_culls_only_rays_that_cross_no_occupied_cell():
  fine = _shell_grid(16)
  coarse = occupancy.coarsened(fine, 2)
  assert coarse.resolution == 8
  blocks = np.asarray(fine.occupied).reshape(8, 2, 8, 2, 8, 2)
  np.testing.assert_array_equal(coarse.occupied, blocks.any(axis=(1, 3, 5)))
  assert occupancy.coarsened(fine, 3) is None  # 3 does not divide 16.
  assert occupancy.coarsened(_shell_grid(8), 2) is None  # Under 8 cells.
  origins, dirs = _random_rays(jax.random.PRNGKey(11), 2048)
  crosses = jax.jit(occupancy.crosses_occupied)
  exact = np.asarray(crosses(fine, origins, dirs, 0.5, 9.0))
  first = np.asarray(crosses(coarse, origins, dirs, 0.5, 9.0))
  # The walk alone says what sample's walk says.
  _, any_occ = _sample(None, fine, origins, dirs, 0.5, 9.0, num_samples=4)
  np.testing.assert_array_equal(exact, any_occ)
  assert 0 < exact.sum() < exact.size
  assert np.all(first[exact])  # Never culls a ray the exact walk keeps...
  assert first.sum() < first.size  # ...and still culls some.
