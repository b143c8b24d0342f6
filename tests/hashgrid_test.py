"""Tests of nerface_jax.hashgrid against brute-force python references."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import hashgrid

# A small grid with both kinds of level: (4+1)^3 = 125 rows fit in 2**9 = 512
# (dense); 9^3, 17^3, 33^3 do not (hashed). Powers of two make every vertex of
# a coarse level a vertex of the finer ones, and k / 32 exact in float32.
LOG2_T = 9
RES = (4, 8, 16, 32)
SIZES, DENSE = hashgrid.table_sizes(RES, LOG2_T)
GRID = hashgrid.GridSpec(RES, tuple(int(s) for s in SIZES),
                         tuple(bool(d) for d in DENSE))
C = 3  # Features per level; 3 rather than 2 catches a swapped reshape.
P1, P2 = 2654435761, 805459861

_encode = jax.jit(hashgrid.encode, static_argnames='grid')


def _tables(seed, grid=GRID, features=C):
  """Random normal tables (far larger than the init) so mixing shows."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(grid.num_rows, features)).astype(np.float32)


def _ref_hash(x, y, z, size):
  """The Instant-NGP hash with python ints: wrap to 32 bits by hand."""
  return ((x * 1) ^ (y * P1) ^ (z * P2)) % 2**32 % size


def _ref_row(vertex, level, grid):
  r, size = grid.resolutions[level], grid.sizes[level]
  x, y, z = (int(v) for v in vertex)
  if grid.dense[level]:
    row = x + y * (r + 1) + z * (r + 1)**2
  else:
    row = _ref_hash(x, y, z, size)
  assert 0 <= row < size
  return grid.offsets[level] + row


def _ref_encode(point, tables, grid=GRID):
  """Trilinear interpolation written out per level and corner, in float64."""
  p = np.clip(np.asarray(point, np.float64), 0.0, 1.0)
  tables = np.asarray(tables, np.float64)
  out = []
  for level, r in enumerate(grid.resolutions):
    x = p * r
    cell = np.minimum(np.floor(x), r - 1)
    frac = x - cell
    acc = np.zeros(tables.shape[1])
    for bits in itertools.product((0, 1), repeat=3):
      b = np.array(bits)
      w = np.prod(np.where(b == 1, frac, 1.0 - frac))
      acc += w * tables[_ref_row(cell + b, level, grid)]
    out.append(acc)
  return np.concatenate(out)


def test_level_resolutions_and_sizes():
  res = hashgrid.level_resolutions(16, 16, 2048)
  chex.assert_shape(res, (16,))
  assert res[0] == 16 and res[-1] == 2048
  assert np.all(np.diff(res) > 0)
  # Geometric: successive ratios all close to b = 128 ** (1 / 15).
  np.testing.assert_allclose(res[1:] / res[:-1], 128**(1 / 15), rtol=0.05)
  np.testing.assert_array_equal(hashgrid.level_resolutions(1, 8, 8), [8])
  sizes, dense = hashgrid.table_sizes(res, 19)
  # 58 + 1 = 59^3 <= 2**19 < 81^3: the first five levels are dense.
  np.testing.assert_array_equal(dense, [True] * 5 + [False] * 11)
  np.testing.assert_array_equal(sizes[:5], (res[:5] + 1)**3)
  np.testing.assert_array_equal(sizes[5:], 2**19)
  grid = hashgrid.GridSpec.create(16, 16, 2048, 19)
  assert grid.num_rows == 6_098_925 and grid.output_dim(2) == 32
  assert grid.offsets[:2] == (0, 17**3)
  hash(grid)  # A jit static argument must be hashable.
  with pytest.raises(ValueError):
    hashgrid.GridSpec((4,), (64,), (True,))  # 125 vertices in 64 rows.


