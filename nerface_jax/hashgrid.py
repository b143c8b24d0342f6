"""Multiresolution hash encoding (Instant-NGP), in pure `jax.numpy`.

The building block of a hash-grid field: the model owns the tables as
parameters and calls `encode`; nothing here reads the config.

Shape letters (besides those of `nerface_jax.types`):
  Lv  levels of the grid            C  features per level (Instant-NGP's F;
                                       F already means frames here)
  T   rows of one level's table     N  rows of all levels together (sum of T)
  K   blend-shape coefficients (an expression: K = E, 76 or 52)

Layout. All levels' tables live in ONE float32 [N, C] array, level l in rows
`offsets[l] : offsets[l] + sizes[l]`, so the whole encoding is a single
gather of [..., Lv, 8] row indices (and its gradient a single scatter-add).
Level l has resolution r_l (cells per axis, r_l + 1 vertices); a level is
dense when its (r_l + 1)^3 vertices fit in 2**log2_table_size rows, indexed
x + y (r+1) + z (r+1)^2, else it is hashed into 2**log2_table_size rows with
the Instant-NGP spatial hash (x * 1 XOR y * 2654435761 XOR z * 805459861,
uint32 arithmetic, modulo the table size). The static description of the
grid is a hashable `GridSpec`, so `jax.jit(encode, static_argnames='grid')`
compiles once per (point shape, grid).

Points are in the grid's box normalised to [0, 1]^3 (`normalize`); `encode`
clips them, so a point outside the box gets the features of the nearest face.
Vertex i of level l sits at i / r_l (no half-cell offset), so a point on a
vertex reads exactly that vertex's row.

Memory at a typical size (16 levels, base resolution 16, max 2048, C = 2,
2**19 rows per hashed level): levels 0-4 (r = 16 ... 58) are dense, N =
6,098,925 rows, one table = 48.8 MB in float32 (the 16 * 2**19 upper bound
is 67.1 MB).
  * Plain grid: 48.8 MB of parameters; with Adam (2 moments) and a gradient,
    about 195 MB.
  * Expression-blended (`blend_tables`, NeRFBlendShape style: one mean table
    plus K delta tables): (K + 1) tables.
      K = 76: 77 tables = 3.76 GB of parameters, ~15.0 GB with Adam moments
        and a gradient (the gradient w.r.t. the deltas is dense: c_k times
        the mixed table's gradient, for every k).
      K = 52: 53 tables = 2.59 GB of parameters, ~10.3 GB with Adam and a
        gradient.
    Each `blend_tables` call also materialises one mixed table (48.8 MB).
    Mixing before the lookup needs one coefficient vector per call, i.e. a
    batch from one frame; rays of many frames would need every table looked
    up (K + 1 gathers) and the features mixed per ray, which is the same
    number (linearity) at K + 1 times the gather work.
"""

import dataclasses
from typing import Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

# The Instant-NGP spatial-hash primes (the first is 1 for x: coherence).
PRIMES = (1, 2654435761, 805459861)
INIT_SCALE = 1e-4

# Corner k of a cell is offset (k & 1, (k >> 1) & 1, (k >> 2) & 1): x fastest.
_CORNERS = np.array([[(k >> a) & 1 for a in range(3)] for k in range(8)],
                    np.uint32)  # [8, 3]


def level_resolutions(num_levels: int, base_resolution: int,
                      max_resolution: int) -> np.ndarray:
  """Per-level grid resolutions growing geometrically (Instant-NGP eq. 2-3).

  r_l = floor(base * b^l) with b = exp((ln max - ln base) / (Lv - 1)), so the
  first level is `base_resolution` and the last `max_resolution`.

  Args:
    num_levels: int Lv >= 1.
    base_resolution: int, cells per axis of the coarsest level (>= 1).
    max_resolution: int, cells per axis of the finest level (>= base).

  Returns:
    int64 [Lv] cells per axis, non-decreasing.
  """
  if num_levels < 1 or base_resolution < 1 or max_resolution < base_resolution:
    raise ValueError(f'bad grid: {num_levels} levels, resolutions '
                     f'{base_resolution}..{max_resolution}')
  if num_levels == 1:
    return np.array([base_resolution], np.int64)
  levels = np.arange(num_levels, dtype=np.float64)
  log_growth = (np.log(max_resolution) - np.log(base_resolution)) / (
      num_levels - 1)
  # The small epsilon keeps floor(2047.9999999) from losing the last level.
  res = np.floor(base_resolution * np.exp(levels * log_growth) + 1e-6)
  return res.astype(np.int64)


