"""Triangle meshes of a trained avatar for any expression (`export.py`).

The fine network's density is evaluated on a grid over the head region, in
chunks; marching cubes (scikit-image) extracts the iso-surface at a density
threshold; every vertex is coloured by the field as seen from the nearest
training camera; trimesh writes the mesh as .ply and .obj, and a numpy
z-buffer draws a preview PNG from the most frontal training camera. Vertices
are in the dataset's world coordinates (the tracked head's frame, metres in
the released data).

The region: the bounding box of the points that every training camera sees
between `data.near` and `data.far` (the overlap of the view frusta, found
exactly by six linear programmes). That is the only space every ray of
training constrains, so it needs nothing but the cameras. It is much larger
than a head (the depth range is 0.6 long), so a coarse pass over it first
finds the largest connected part above the threshold and the fine grid
covers that part's box (plus a margin) only: the resolution lands on the
head, and floaters elsewhere do not stretch the box.

The threshold: by default half the typical peak density along the frontal
training camera's rays through the face (`auto_threshold`), since the
density's scale grows as training sharpens it.

Only what the cameras saw is meaningful. Behind the visible face nothing
constrains the density (a monocular video never shows the back of the
head), so the mesh closes the head wherever the network left density there,
at the latest at the region's back face; `--box` crops it.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Optional, Sequence, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage
from skimage import measure
import trimesh

from nerface_jax import avatar as avatar_lib
from nerface_jax import camera
from nerface_jax import edits
from nerface_jax import errors
from nerface_jax import images
from nerface_jax import models
from nerface_jax import render_modes
from nerface_jax import scene
from nerface_jax import types

# The surface's density (sigma, per unit of world length: the ray parameter
# is camera depth and every interval is scaled by |d|) by default: this
# fraction of the typical peak density along the frontal training camera's
# rays through the face (`auto_threshold`). A fixed number cannot serve every
# avatar: density sharpens as training goes on (the tests' 400-step avatar
# peaks near 25, the demo preset at 500 steps near 55). Measured against the
# built-in person's true surface, the best level was 10 of a median peak of
# 23 (tests' avatar) and 20 to 30 of 53 (demo, 500 steps): half of it.
AUTO_FRACTION = 0.5
DEFAULT_RESOLUTION = 128
RESOLUTION_RANGE = (16, 1024)
# Points per call of the jitted density function: 2^16 x trunk width floats
# per layer, 32 MiB at width 128, so any preset fits in memory.
CHUNK = 1 << 16
# The coarse pass that places the fine grid: its resolution, and the margin
# (in coarse voxels) around the part it finds.
_COARSE_RESOLUTION = 48
_COARSE_MARGIN = 2
COMPONENTS = ('largest', 'all')
MIN_PREVIEW_WIDTH = 256


# ---------------------------------------------------------------------------
# The field at arbitrary points.


def _fine_field(module: models.NerfaceModel, positions: jax.Array,
                viewdirs: jax.Array, expression: jax.Array,
                latent: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The fine network at points, with one conditioning per ray.

  Applied through `NerfaceModel.apply(..., method=_fine_field)`, so it sees
  the model's own conditioning (`_condition`: expression normalisation and
  scale, gamma) and its fine ConditionedMLP.

  Args:
    module: the bound NerfaceModel.
    positions: float32 [R, S, 3] points.
    viewdirs: float32 [R, 3] unit view directions.
    expression: float32 [E] (unscaled).
    latent: float32 [L] gamma (ignored by a model without codes).

  Returns:
    rgb float32 [R, S, 3] and raw density float32 [R, S].
  """
  num = positions.shape[0]
  batch = types.Batch(
      rays=types.Rays(origins=jnp.zeros((num, 3), jnp.float32),
                      directions=viewdirs),
      rgb=jnp.zeros((num, 3), jnp.float32),
      background=jnp.zeros((num, 3), jnp.float32),
      expression=jnp.broadcast_to(expression, (num,) + expression.shape),
      frame=jnp.zeros((num,), jnp.int32),
      latent=jnp.broadcast_to(latent, (num,) + latent.shape))
  # pylint: disable-next=protected-access
  condition = module._condition(batch)
  return module.fine(positions, condition, viewdirs)


@functools.partial(jax.jit, static_argnums=0)
def _density(model: models.NerfaceModel, params: Any, points: jax.Array,
             expression: jax.Array, latent: jax.Array) -> jax.Array:
  # All points are samples of one "ray": the conditioning's share of the
  # first and the skip layer is computed once per chunk. The colour branch is
  # not used, and XLA drops it.
  _, raw = model.apply({'params': params}, points[None],
                       jnp.array([[0.0, 0.0, -1.0]], jnp.float32), expression,
                       latent, method=_fine_field)
  return jax.nn.relu(raw[0])