def test_init_tables():
  tables = hashgrid.init_tables(jax.random.PRNGKey(0), GRID.num_levels, 2,
                                GRID.sizes)
  chex.assert_shape(tables, (GRID.num_rows, 2))
  assert tables.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(tables))) <= 1e-4
  assert float(jnp.std(tables)) > 3e-5  # Not all zeros: uniform std 5.8e-5.
  with pytest.raises(ValueError):
    hashgrid.init_tables(jax.random.PRNGKey(0), 3, 2, GRID.sizes)


def test_hash_matches_python_ints():
  rng = np.random.default_rng(0)
  for high, size in [(2**12, 2**19), (2**32, 2**19), (2**32, 1_000_003),
                     (2**32, 2**32 - 1), (2**20, 7)]:
    coords = rng.integers(0, high, size=(500, 3), dtype=np.uint64)
    got = np.asarray(hashgrid.hash_index(coords.astype(np.uint32), size))
    assert got.dtype == np.uint32
    want = [_ref_hash(int(x), int(y), int(z), size) for x, y, z in coords]
    np.testing.assert_array_equal(got.astype(np.int64), want)
  # The wrap-around matters: a hash of the full 64-bit product differs.
  x, y, z = 3, 2**31 + 5, 2**30 + 1
  unwrapped = (x ^ (y * P1) ^ (z * P2)) % 1_000_003
  assert _ref_hash(x, y, z, 1_000_003) != unwrapped


def test_dense_index_matches_python_ints_and_is_a_bijection():
  rng = np.random.default_rng(1)
  for r in [1, 4, 37, 80, 1290]:
    coords = rng.integers(0, r + 1, size=(300, 3))
    got = np.asarray(hashgrid.dense_index(coords, r)).astype(np.int64)
    want = [x + y * (r + 1) + z * (r + 1)**2 for x, y, z in coords]
    np.testing.assert_array_equal(got, want)
  r = 5
  all_vertices = np.stack(np.meshgrid(*[np.arange(r + 1)] * 3), -1)
  rows = np.asarray(hashgrid.dense_index(all_vertices.reshape(-1, 3), r))
  np.testing.assert_array_equal(np.sort(rows), np.arange((r + 1)**3))


# Hashed tables whose row counts are not powers of two (a modulo, no mask).
ODD_GRID = hashgrid.GridSpec((4, 8, 16), (125, 500, 1000), (True, False, False))


@pytest.mark.parametrize('grid', [GRID, ODD_GRID], ids=['pow2', 'odd'])
def test_corner_rows_match_reference(grid):
  rng = np.random.default_rng(2)
  res = grid.resolutions
  cells = np.stack([rng.integers(0, r, size=(50, 3)) for r in res], 1)
  rows = np.asarray(hashgrid.corner_rows(jnp.asarray(cells, jnp.uint32), grid))
  chex.assert_shape(rows, (50, len(res), 8))
  for i, level, k in itertools.product(range(50), range(len(res)), range(8)):
    corner = cells[i, level] + [(k >> a) & 1 for a in range(3)]
    assert rows[i, level, k] == _ref_row(corner, level, grid)


def test_encode_matches_brute_force():
  rng = np.random.default_rng(3)
  tables = _tables(3)
  # Inside, outside (clipped) and exactly on the faces of the box.
  points = np.concatenate([
      rng.uniform(0, 1, (40, 3)), rng.uniform(-0.5, 1.5, (20, 3)),
      [[0, 0, 0], [1, 1, 1], [1, 0, 0.5]]]).astype(np.float32)
  got = _encode(points, tables, grid=GRID)
  chex.assert_shape(got, (len(points), len(RES) * C))
  assert got.dtype == jnp.float32
  want = np.stack([_ref_encode(p, tables) for p in points])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The upper face belongs to the last cell (frac 1), so every corner row
  # stays inside its own level's block of the flat table.
  cell, frac = hashgrid._cells(points, GRID)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.max(cell, axis=(0, 2)), np.array(RES) - 1)
  assert float(jnp.max(frac)) == 1.0
  rows = np.asarray(hashgrid.corner_rows(cell, GRID))
  offsets, sizes = np.array(GRID.offsets), np.array(GRID.sizes)
  assert np.all((rows >= offsets[:, None]) &
                (rows < (offsets + sizes)[:, None]))