def table_sizes(resolutions: Sequence[int],
                log2_table_size: int) -> Tuple[np.ndarray, np.ndarray]:
  """Rows each level's table needs, and which levels are dense.

  Args:
    resolutions: int [Lv] cells per axis per level.
    log2_table_size: int, log2 of the hashed tables' row count.

  Returns:
    sizes: int64 [Lv] rows T per level: (r + 1)^3 where that is at most
      2**log2_table_size (dense, one row per vertex), else 2**log2_table_size.
    dense: bool [Lv], True where the level is dense.
  """
  vertices = (np.asarray(resolutions, np.int64) + 1)**3
  cap = 2**int(log2_table_size)
  dense = vertices <= cap
  return np.where(dense, vertices, cap).astype(np.int64), dense


@dataclasses.dataclass(frozen=True)
class GridSpec:
  """Static description of a hash grid (hashable: a jit static argument).

  Attributes:
    resolutions: Lv ints, cells per axis per level.
    sizes: Lv ints, table rows T per level.
    dense: Lv bools, whether the level is dense-indexed.
  """
  resolutions: Tuple[int, ...]
  sizes: Tuple[int, ...]
  dense: Tuple[bool, ...]

  def __post_init__(self):
    if not len(self.resolutions) == len(self.sizes) == len(self.dense):
      raise ValueError('resolutions, sizes and dense differ in length')
    for r, t, d in zip(self.resolutions, self.sizes, self.dense):
      if r < 1 or t < 1 or t >= 2**31 or (d and t < (r + 1)**3):
        raise ValueError(f'bad level: resolution {r}, size {t}, dense {d}')

  @classmethod
  def create(cls, num_levels: int, base_resolution: int, max_resolution: int,
             log2_table_size: int) -> 'GridSpec':
    """The Instant-NGP grid: geometric resolutions, dense where it fits."""
    res = level_resolutions(num_levels, base_resolution, max_resolution)
    sizes, dense = table_sizes(res, log2_table_size)
    return cls(tuple(int(r) for r in res), tuple(int(t) for t in sizes),
               tuple(bool(d) for d in dense))

  @property
  def num_levels(self) -> int:
    return len(self.resolutions)

  @property
  def offsets(self) -> Tuple[int, ...]:
    """Lv ints, first row of each level in the flat [N, C] table."""
    return tuple(int(o) for o in np.cumsum((0,) + self.sizes[:-1]))

  @property
  def num_rows(self) -> int:
    """N, rows of the flat table (sum of sizes)."""
    return int(sum(self.sizes))

  def output_dim(self, features: int) -> int:
    """Width Lv * C of `encode`'s output."""
    return self.num_levels * features


def init_tables(key: chex.PRNGKey, num_levels: int, features: int,
                sizes: Sequence[int]) -> chex.Array:
  """The flat feature table, uniform(-1e-4, 1e-4) as in Instant-NGP.

  Args:
    key: PRNG key.
    num_levels: int Lv (checked against len(sizes)).
    features: int C, features per level.
    sizes: int [Lv] rows per level (`table_sizes` or `GridSpec.sizes`).

  Returns:
    float32 [N, C], N = sum(sizes); level l in rows offsets[l]:+sizes[l].
  """
  if len(sizes) != num_levels:
    raise ValueError(f'{len(sizes)} table sizes for {num_levels} levels')
  rows = int(np.sum(np.asarray(sizes, np.int64)))
  return jax.random.uniform(key, (rows, features), jnp.float32, -INIT_SCALE,
                            INIT_SCALE)


def normalize(points: chex.Array, box_min: chex.Array,
              box_max: chex.Array) -> chex.Array:
  """Maps world points into the grid's unit cube.

  Not clipped, so the caller can still tell (or mask) points outside the
  box; `encode` clips.

  Args:
    points: float [..., 3] world positions.
    box_min: float [3] (or broadcastable) lower corner of the grid's box.
    box_max: float [3] upper corner (> box_min on every axis).

  Returns:
    float32 [..., 3], (points - box_min) / (box_max - box_min).
  """
  points = jnp.asarray(points, jnp.float32)
  box_min = jnp.asarray(box_min, jnp.float32)
  box_max = jnp.asarray(box_max, jnp.float32)
  return (points - box_min) / (box_max - box_min)