@functools.partial(jax.jit, static_argnums=0)
def _colour(model: models.NerfaceModel, params: Any, points: jax.Array,
            viewdirs: jax.Array, expression: jax.Array,
            latent: jax.Array) -> jax.Array:
  rgb, _ = model.apply({'params': params}, points[:, None], viewdirs,
                       expression, latent, method=_fine_field)
  return rgb[:, 0]


def _chunked(fn: Callable[..., jax.Array], arrays: Sequence[np.ndarray],
             chunk: int, progress: Optional[Callable[[int, int], None]] = None
             ) -> np.ndarray:
  """fn over the rows of `arrays` in chunks of exactly `chunk` rows (the
  last one padded), so the jitted function compiles once."""
  total = arrays[0].shape[0]
  out = []
  for start in range(0, total, chunk):
    stop = min(start + chunk, total)
    parts = []
    for a in arrays:
      part = a[start:stop]
      if stop - start < chunk:
        part = np.concatenate(
            [part, np.zeros((chunk - (stop - start),) + a.shape[1:],
                            a.dtype)])
      parts.append(part)
    out.append(np.asarray(fn(*parts))[:stop - start])
    if progress is not None:
      progress(stop, total)
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


@dataclasses.dataclass(frozen=True)
class Field:
  """The fine network of a trained model, conditioned on one expression and
  code, as functions of world points (numpy in, numpy out).

  Attributes:
    model: the NerfaceModel.
    params: its parameters.
    expression: float32 [E] (unscaled).
    latent: float32 [L].
    chunk: points per jitted call.
  """
  model: models.NerfaceModel
  params: Any
  expression: np.ndarray
  latent: np.ndarray
  chunk: int = CHUNK

  def density(self, points: np.ndarray,
              progress: Optional[Callable[[int, int], None]] = None
              ) -> np.ndarray:
    """float32 [N] volume density sigma = relu(raw) at points [N, 3]."""
    points = np.asarray(points, np.float32).reshape(-1, 3)
    return _chunked(
        lambda p: _density(self.model, self.params, p, self.expression,
                           self.latent), [points], self.chunk, progress)

  def colour(self, points: np.ndarray, viewdirs: np.ndarray) -> np.ndarray:
    """float32 [N, 3] colour at points [N, 3] seen along unit directions
    [N, 3]."""
    points = np.asarray(points, np.float32).reshape(-1, 3)
    viewdirs = np.asarray(viewdirs, np.float32).reshape(-1, 3)
    if not points.shape[0]:
      return np.zeros((0, 3), np.float32)
    return _chunked(
        lambda p, d: _colour(self.model, self.params, p, d, self.expression,
                             self.latent), [points, viewdirs],
        min(self.chunk, 1 << 14))


def avatar_field(avatar: avatar_lib.Avatar, expression: np.ndarray,
                 latent: np.ndarray) -> Field:
  """The Field of an Avatar for one expression [E] and code [L] (the
  parameters placed on the default device once, not at every chunk)."""
  return Field(avatar.model, jax.device_put(avatar.host_params),
               np.asarray(expression, np.float32),
               np.asarray(latent, np.float32))


# ---------------------------------------------------------------------------
# Region and grid.