def test_trilinear_weights_are_a_partition_of_unity():
  frac = jax.random.uniform(jax.random.PRNGKey(4), (1000, 3))
  w = hashgrid.trilinear_weights(frac)
  chex.assert_shape(w, (1000, 8))
  assert float(jnp.min(w)) >= 0.0
  np.testing.assert_allclose(jnp.sum(w, -1), 1.0, rtol=1e-6)
  # Corner k sits at its bits: all its weight there, none elsewhere.
  corners = jnp.array([[(k >> a) & 1 for a in range(3)] for k in range(8)],
                      jnp.float32)
  chex.assert_trees_all_equal(hashgrid.trilinear_weights(corners),
                              jnp.eye(8, dtype=jnp.float32))


def test_vertex_reads_its_row_exactly():
  tables = _tables(5)
  rng = np.random.default_rng(5)
  # Multiples of 1/4 are vertices at every level (1.0 is the last vertex).
  vertices = rng.integers(0, 5, size=(30, 3)) / 4.0
  got = np.asarray(_encode(vertices.astype(np.float32), tables, grid=GRID))
  for v, feats in zip(vertices, got):
    want = [tables[_ref_row(np.round(v * r), level, GRID)]
            for level, r in enumerate(RES)]
    np.testing.assert_array_equal(feats, np.concatenate(want))


def test_linear_along_a_cell_edge_and_axis_lines():
  tables = _tables(6)
  t = np.linspace(0, 1, 7, dtype=np.float32)[:, None]
  # An edge of a finest cell (so of a cell at every level), then an
  # axis-aligned segment through a cell's interior.
  for start, axis in [((5, 17, 30), 0), ((9.3, 2.6, 20.5), 2)]:
    a = np.array(start, np.float32) / 32
    b = a + np.eye(3, dtype=np.float32)[axis] / 32
    if axis == 2:
      b = a + np.eye(3, dtype=np.float32)[axis] * 0.4 / 32
    ends = _encode(np.stack([a, b]), tables, grid=GRID)
    line = _encode(a + t * (b - a), tables, grid=GRID)
    np.testing.assert_allclose(line, (1 - t) * ends[0] + t * ends[1],
                               rtol=1e-5, atol=1e-5)


def test_gradient_wrt_tables_matches_finite_differences():
  tables = jnp.asarray(_tables(7))
  key1, key2, key3 = jax.random.split(jax.random.PRNGKey(7), 3)
  points = jax.random.uniform(key1, (64, 3))
  readout = jax.random.normal(key2, (64, len(RES) * C))
  loss = lambda tb: jnp.sum(readout * hashgrid.encode(points, tb, GRID))
  grad = jax.jit(jax.grad(loss))(tables)
  chex.assert_tree_all_finite(grad)
  assert float(jnp.max(jnp.abs(grad))) > 0
  for key in jax.random.split(key3, 3):
    direction = jax.random.normal(key, tables.shape)
    # The loss is linear in the tables: a unit step is exact in theory.
    fd = (loss(tables + direction) - loss(tables - direction)) / 2
    np.testing.assert_allclose(jnp.vdot(grad, direction), fd, rtol=1e-3)
  # Rows that no point touches get no gradient.
  touched = np.zeros(GRID.num_rows, bool)
  cell, _ = hashgrid._cells(points, GRID)  # pylint: disable=protected-access
  touched[np.asarray(hashgrid.corner_rows(cell, GRID)).ravel()] = True
  assert np.all(np.asarray(grad)[~touched] == 0)