def hash_index(coords: chex.Array, table_size) -> chex.Array:
  """The Instant-NGP spatial hash of integer vertex coordinates.

  Args:
    coords: int or uint32 [..., 3] vertex coordinates (x, y, z), >= 0.
    table_size: int or uint32 [...]-broadcastable T, rows of the table.

  Returns:
    uint32 [...] (x * 1 ^ y * 2654435761 ^ z * 805459861) mod 2**32 mod T.
  """
  c = jnp.asarray(coords).astype(jnp.uint32)
  # uint32 products wrap modulo 2**32, which is the hash's definition.
  h = ((c[..., 0] * np.uint32(PRIMES[0])) ^ (c[..., 1] * np.uint32(PRIMES[1]))
       ^ (c[..., 2] * np.uint32(PRIMES[2])))
  if isinstance(table_size, (int, np.integer, np.ndarray)):
    size = np.asarray(table_size, np.uint64)
    if np.all(size & (size - 1) == 0):  # Powers of two: a mask, no division.
      return h & (size - 1).astype(np.uint32)
  return h % jnp.asarray(table_size, jnp.uint32)


def dense_index(coords: chex.Array, resolution) -> chex.Array:
  """Row of a vertex in a dense level: x + y (r + 1) + z (r + 1)^2.

  Args:
    coords: int or uint32 [..., 3] vertex coordinates in [0, r].
    resolution: int or uint32 [...]-broadcastable r, cells per axis.

  Returns:
    uint32 [...] row in [0, (r + 1)^3).
  """
  c = jnp.asarray(coords).astype(jnp.uint32)
  side = jnp.asarray(resolution, jnp.uint32) + np.uint32(1)
  return c[..., 0] + side * (c[..., 1] + side * c[..., 2])


def trilinear_weights(frac: chex.Array) -> chex.Array:
  """Weights of a cell's 8 corners for a point at `frac` inside it.

  Args:
    frac: float [..., 3] position inside the cell, in [0, 1]^3.

  Returns:
    float [..., 8]; corner k = (k & 1, (k >> 1) & 1, (k >> 2) & 1) gets
    prod_a (frac_a if bit a else 1 - frac_a). They sum to 1.
  """
  # An outer product of the per-axis pairs (z slowest, x fastest, the corner
  # order): on CPU about twice as fast as selecting per corner and axis.
  pairs = [jnp.stack([1.0 - frac[..., a], frac[..., a]], axis=-1)
           for a in range(3)]
  w = (pairs[2][..., :, None, None] * pairs[1][..., None, :, None] *
       pairs[0][..., None, None, :])
  return w.reshape(*frac.shape[:-1], 8)


def _cells(points: chex.Array, grid: GridSpec):
  """Cell corner and in-cell position of every point at every level.

  Returns:
    cell: uint32 [..., Lv, 3] lower corner, in [0, r - 1].
    frac: float32 [..., Lv, 3] position inside the cell, in [0, 1].
  """
  res = np.asarray(grid.resolutions, np.float32)[:, None]  # [Lv, 1]
  p = jnp.clip(jnp.asarray(points, jnp.float32), 0.0, 1.0)
  scaled = p[..., None, :] * res  # [..., Lv, 3]
  # The upper face (p = 1) belongs to the last cell, at frac = 1.
  cell = jnp.clip(jnp.floor(scaled), 0.0, res - 1.0)
  # floor is piecewise constant, so gradients w.r.t. points flow via frac.
  return jax.lax.stop_gradient(cell).astype(jnp.uint32), scaled - cell