@dataclasses.dataclass(frozen=True)
class Grid:
  """A regular grid of points: cubic voxels of side `step` from `origin`.

  Attributes:
    origin: float64 [3] the first point.
    step: voxel side.
    shape: points along x, y and z.
  """
  origin: np.ndarray
  step: float
  shape: tuple[int, int, int]

  @classmethod
  def over(cls, lo: np.ndarray, hi: np.ndarray, resolution: int) -> 'Grid':
    """`resolution` points along the box's longest side, as many at the same
    spacing as fit along the others (at least 2), centred in the box."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    size = hi - lo
    step = float(size.max()) / (resolution - 1)
    shape = tuple(max(2, int(math.floor(s / step + 1e-9)) + 1) for s in size)
    centre = 0.5 * (lo + hi)
    origin = centre - 0.5 * step * (np.asarray(shape) - 1)
    return cls(origin, step, shape)

  def points(self, x_start: int = 0,
             x_stop: Optional[int] = None) -> np.ndarray:
    """float32 [X' * Y * Z, 3] the points of x-slices x_start .. x_stop - 1
    (default all), x slowest (the order of `reshape(shape)`)."""
    x_stop = self.shape[0] if x_stop is None else x_stop
    axes = [self.origin[0] + self.step * np.arange(x_start, x_stop)] + [
        self.origin[k] + self.step * np.arange(self.shape[k])
        for k in (1, 2)]
    return np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1).reshape(
        -1, 3).astype(np.float32)

  @property
  def hi(self) -> np.ndarray:
    return self.origin + self.step * (np.asarray(self.shape) - 1)


def evaluate(density: Callable[..., np.ndarray], grid: Grid,
             progress: Optional[Callable[[int, int], None]] = None,
             block: int = 1 << 22) -> np.ndarray:
  """float32 [X, Y, Z] density(points [N, 3]) -> [N] on the grid.

  The points are made and evaluated a slab of x-slices at a time (about
  `block` points), so a fine grid never holds all its points at once. With
  `progress`, density is called as density(points, fn) and reports its own
  progress through the slab to fn(done, total); `progress` sees the grid's.
  """
  values = np.zeros(grid.shape, np.float32)
  per_slice = grid.shape[1] * grid.shape[2]
  step = max(1, block // per_slice)
  for start in range(0, grid.shape[0], step):
    stop = min(start + step, grid.shape[0])
    points = grid.points(start, stop)
    if progress is None:
      found = density(points)
    else:
      offset = start * per_slice
      found = density(points, lambda done, _, offset=offset: progress(
          offset + done, values.size))
    values[start:stop] = np.asarray(found, np.float32).reshape(
        (stop - start,) + grid.shape[1:])
  return values


def largest_component(occupied: np.ndarray) -> np.ndarray:
  """bool [X, Y, Z]: the largest 26-connected part of `occupied`."""
  labels, count = ndimage.label(occupied, structure=np.ones((3, 3, 3)))
  if count <= 1:
    return labels > 0
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return labels == int(np.argmax(sizes))


def occupied_box(values: np.ndarray, grid: Grid, threshold: float,
                 margin: int = _COARSE_MARGIN
                 ) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """The box of the largest part above `threshold`, grown by `margin` voxels
  and kept inside the grid; None when nothing exceeds the threshold."""
  part = largest_component(values > threshold)
  if not part.any():
    return None
  index = np.argwhere(part)
  lo = np.maximum(index.min(axis=0) - margin, 0)
  hi = np.minimum(index.max(axis=0) + margin, np.asarray(grid.shape) - 1)
  return grid.origin + grid.step * lo, grid.origin + grid.step * hi


# ---------------------------------------------------------------------------
# Surface.


@dataclasses.dataclass
class Mesh:
  """A triangle mesh in world coordinates.

  Attributes:
    vertices: float32 [V, 3].
    faces: int32 [T, 3], counter-clockwise seen from outside (outward
      normals by the right-hand rule).
    normals: float32 [V, 3] unit outward vertex normals (density gradient).
    colours: uint8 [V, 3] vertex colours, or None.
  """
  vertices: np.ndarray
  faces: np.ndarray
  normals: np.ndarray
  colours: Optional[np.ndarray] = None


def extract_surface(values: np.ndarray, grid: Grid, threshold: float,
                    components: str = 'largest') -> Mesh:
  """The iso-surface {density = threshold} of a grid by marching cubes.

  The volume is padded with one layer of very low density on every side,
  so the surface closes where it leaves the grid (the neck is capped flat at
  the grid's face) and the mesh is watertight.

  Args:
    values: float [X, Y, Z] density on `grid`.
    grid: the grid.
    threshold: the iso-level.
    components: 'largest' keeps the largest connected part above the
      threshold (drops floaters), 'all' keeps every part.

  Returns:
    A Mesh without colours.

  Raises:
    errors.RenderError: when the threshold is outside the density's range.
  """
  if components not in COMPONENTS:
    raise ValueError(f'components: expected one of {COMPONENTS}, got '
                     f'{components!r}.')
  values = np.asarray(values, np.float32)
  inside = values > threshold
  if not inside.any() or inside.all():
    raise errors.RenderError(
        f'--threshold={threshold:g}: no surface at that density; the density '
        f'on the grid ranges from {float(values.min()):.3g} to '
        f'{float(values.max()):.3g}.')
  if components == 'largest':
    values = np.where(largest_component(inside) | ~inside, values, 0.0)
  # So far below the threshold that the crossing to the pad, interpolated
  # linearly, lies on the grid's face (within 1e-4 of a step): the caps are
  # flat and the mesh stays inside the grid.
  pad = threshold - 1e4 * (float(values.max()) - threshold)
  padded = np.pad(values, 1, constant_values=pad)
  # 'ascent': the density rises into the head; then skimage winds every
  # triangle counter-clockwise seen from outside (a positive volume, checked
  # in the tests). Its normals point to lower density, outwards, either way.
  vertices, faces, normals, _ = measure.marching_cubes(
      padded, level=threshold, spacing=(grid.step,) * 3,
      gradient_direction='ascent', allow_degenerate=False)
  vertices = vertices + (grid.origin - grid.step)
  return Mesh(vertices.astype(np.float32), faces.astype(np.int32),
              normals.astype(np.float32))


def nearest_cameras(points: np.ndarray, c2w: np.ndarray) -> np.ndarray:
  """int [N]: for every point [N, 3], the camera [F, 4, 4] nearest to it."""
  centres = np.asarray(c2w, np.float64).reshape(-1, 4, 4)[:, :3, 3]
  points = np.asarray(points, np.float64).reshape(-1, 3)
  out = np.zeros(points.shape[0], np.int64)
  # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 does not change the argmin.
  for start in range(0, points.shape[0], 1 << 15):
    p = points[start:start + (1 << 15)]
    out[start:start + p.shape[0]] = np.argmin(
        (centres ** 2).sum(-1)[None] - 2.0 * p @ centres.T, axis=1)
  return out


def vertex_colours(field: Field, vertices: np.ndarray,
                   c2w: np.ndarray) -> np.ndarray:
  """uint8 [V, 3]: the field's colour at every vertex as seen from the
  nearest training camera (the view direction from it to the vertex)."""
  vertices = np.asarray(vertices, np.float64).reshape(-1, 3)
  centres = np.asarray(c2w, np.float64).reshape(-1, 4, 4)[:, :3, 3]
  directions = vertices - centres[nearest_cameras(vertices, c2w)]
  directions /= np.maximum(np.linalg.norm(directions, axis=-1,
                                          keepdims=True), 1e-12)
  return images.to_uint8(field.colour(vertices, directions))


# ---------------------------------------------------------------------------
# Preview: a z-buffer in numpy.


def rasterize(vertices: np.ndarray, faces: np.ndarray, c2w: np.ndarray,
              intrinsics: np.ndarray, height: int, width: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """The nearest triangle at every pixel, with the camera convention of
  docs/architecture.md §3 (pixel column i, row j at integer positions).

  Args:
    vertices: float [V, 3] world points.
    faces: int [T, 3].
    c2w: float [4, 4] camera-to-world.
    intrinsics: float [4] (fx, fy, cx, cy).
    height: H.
    width: W.

  Returns:
    triangle int64 [H, W] (-1: none) and barycentric float64 [H, W, 3]
    weights of its vertices (perspective-correct).
  """
  pixels, depth = camera.project_np(vertices, intrinsics, c2w, height, width)
  faces = np.asarray(faces, np.int64).reshape(-1, 3)
  tri_px = pixels[faces]  # [T, 3, 2]
  tri_depth = depth[faces]  # [T, 3]
  # Only triangles wholly in front of the camera and finite on screen.
  ok = np.all(tri_depth > 1e-9, axis=1) & np.all(np.isfinite(tri_px),
                                                 axis=(1, 2))
  lo = np.ceil(tri_px.min(axis=1))
  hi = np.floor(tri_px.max(axis=1))
  lo = np.maximum(lo, 0.0)
  hi = np.minimum(hi, [width - 1.0, height - 1.0])
  ok &= np.all(hi >= lo, axis=1)
  index = np.nonzero(ok)[0]
  extent = (hi[index] - lo[index]).max(axis=1) + 1  # Pixels per side.
  best = np.full(height * width, -np.inf)  # 1 / depth of the nearest.
  best_tri = np.full(height * width, -1, np.int64)
  best_bary = np.zeros((height * width, 3))
  # Triangles in buckets of similar size: each bucket tests a square of
  # candidate pixels per triangle, a few million candidates at a time.
  size = 1
  while index.size:
    in_bucket = extent <= size
    tris, index, extent = index[in_bucket], index[~in_bucket], extent[
        ~in_bucket]
    offsets = np.stack(np.meshgrid(np.arange(size), np.arange(size),
                                   indexing='ij'), -1).reshape(-1, 2)
    per_step = max(1, (1 << 22) // offsets.shape[0])
    for start in range(0, tris.size, per_step):
      t = tris[start:start + per_step]
      cand = lo[t][:, None, :] + offsets[None]  # [n, k, 2] (col, row).
      p = tri_px[t]  # [n, 3, 2]
      # Barycentric coordinates in screen space.
      v0, v1 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
      area = v0[:, 0] * v1[:, 1] - v0[:, 1] * v1[:, 0]
      with np.errstate(divide='ignore', invalid='ignore'):
        rel = cand - p[:, None, 0]
        b1 = (rel[..., 0] * v1[:, None, 1] - rel[..., 1] * v1[:, None, 0]
              ) / area[:, None]
        b2 = (v0[:, None, 0] * rel[..., 1] - v0[:, None, 1] * rel[..., 0]
              ) / area[:, None]
      b0 = 1.0 - b1 - b2
      eps = -1e-9
      inside = ((b0 >= eps) & (b1 >= eps) & (b2 >= eps) &
                (cand[..., 0] <= hi[t][:, None, 0]) &
                (cand[..., 1] <= hi[t][:, None, 1]) &
                np.isfinite(b1) & np.isfinite(b2))
      n_idx, k_idx = np.nonzero(inside)
      if not n_idx.size:
        continue
      screen = np.stack([b0[n_idx, k_idx], b1[n_idx, k_idx],
                         b2[n_idx, k_idx]], -1)
      inv = 1.0 / tri_depth[t][n_idx]  # [m, 3]
      inv_depth = (screen * inv).sum(-1)
      # Perspective-correct weights of the vertices.
      bary = screen * inv / inv_depth[:, None]
      pix = (cand[n_idx, k_idx, 1].astype(np.int64) * width +
             cand[n_idx, k_idx, 0].astype(np.int64))
      # The nearest candidate per pixel of this batch, then against the
      # buffer.
      order = np.lexsort((-inv_depth, pix))
      pix, inv_depth, bary = pix[order], inv_depth[order], bary[order]
      tri_ids = t[n_idx][order]
      first = np.ones(pix.size, bool)
      first[1:] = pix[1:] != pix[:-1]
      pix, inv_depth, bary, tri_ids = (pix[first], inv_depth[first],
                                       bary[first], tri_ids[first])
      nearer = inv_depth > best[pix]
      pix = pix[nearer]
      best[pix] = inv_depth[nearer]
      best_tri[pix] = tri_ids[nearer]
      best_bary[pix] = bary[nearer]
    size *= 2
  return best_tri.reshape(height, width), best_bary.reshape(height, width, 3)


def preview(mesh: Mesh, c2w: np.ndarray, intrinsics: np.ndarray, height: int,
            width: int, min_width: int = MIN_PREVIEW_WIDTH) -> np.ndarray:
  """The mesh seen from a camera: Lambert-shaded grey | vertex colours.

  The image is the camera's, enlarged by the smallest integer factor that
  makes it at least `min_width` wide (focal lengths scaled with it). The
  light comes from the camera, a little from above and the left.

  Returns:
    uint8 [kH, 2 kW, 3].
  """
  scale = max(1, -(-min_width // width))
  intr = np.asarray(intrinsics, np.float64).copy()
  intr[:2] *= scale
  h, w = height * scale, width * scale
  tri, bary = rasterize(mesh.vertices, mesh.faces, c2w, intr, h, w)
  hit = tri >= 0
  corners = np.asarray(mesh.faces, np.int64)[np.maximum(tri, 0)]  # [H, W, 3]
  normal = (np.asarray(mesh.normals, np.float64)[corners] *
            bary[..., None]).sum(-2)
  normal /= np.maximum(np.linalg.norm(normal, axis=-1, keepdims=True), 1e-12)
  pose = np.asarray(c2w, np.float64)
  light = pose[:3, 2] + 0.5 * pose[:3, 1] - 0.3 * pose[:3, 0]
  light /= np.linalg.norm(light)
  lambert = 0.15 + 0.85 * np.clip(normal @ light, 0.0, 1.0)
  background = np.array([0.12, 0.13, 0.15])
  grey = np.where(hit[..., None], lambert[..., None] * np.array(
      [0.85, 0.85, 0.85]), background)
  if mesh.colours is None:
    coloured = grey
  else:
    rgb = (np.asarray(mesh.colours, np.float64)[corners] / 255.0 *
           bary[..., None]).sum(-2)
    coloured = np.where(hit[..., None], rgb, background)
  return images.to_uint8(np.concatenate([grey, coloured], axis=1))


# ---------------------------------------------------------------------------
# Files.


def to_trimesh(mesh: Mesh) -> trimesh.Trimesh:
  """The mesh as a trimesh.Trimesh (vertices, faces, normals, colours kept
  as they are: no merging or reordering)."""
  kwargs = {}
  if mesh.colours is not None:
    kwargs['vertex_colors'] = np.concatenate(
        [mesh.colours, np.full((len(mesh.colours), 1), 255, np.uint8)], 1)
  return trimesh.Trimesh(vertices=mesh.vertices, faces=mesh.faces,
                         vertex_normals=mesh.normals, process=False,
                         validate=False, **kwargs)


def write_mesh(mesh: Mesh, stem: os.PathLike[str] | str) -> dict[str, Any]:
  """Writes `<stem>.ply` (binary) and `<stem>.obj` with trimesh.

  Returns:
    {'ply', 'obj': file names, 'vertices', 'faces', 'watertight',
    'winding_consistent', 'volume', 'area'}.
  """
  stem = pathlib.Path(stem)
  stem.parent.mkdir(parents=True, exist_ok=True)
  tm = to_trimesh(mesh)
  ply, obj = stem.with_suffix('.ply'), stem.with_suffix('.obj')
  tm.export(ply)
  tm.export(obj, header='written by nerface-jax export.py')
  watertight = bool(tm.is_watertight)
  return {'ply': ply.name, 'obj': obj.name, 'vertices': int(len(mesh.vertices)),
          'faces': int(len(mesh.faces)), 'watertight': watertight,
          'winding_consistent': bool(tm.is_winding_consistent),
          'volume': float(tm.volume) if watertight else None,
          'area': float(tm.area)}


# ---------------------------------------------------------------------------
# The export of `export.py`.


class ProgressBar:
  """`fn(done, total)` drawing one progress line on a stream (stderr): on a
  terminal the line is redrawn, in a log file every tenth is a new line."""

  def __init__(self, label: str, stream: TextIO = sys.stderr):
    self.label = label
    self.stream = stream
    self._tty = hasattr(stream, 'isatty') and stream.isatty()
    self._start = time.perf_counter()
    self._shown = -1

  def __call__(self, done: int, total: int):
    width = 24
    filled = int(width * done / max(total, 1))
    if not self._tty:
      tenth = int(10 * done / max(total, 1))
      if tenth == self._shown:
        return
      self._shown = tenth
    elapsed = time.perf_counter() - self._start
    eta = elapsed * (total - done) / done if done else 0.0
    line = (f'[{"#" * filled}{"." * (width - filled)}] {self.label}: '
            f'{done:,}/{total:,} points, {elapsed:.1f} s, ETA {eta:.0f} s')
    end = '\n' if not self._tty or done >= total else ''
    self.stream.write(('\r' + line + end) if self._tty else line + '\n')
    self.stream.flush()


def parse_expression(value: str, expr_dim: int) -> np.ndarray:
  """`--expression`: a .npy file of E numbers, or E comma-separated numbers.

  Raises:
    errors.RenderError: naming the flag or the file.
  """
  text = value.strip()
  if text.endswith('.npy') or os.path.exists(text):
    path = pathlib.Path(text).expanduser()
    if not path.is_file():
      raise errors.RenderError(f'--expression={value}: no such file.')
    try:
      array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise errors.RenderError(
          f'--expression={value}: not a numpy .npy file ({e}).') from None
    where = f'--expression={value}'
  else:
    try:
      array = np.array([float(v) for v in text.split(',')])
    except ValueError:
      raise errors.RenderError(
          f'--expression={value}: expected a .npy file or {expr_dim} '
          'comma-separated numbers.') from None
    where = '--expression'
  array = np.asarray(array)
  if array.dtype.kind not in 'fiu':
    raise errors.RenderError(f'{where}: expected numbers, got {array.dtype}.')
  if array.size == expr_dim:
    array = array.reshape(-1)  # [E], [1, E] or [E, 1].
  if array.shape != (expr_dim,):
    raise errors.RenderError(
        f'{where}: has shape {tuple(np.shape(array))} but the avatar\'s '
        f'expressions have {expr_dim} values.')
  if not np.all(np.isfinite(array)):
    raise errors.RenderError(f'{where}: holds values that are not finite.')
  return array.astype(np.float32)


def parse_box(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """`--box`: six numbers x0,y0,z0,x1,y1,z1 (world coordinates).

  Raises:
    errors.RenderError: naming the flag.
  """
  try:
    numbers = np.array([float(v) for v in values], np.float64)
  except ValueError:
    numbers = np.zeros(0)
  if numbers.shape != (6,) or not np.all(np.isfinite(numbers)):
    raise errors.RenderError(f'--box={",".join(values)}: expected six numbers '
                             'x0,y0,z0,x1,y1,z1.')
  lo, hi = numbers[:3], numbers[3:]
  if not np.all(hi > lo):
    raise errors.RenderError(f'--box={",".join(values)}: expected x0 < x1, '
                             'y0 < y1 and z0 < z1.')
  return lo, hi


def check_settings(resolution: int, threshold: Optional[float],
                   num: int = 1):
  """Raises errors.RenderError naming the flag of a bad setting (a None
  threshold is `auto_threshold`'s)."""
  low, high = RESOLUTION_RANGE
  if not low <= resolution <= high:
    raise errors.RenderError(f'--resolution={resolution}: expected an '
                             f'integer from {low} to {high}.')
  if threshold is not None and not (math.isfinite(threshold) and
                                    threshold > 0):
    raise errors.RenderError(f'--threshold={threshold:g}: expected a '
                             'density > 0.')
  if num < 1:
    raise errors.RenderError(f'--frames={num}: expected at least 1.')


def auto_threshold(field: Field, c2w: np.ndarray, intrinsics: np.ndarray,
                   height: int, width: int, bbox: np.ndarray, near: float,
                   far: float, rays: int = 24, samples: int = 192) -> float:
  """The default surface density: `AUTO_FRACTION` of the median, over a
  camera's rays through the face box that the field makes opaque, of the
  highest density along each ray.

  That is the middle of the density's rise at the surface the camera sees,
  whatever the density's scale, which grows as training sharpens it.

  Args:
    field: the Field.
    c2w: float [4, 4] the camera (the most frontal training camera).
    intrinsics: float [4].
    height: H.
    width: W.
    bbox: float [4] (h_min, h_max, w_min, w_max) the face box, fractions.
    near, far: the depth range sampled.
    rays: rays x rays pixels spread over the box.
    samples: evenly spaced depths per ray.

  Raises:
    errors.RenderError: when no ray is opaque (an empty field).
  """
  h0, h1, w0, w1 = (float(v) for v in bbox)
  rows = np.clip(np.linspace(h0 * height, h1 * height, rays), 0, height - 1)
  cols = np.clip(np.linspace(w0 * width, w1 * width, rays), 0, width - 1)
  pixels = np.stack(np.meshgrid(cols, rows, indexing='xy'), -1).reshape(-1, 2)
  origins, dirs = camera.rays_np(pixels, intrinsics, c2w, height, width)
  edges = np.linspace(near, far, samples + 1)
  t = 0.5 * (edges[1:] + edges[:-1])
  points = origins[:, None] + t[None, :, None] * dirs[:, None]
  sigma = field.density(points).reshape(len(pixels), samples).astype(
      np.float64)
  depth = sigma * (edges[1] - edges[0]) * np.linalg.norm(dirs, axis=-1)[
      :, None]
  opaque = 1.0 - np.exp(-depth.sum(axis=1)) > 0.9
  if not opaque.any():
    raise errors.RenderError(
        'the avatar is transparent along every ray of its frontal training '
        'camera through the face; nothing to mesh (or pass --threshold).')
  return float(AUTO_FRACTION * np.median(sigma[opaque].max(axis=1)))


def fine_grid(fields: Sequence[Field], region: tuple[np.ndarray, np.ndarray],
              resolution: int, threshold: float) -> Grid:
  """The grid every mesh of `fields` is extracted on: the union of their
  coarse passes' boxes (`occupied_box`) inside `region`, `resolution`
  points along its longest side.

  Raises:
    errors.RenderError: when some field exceeds the threshold nowhere.
  """
  coarse = Grid.over(*region, _COARSE_RESOLUTION)
  lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
  for field in fields:
    values = evaluate(field.density, coarse)
    box = occupied_box(values, coarse, threshold)
    if box is None:
      raise errors.RenderError(
          f'--threshold={threshold:g}: no point of the head region is that '
          f'dense (the density peaks at {float(values.max()):.3g}); choose a '
          'lower --threshold.')
    lo, hi = np.minimum(lo, box[0]), np.maximum(hi, box[1])
  return Grid.over(lo, hi, resolution)


def _code_used(avatar: avatar_lib.Avatar, split: str, frame: int,
               latent: Optional[str]) -> str:
  """Which code `Avatar.frame_code(split, frame, latent)` gives: 'trained'
  or the shared choice ('optimize', which needs pixels, is 'mean')."""
  if (latent is None and split == 'train' and avatar.config.model.use_latent
      and frame < avatar.num_train_frames):
    return 'trained'
  choice = latent or avatar.config.eval.latent
  return 'mean' if choice == 'optimize' else choice


def export(avatar: avatar_lib.Avatar, out: os.PathLike[str] | str,
           split: str = 'train', frame: int = 0,
           expression: Optional[np.ndarray] = None,
           coeffs: Optional[Sequence[int]] = None, low: float = -1.0,
           high: float = 1.0, num: int = 5,
           resolution: int = DEFAULT_RESOLUTION,
           threshold: Optional[float] = None,
           latent: Optional[str] = None, components: str = 'largest',
           box: Optional[tuple[np.ndarray, np.ndarray]] = None,
           stream: TextIO = sys.stderr) -> dict[str, Any]:
  """Writes meshes of the avatar: `mesh.{ply,obj,png}`, or with `coeffs` a
  sweep `sweep_<n>.{ply,obj,png}`, and `export.json`.

  Args:
    avatar: the Avatar.
    out: the output folder (`render_modes.prepare_output`'s policy).
    split: the split `frame` is taken from.
    frame: the frame whose expression (unless `expression`) and code are used.
    expression: float [E] coefficients instead of the frame's.
    coeffs: expression coefficients to sweep from `low` to `high` over `num`
      meshes (`edits.expression_sweep`); None: one mesh.
    low, high, num: the sweep.
    resolution: grid points along the longest side of the fine grid.
    threshold: the surface's density (None: `auto_threshold` of the first
      mesh's field, the same for every mesh of a sweep).
    latent: the code: None for the frame's own (its trained code on the
      train split), else `Avatar.shared_code`'s choice.
    components: 'largest' or 'all' (`extract_surface`).
    box: (lo, hi) float [3] each: the region in world coordinates instead of
      `scene.head_region`'s.
    stream: where progress goes.

  Returns:
    The export.json content: 'meshes' (per mesh: names, counts,
    watertightness, its expression), the region, the grid and the settings.
  """
  check_settings(resolution, threshold, num)
  if components not in COMPONENTS:
    raise errors.RenderError(f'--components={components}: expected one of '
                             f'{", ".join(COMPONENTS)}.')
  dataset = avatar_lib.load_dataset(avatar, split)
  if not 0 <= frame < dataset.num_frames:
    raise errors.RenderError(f'--frame={frame} is outside the {split} split '
                             f'({dataset.num_frames} frames).')
  train = dataset if split == 'train' else avatar_lib.load_dataset(
      avatar, 'train')
  base = (dataset.expressions[frame] if expression is None else
          np.asarray(expression, np.float32))
  if coeffs:
    expressions = edits.expression_sweep(base, coeffs, low, high, num)
    names = [f'sweep_{n:04d}' for n in range(num)]
  else:
    expressions = base[None].astype(np.float32)
    names = ['mesh']
  code = avatar.frame_code(split, frame, latent)
  out = render_modes.prepare_output(out)
  config = avatar.config
  if box is None:
    box = scene.head_region(train.c2w, train.intrinsics, train.height, train.width,
                      config.data.near, config.data.far)
  region = tuple(np.asarray(r, np.float64) for r in box)
  params = jax.device_put(avatar.host_params)  # Once for every mesh.
  fields = [Field(avatar.model, params, np.asarray(e, np.float32),
                  np.asarray(code, np.float32)) for e in expressions]
  front = edits.frontal_index(train.c2w, scene.head_centre(train.c2w))
  source = 'flag'
  if threshold is None:
    threshold = auto_threshold(fields[0], train.c2w[front], train.intrinsics,
                               train.height, train.width, train.bboxes[front],
                               config.data.near, config.data.far)
    source = 'auto'
    print(f'threshold: {threshold:.3g} (auto; --threshold sets it)',
          file=stream, flush=True)
  grid = fine_grid(fields, region, resolution, threshold)
  report: dict[str, Any] = {
      'step': avatar.step, 'split': split, 'frame': frame,
      'latent': _code_used(avatar, split, frame, latent),
      'threshold': threshold, 'threshold_source': source,
      'resolution': resolution,
      'components': components,
      'region': {'lo': region[0].tolist(), 'hi': region[1].tolist()},
      'grid': {'origin': grid.origin.tolist(), 'step': grid.step,
               'shape': list(grid.shape)},
      'preview_camera': {'split': 'train', 'frame': front},
      'meshes': []}
  for n, (name, field) in enumerate(zip(names, fields)):
    start = time.perf_counter()
    label = f'{name} ({n + 1}/{len(names)})'
    values = evaluate(field.density, grid, ProgressBar(label, stream))
    seconds = time.perf_counter() - start
    mesh = extract_surface(values, grid, threshold, components)
    mesh.colours = vertex_colours(field, mesh.vertices, train.c2w)
    row = write_mesh(mesh, out / name)
    picture = preview(mesh, train.c2w[front], train.intrinsics, train.height,
                      train.width)
    images.save_png(out / f'{name}.png', picture)
    row.update({'name': name, 'png': f'{name}.png',
                'grid_seconds': round(seconds, 3),
                'expression': [float(v) for v in field.expression]})
    report['meshes'].append(row)
    print(f'{name}: {row["vertices"]:,} vertices, {row["faces"]:,} faces, '
          f'{"watertight" if row["watertight"] else "not watertight"}; '
          f'grid {seconds:.1f} s', file=stream, flush=True)
  with open(out / 'export.json', 'w') as f:
    json.dump(report, f, indent=2)
  return report