def test_gradient_wrt_points_inside_a_cell():
  tables = _tables(8)
  rng = np.random.default_rng(8)
  # Away from every cell face of the finest level (and so of all levels).
  points = ((rng.integers(0, 32, (10, 3)) + rng.uniform(0.2, 0.8, (10, 3))) /
            32).astype(np.float32)
  readout = rng.normal(size=len(RES) * C)
  f = lambda p: jnp.dot(hashgrid.encode(p, tables, GRID), readout)
  grads = jax.jit(jax.vmap(jax.grad(f)))(points)
  eps = 1e-5  # Float64 reference: trilinear is linear along each axis.
  for p, g in zip(points.astype(np.float64), np.asarray(grads)):
    fd = [(_ref_encode(p + eps * e, tables) - _ref_encode(p - eps * e, tables))
          @ readout / (2 * eps) for e in np.eye(3)]
    np.testing.assert_allclose(g, fd, rtol=2e-4, atol=2e-4)


def test_blend_before_lookup_equals_mixing_features():
  k = 4
  mean = jnp.asarray(_tables(9))
  deltas = jnp.stack([jnp.asarray(_tables(10 + i)) for i in range(k)])
  low, high = -jnp.ones(k), jnp.array([1.0, 2.0, 0.5, 1.0])
  coeffs = jnp.array([0.3, -0.7, 0.4, 0.9])  # All inside their ranges.
  points = jax.random.uniform(jax.random.PRNGKey(9), (50, 3))
  mixed = hashgrid.blend_tables(mean, deltas, coeffs, low, high)
  chex.assert_shape(mixed, mean.shape)
  got = _encode(points, mixed, grid=GRID)
  each = jax.vmap(lambda tb: _encode(points, tb, grid=GRID))(deltas)
  want = _encode(points, mean, grid=GRID) + jnp.einsum('k,kpd->pd', coeffs,
                                                       each)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)
  # Out-of-range coefficients act as their bound, per coefficient.
  wild = jnp.array([-3.0, 5.0, 0.7, 0.2])
  clipped = jnp.array([-1.0, 2.0, 0.5, 0.2])
  chex.assert_trees_all_close(
      hashgrid.blend_tables(mean, deltas, wild, low, high),
      hashgrid.blend_tables(mean, deltas, clipped, low, high), atol=1e-6)
  unclipped = mean + jnp.tensordot(wild, deltas, axes=1)
  assert not np.allclose(hashgrid.blend_tables(mean, deltas, wild, low, high),
                         unclipped)


def test_jit_vmap_and_eager_agree_and_compile_once():
  tables = jnp.asarray(_tables(11))
  points = jax.random.uniform(jax.random.PRNGKey(11), (2, 5, 3))
  eager = hashgrid.encode(points, tables, GRID)
  chex.assert_shape(eager, (2, 5, len(RES) * C))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def jitted(p, tb):
    return hashgrid.encode(p, tb, GRID)

  chex.assert_trees_all_close(jitted(points, tables), eager, atol=1e-6)
  chex.assert_trees_all_close(
      jitted(points + 0.1, tables * 2),  # New values, same shapes: no retrace.
      hashgrid.encode(points + 0.1, tables * 2, GRID), atol=1e-6)
  mapped = jax.vmap(functools.partial(hashgrid.encode, tables=tables,
                                      grid=GRID))(points.reshape(10, 3))
  chex.assert_trees_all_close(mapped.reshape(eager.shape), eager, atol=1e-6)
  # A single point (batch shape ()) and bfloat16 points give float32 out.
  single = hashgrid.encode(points[0, 0].astype(jnp.bfloat16), tables, GRID)
  assert single.dtype == jnp.float32 and single.shape == (len(RES) * C,)
  # normalize maps the box's corners to the unit cube's.
  box_min, box_max = jnp.array([-1.0, 0.0, 2.0]), jnp.array([1.0, 4.0, 3.0])
  chex.assert_trees_all_close(
      hashgrid.normalize(jnp.stack([box_min, box_max, (box_min + box_max) / 2]),
                         box_min, box_max),
      jnp.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]))