def corner_rows(cell: chex.Array, grid: GridSpec) -> chex.Array:
  """Rows of the flat table holding each level's 8 cell corners.

  Args:
    cell: uint32 [..., Lv, 3] lower cell corners per level.
    grid: the grid.

  Returns:
    int32 [..., Lv, 8] rows in [0, N).
  """
  corners = cell[..., None, :] + _CORNERS  # [..., Lv, 8, 3]
  res = np.asarray(grid.resolutions, np.uint32)
  size = np.asarray(grid.sizes, np.uint32)
  dense = np.asarray(grid.dense, bool)
  offset = np.asarray(grid.offsets, np.int32)[:, None]
  side = res + np.uint32(1)
  # Per level, the factor of each axis: the dense strides (1, r + 1,
  # (r + 1)^2) or the hash primes; then a sum (dense_index) or an XOR
  # (hash_index) over the axes. Written as reductions, the rows are
  # materialised once: as elementwise ops XLA fused them into the gather
  # loop and recomputed them for every feature (encode took 1.3-1.7x as
  # long on a 2-core CPU). Dense indices of hashed levels may wrap in
  # uint32; they are discarded.
  stride = np.stack([np.ones_like(side), side, side * side], axis=-1)
  primes = np.broadcast_to(np.asarray(PRIMES, np.uint32), stride.shape)
  factor = np.where(dense[:, None], stride, primes).astype(np.uint32)
  terms = corners * factor[:, None, :]  # [..., Lv, 8, 3]
  axis = (terms.ndim - 1,)
  summed = jax.lax.reduce(terms, np.uint32(0), jax.lax.add, axis)
  xored = jax.lax.reduce(terms, np.uint32(0), jax.lax.bitwise_xor, axis)
  # Dense levels hash "into one row", so a power-of-two mask serves all
  # levels when the hashed tables have 2**log2_table_size rows.
  hash_size = np.where(dense, 1, size).astype(np.uint32)[:, None]
  if np.all(hash_size & (hash_size - 1) == 0):
    hashed = xored & (hash_size - np.uint32(1))
  else:
    hashed = xored % hash_size
  rows = jnp.where(dense[:, None], summed, hashed)
  return rows.astype(jnp.int32) + offset


def encode(points: chex.Array, tables: chex.Array,
           grid: GridSpec) -> chex.Array:
  """Multiresolution hash encoding of points.

  jit with `grid` static: `jax.jit(encode, static_argnames='grid')`.

  Args:
    points: float [..., 3] positions in the grid's box normalised to [0, 1]^3
      (`normalize`); clipped to it.
    tables: float32 [N, C] flat feature table (`init_tables`, or
      `blend_tables`), N = grid.num_rows.
    grid: the grid's static description.

  Returns:
    float32 [..., Lv * C], level-major: level l's C features at
    [l * C:(l + 1) * C], each the trilinear blend of its cell's 8 corners.
    The caller casts to its compute dtype.
  """
  tables = jnp.asarray(tables, jnp.float32)
  if tables.ndim != 2 or tables.shape[0] != grid.num_rows:
    raise ValueError(f'tables of shape {tables.shape} for a grid of '
                     f'{grid.num_rows} rows')
  cell, frac = _cells(points, grid)
  weights = trilinear_weights(frac)  # [..., Lv, 8]
  rows = corner_rows(cell, grid)  # [..., Lv, 8]
  # One gather for every level; rows are in range by construction.
  feats = tables.at[rows].get(mode='promise_in_bounds')  # [..., Lv, 8, C]
  # The 8-term sum written out fuses with the gather into one loop; as an
  # einsum (a batched [8] x [8, C] product per level) it took 4x as long on
  # a 2-core CPU (16,384 points: 7.2 ms against 2.0 ms).
  out = weights[..., 0, None] * feats[..., 0, :]
  for k in range(1, 8):
    out = out + weights[..., k, None] * feats[..., k, :]  # [..., Lv, C]
  return out.reshape(*out.shape[:-2], -1)


def blend_tables(mean_table: chex.Array, delta_tables: chex.Array,
                 coefficients: chex.Array, low, high) -> chex.Array:
  """Expression-blended table (NeRFBlendShape): mean + sum_k c_k delta_k.

  The mixing happens before the lookup, so one `encode` of the result costs
  what a plain grid does; `encode` is linear in the table, so this equals
  mixing the features looked up in every table.

  Args:
    mean_table: float32 [N, C].
    delta_tables: float32 [K, N, C].
    coefficients: float [K] one expression's coefficients.
    low: float scalar or [K] lower bound per coefficient.
    high: float scalar or [K] upper bound per coefficient (>= low).

  Returns:
    float32 [N, C] the mixed table, with c clipped to [low, high].
  """
  mean_table = jnp.asarray(mean_table, jnp.float32)
  delta_tables = jnp.asarray(delta_tables, jnp.float32)
  c = jnp.clip(jnp.asarray(coefficients, jnp.float32),
               jnp.asarray(low, jnp.float32), jnp.asarray(high, jnp.float32))
  chex.assert_shape(c, (delta_tables.shape[0],))
  return mean_table + jnp.tensordot(c, delta_tables, axes=1)
