"""Tests of mesh export (export.py): region, grid, marching cubes, colours,
files, preview, and the surface of a trained avatar against the generator's."""

import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
from scipy import spatial
import trimesh

from nerface_jax import avatar as avatar_lib
from nerface_jax import camera
from nerface_jax import edits
from nerface_jax import errors
from nerface_jax import mesh
from nerface_jax import rendering
from nerface_jax import scene
from nerface_jax import synthetic
from nerface_jax import types

REPO = pathlib.Path(__file__).resolve().parent.parent

# The test avatar (24x24 images, 400 steps) is blurry: the density along
# its rays peaks near 25 per metre, and its surface is closest to the
# generator's at levels of about 10 (measured from 5 to 20); the automatic
# threshold picks about 12.
AVATAR_RESOLUTION = 96
# One pixel of the 24-pixel training images at the head's distance (0.5 m,
# focal 1.2 x 24 pixels) is about 17 mm.
PIXEL = synthetic.DISTANCE / (synthetic.FOCAL * 24)


# ---------------------------------------------------------------------------
# The generator's surface: the union of its solids.


def _inside(prim, points: np.ndarray) -> np.ndarray:
  """bool [N]: points strictly inside a primitive's solid."""
  local = (points - prim.centre) @ prim.rotation
  f = np.zeros(len(points))
  for k in range(3):
    if np.isfinite(prim.radii[k]):
      f = f + (local[:, k] / prim.radii[k]) ** 2
  inside = f < 1.0 - 1e-6
  if prim.name == 'neck':
    inside &= (local[:, 1] > -0.6) & (local[:, 1] < -0.02)
  return inside


def generator_surface(expression: np.ndarray, n: int = 60) -> np.ndarray:
  """float64 [N, 3] points on the outer surface of the synthetic person.

  Every primitive's surface sampled on a latitude-longitude grid, keeping the
  points that no other solid contains (eyelids taken closed: the slit of an
  open eye is 1.4 mm deep).
  """
  # pylint: disable=protected-access
  prims = synthetic._primitives(np.asarray(expression, np.float64))
  theta, phi = np.meshgrid(np.linspace(0.0, np.pi, n),
                           np.linspace(0.0, 2 * np.pi, 2 * n, endpoint=False),
                           indexing='ij')
  unit = np.stack([np.sin(theta) * np.cos(phi), np.cos(theta),
                   np.sin(theta) * np.sin(phi)], -1).reshape(-1, 3)
  found = []
  for i, prim in enumerate(prims):
    if prim.name == 'neck':
      ys, angle = np.meshgrid(np.linspace(-0.6, -0.02, 4 * n),
                              np.linspace(0, 2 * np.pi, 2 * n), indexing='ij')
      local = np.stack([prim.radii[0] * np.cos(angle), ys,
                        prim.radii[2] * np.sin(angle)], -1).reshape(-1, 3)
    else:
      local = unit * prim.radii
    points = prim.centre + local @ prim.rotation.T
    keep = np.ones(len(points), bool)
    for j, other in enumerate(prims):
      if j != i:
        keep &= ~_inside(other, points)
    found.append(points[keep])
  return np.concatenate(found)


def _face(points: np.ndarray) -> np.ndarray:
  """bool [N]: the part every training camera sees well: the front of the
  head (z > 0.02) above the neck (y > -0.09)."""
  return (points[:, 2] > 0.02) & (points[:, 1] > -0.09)


# ---------------------------------------------------------------------------
# Pure parts.


def _sphere(centre, radius):
  """A density that rises linearly into a sphere: 50 at its surface."""

  def density(points):
    r = np.linalg.norm(np.asarray(points, np.float64) - centre, axis=-1)
    return np.maximum(0.0, 50.0 + 2000.0 * (radius - r)).astype(np.float32)

  return density


def test_marching_cubes_finds_an_analytic_sphere():
  centre, radius = np.array([0.01, -0.02, 0.03]), 0.08
  grid = mesh.Grid.over(centre - 0.1, centre + 0.1, 48)
  assert grid.shape == (48, 48, 48)
  np.testing.assert_allclose(grid.hi - grid.origin, 0.2)
  values = mesh.evaluate(_sphere(centre, radius), grid)
  m = mesh.extract_surface(values, grid, 50.0)
  r = np.linalg.norm(m.vertices - centre, axis=-1)
  # Linear interpolation along the edges of a curved surface: the error is
  # of order step^2 / (8 R), a few microns here (step 4.3 mm).
  assert np.abs(r - radius).max() < 0.02 * grid.step
  radial = (m.vertices - centre) / r[:, None]
  assert np.min(np.sum(m.normals * radial, axis=-1)) > 0.99  # Outwards.
  tm = mesh.to_trimesh(m)
  assert tm.is_watertight and tm.is_winding_consistent
  # Positive volume: triangles wound counter-clockwise seen from outside.
  assert tm.volume == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.01)


def test_the_surface_closes_where_it_leaves_the_grid():
  # A sphere cut by the grid's box: the padding caps it, still watertight.
  centre, radius = np.zeros(3), 0.08
  grid = mesh.Grid.over(np.array([-0.1, -0.1, 0.0]), np.full(3, 0.1), 32)
  m = mesh.extract_surface(mesh.evaluate(_sphere(centre, radius), grid),
                           grid, 50.0)
  tm = mesh.to_trimesh(m)
  assert tm.is_watertight
  # The cap lies on the grid's face.
  assert m.vertices[:, 2].min() > grid.origin[2] - 1e-3 * grid.step
  cap = m.vertices[np.abs(m.vertices[:, 2] - grid.origin[2]) < 1e-3 * grid.step]
  assert np.linalg.norm(cap, axis=-1).max() < radius + 1e-3 * grid.step
  # The grid lies in the box; the ball's cap above the grid's face h >= 0.
  h = grid.origin[2]
  assert 0 <= h < grid.step and np.all(grid.hi <= 0.1 + 1e-12)
  expected = math.pi * (radius - h) ** 2 * (2 * radius + h) / 3
  assert tm.volume == pytest.approx(expected, rel=0.005)


def test_largest_component_drops_floaters_and_bad_thresholds_are_named():
  grid = mesh.Grid.over(np.full(3, -0.2), np.full(3, 0.2), 40)
  big, small = _sphere(np.zeros(3), 0.1), _sphere(np.full(3, 0.15), 0.02)
  values = np.maximum(mesh.evaluate(big, grid), mesh.evaluate(small, grid))
  assert mesh.to_trimesh(mesh.extract_surface(
      values, grid, 50.0, 'all')).body_count == 2
  largest = mesh.extract_surface(values, grid, 50.0, 'largest')
  assert np.linalg.norm(largest.vertices, axis=-1).max() < 0.1 + grid.step
  with pytest.raises(errors.RenderError, match=r'--threshold=1e\+06'):
    mesh.extract_surface(values, grid, 1e6)


def _in_frustum(points, c2w, intr, height, width, near, far):
  pixels, depth = camera.project_np(points, intr, c2w, height, width)
  return ((depth >= near) & (depth <= far) & (pixels[..., 0] >= 0) &
          (pixels[..., 0] <= width - 1) & (pixels[..., 1] >= 0) &
          (pixels[..., 1] <= height - 1))


def test_frustum_overlap_is_the_box_of_points_all_cameras_see():
  size, near, far = 24, 0.2, 0.8
  c2w = synthetic.trajectory(12, seed=3).c2w
  intr = synthetic.default_intrinsics(size)
  lo, hi = scene.frustum_overlap(c2w, intr, size, size, near, far)
  rng = np.random.default_rng(0)
  points = rng.uniform(-1.0, 1.0, (100_000, 3))
  seen = np.ones(len(points), bool)
  for pose in c2w:
    seen &= _in_frustum(points, pose, intr, size, size, near, far)
  inside = points[seen]
  assert len(inside) > 1000
  # Every point all cameras see lies in the box, and the box is tight.
  assert np.all(inside >= lo - 1e-9) and np.all(inside <= hi + 1e-9)
  np.testing.assert_allclose(inside.min(0), lo, atol=0.03)
  np.testing.assert_allclose(inside.max(0), hi, atol=0.03)
  # The head (at the origin) is well inside it.
  assert np.all(lo < -0.15) and np.all(hi > 0.15)
  # Cameras looking in opposite directions share no point.
  turn = np.diag([-1.0, 1.0, -1.0])  # Half a turn about y.
  back = edits.rotate_about(c2w[0], turn, np.zeros(3))
  assert scene.frustum_overlap(np.stack([c2w[0], back]), intr, size, size,
                              0.2, 0.3) is None


def _cast(vertices, faces, c2w, intr, height, width):
  """Brute force: the nearest triangle hit by every pixel's ray."""
  origins, dirs = camera.rays_np(camera.pixel_grid_np(height, width), intr,
                                 c2w, height, width)
  o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
  tri = vertices[faces]  # [T, 3, 3]
  e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
  p = np.cross(d[:, None], e2[None])  # [P, T, 3]
  det = np.sum(e1[None] * p, -1)
  with np.errstate(divide='ignore', invalid='ignore'):
    s = o[:, None] - tri[None, :, 0]
    u = np.sum(s * p, -1) / det
    q = np.cross(s, e1[None])
    v = np.sum(d[:, None] * q, -1) / det
    t = np.sum(e2[None] * q, -1) / det
  hit = (u >= 0) & (v >= 0) & (u + v <= 1) & (t > 0)
  t = np.where(hit, t, np.inf)
  best = np.argmin(t, axis=1)
  best[~np.isfinite(t.min(axis=1))] = -1
  return best.reshape(height, width)


def test_rasterize_agrees_with_ray_casting():
  sphere = trimesh.creation.icosphere(subdivisions=2, radius=0.08)
  vertices = np.asarray(sphere.vertices) + [0.0, 0.01, 0.0]
  faces = np.asarray(sphere.faces)
  size = 40
  intr = synthetic.default_intrinsics(size)
  c2w = synthetic.trajectory(5, seed=1).c2w[2]
  tri, bary = mesh.rasterize(vertices, faces, c2w, intr, size, size)
  expected = _cast(vertices, faces, c2w, intr, size, size)
  assert (tri >= 0).sum() > 150  # The sphere covers about 180 pixels.
  # Pixels on a shared edge may go either way.
  assert np.mean(tri == expected) > 0.99
  np.testing.assert_allclose(bary.sum(-1)[tri >= 0], 1.0, atol=1e-9)
  # The interpolated point is the ray's hit: it projects onto its pixel.
  points = np.einsum('hwk,hwkc->hwc', bary, vertices[faces[np.maximum(tri,
                                                                      0)]])
  pixels, _ = camera.project_np(points, intr, c2w, size, size)
  grid = camera.pixel_grid_np(size, size)
  np.testing.assert_allclose(pixels[tri >= 0], grid[tri >= 0], atol=1e-6)


def test_parse_expression_and_box_name_the_flag(tmp_path):
  np.testing.assert_allclose(mesh.parse_expression('1,2,3', 3), [1, 2, 3])
  np.save(tmp_path / 'e.npy', np.arange(4.0)[None])
  np.testing.assert_allclose(mesh.parse_expression(str(tmp_path / 'e.npy'),
                                                   4), np.arange(4.0))
  for value, message in (('1,2', 'has shape'), ('1,x,3', 'comma-separated'),
                         (str(tmp_path / 'none.npy'), 'no such file'),
                         ('1,nan,3', 'not finite')):
    with pytest.raises(errors.RenderError, match='--expression'):
      mesh.parse_expression(value, 3)
    with pytest.raises(errors.RenderError, match=message):
      mesh.parse_expression(value, 3)
  (tmp_path / 'bad.npy').write_text('not numpy')
  with pytest.raises(errors.RenderError, match='bad.npy: not a numpy'):
    mesh.parse_expression(str(tmp_path / 'bad.npy'), 3)
  lo, hi = mesh.parse_box('-1,-2,-3,1,2,3'.split(','))
  np.testing.assert_allclose(hi, -lo)
  for value in ('1,2,3', '0,0,0,1,1,x', '0,0,0,1,-1,1'):
    with pytest.raises(errors.RenderError, match='--box'):
      mesh.parse_box(value.split(','))
  for args, flag in (((8, 50.0), '--resolution=8'),
                     ((64, 0.0), '--threshold=0'),
                     ((64, 50.0, 0), '--frames=0')):
    with pytest.raises(errors.RenderError, match=flag):
      mesh.check_settings(*args)


# ---------------------------------------------------------------------------
# The trained built-in person.


def test_the_field_is_the_fine_network_of_rendering(trained_avatar):
  # Density and colour from mesh.Field, composited at the fine network's
  # own samples, give the model's own weights and colour: the conditioning
  # (expression scale, latent code) is the one of training and rendering.
  avatar = trained_avatar
  dataset = avatar_lib.load_dataset(avatar, 'train')
  frame = 3
  code = avatar.frame_code('train', frame)
  pixels = np.array([[12, 12], [10, 14], [14, 9], [3, 20]], np.float32)
  rays = camera.generate_rays(pixels, dataset.intrinsics, dataset.c2w[frame],
                              avatar.height, avatar.width)
  num = len(pixels)
  batch = types.Batch(
      rays=rays, rgb=jnp.zeros((num, 3)), background=jnp.full((num, 3), 0.5),
      expression=jnp.tile(dataset.expressions[frame], (num, 1)),
      frame=jnp.zeros((num,), jnp.int32), latent=jnp.tile(code, (num, 1)))
  _, fine = jax.jit(avatar.model.apply)({'params': avatar.host_params}, batch)
  field = mesh.avatar_field(avatar, dataset.expressions[frame], code)
  o, d = np.asarray(rays.origins), np.asarray(rays.directions)
  t = np.asarray(fine.t)
  points = o[:, None] + t[..., None] * d[:, None]
  sigma = field.density(points).reshape(t.shape)
  viewdirs = d / np.linalg.norm(d, axis=-1, keepdims=True)
  rgb = field.colour(points, np.repeat(viewdirs, t.shape[1], 0)).reshape(
      t.shape + (3,))
  again = rendering.composite(jnp.asarray(rgb), jnp.asarray(sigma),
                              jnp.asarray(t), rays.directions,
                              batch.background)
  np.testing.assert_allclose(again.weights, fine.weights, atol=1e-4)
  np.testing.assert_allclose(again.rgb, fine.rgb, atol=1e-4)
  assert float(np.max(sigma)) > 10.0


@pytest.fixture(scope='module')
def jaw_sweep(trained_avatar, tmp_path_factory):
  """Meshes of training frame 0 with the jaw closed (0) and open (1)."""
  out = tmp_path_factory.mktemp('export') / 'out'
  report = mesh.export(trained_avatar, out, frame=0, coeffs=[synthetic.JAW],
                       low=0.0, high=1.0, num=2,
                       resolution=AVATAR_RESOLUTION)
  return out, report


def test_export_writes_meshes_previews_and_a_report(jaw_sweep,
                                                   trained_avatar):
  out, report = jaw_sweep
  assert json.loads((out / 'export.json').read_text()) == json.loads(
      json.dumps(report))
  assert [m['name'] for m in report['meshes']] == ['sweep_0000', 'sweep_0001']
  for row in report['meshes']:
    for suffix in ('ply', 'obj'):
      loaded = trimesh.load(out / row[suffix], process=False)
      assert len(loaded.vertices) == row['vertices'] > 1000
      assert len(loaded.faces) == row['faces']
      colours = np.asarray(loaded.visual.vertex_colors)[:, :3]
      assert colours.std() > 5  # Coloured by the field, not one colour.
    # The padded grid closes the surface: a watertight, outward mesh.
    assert row['watertight'] and row['winding_consistent']
    assert row['volume'] > 0
    picture = np.asarray(Image.open(out / row['png']))
    assert picture.shape[0] >= 256 and picture.shape[1] == 2 * picture.shape[0]
    grey = picture[:, :picture.shape[1] // 2].astype(np.float64)
    background = np.all(grey == grey[0, 0], axis=-1)
    assert 0.1 < 1 - background.mean() < 0.9  # The head, not blank.
    assert grey[~background].std() > 10  # Shaded, not flat.
  # The sweep sets the jaw and keeps the rest of frame 0's expression.
  dataset = avatar_lib.load_dataset(trained_avatar, 'train')
  for value, row in zip((0.0, 1.0), report['meshes']):
    expected = dataset.expressions[0].copy()
    expected[synthetic.JAW] = value
    np.testing.assert_allclose(row['expression'], expected, atol=1e-6)
  assert report['latent'] == 'trained'
  # Skin at the nose tip: the field's colour, red above green above blue.
  closed = trimesh.load(out / report['meshes'][0]['ply'], process=False)
  near_nose = np.linalg.norm(np.asarray(closed.vertices) - synthetic.NOSE_TIP,
                             axis=-1) < 0.02
  red, green, blue = np.asarray(
      closed.visual.vertex_colors)[near_nose, :3].mean(0)
  # Measured 154, 115, 98 (the generator's skin albedo 0.86, 0.64, 0.52).
  assert red > green + 20 and green > blue + 5, (red, green, blue)
  # The automatic threshold lands where the surface fits best (about 10).
  assert report['threshold_source'] == 'auto'
  assert 6.0 < report['threshold'] < 16.0, report['threshold']


def test_export_errors_name_the_flag(trained_avatar, tmp_path):
  busy = tmp_path / 'busy'
  busy.mkdir()
  (busy / 'notes.txt').write_text('mine')
  with pytest.raises(errors.RenderError, match='did not write'):
    mesh.export(trained_avatar, busy)
  assert sorted(p.name for p in busy.iterdir()) == ['notes.txt']
  with pytest.raises(errors.RenderError, match='--frame=999'):
    mesh.export(trained_avatar, tmp_path / 'a', frame=999)
  with pytest.raises(errors.RenderError, match=r'--threshold=1e\+09.*peaks'):
    mesh.export(trained_avatar, tmp_path / 'b', threshold=1e9)
  with pytest.raises(errors.RenderError, match='--coeff=76'):
    mesh.export(trained_avatar, tmp_path / 'c', coeffs=[76])


def _surface_samples(tm: trimesh.Trimesh, count: int = 200_000) -> np.ndarray:
  """float64 [count, 3] points spread over a mesh's triangles (about a
  millimetre apart on a head), so distances to them are distances to the
  surface, not to its vertices."""
  return np.asarray(trimesh.sample.sample_surface(tm, count, seed=0)[0])


def test_the_surface_lies_near_the_generators(jaw_sweep):
  out, report = jaw_sweep
  row = report['meshes'][0]
  tm = trimesh.load(out / row['ply'], process=False)
  vertices = np.asarray(tm.vertices)
  truth = generator_surface(np.asarray(row['expression']), n=100)
  # Accuracy: the exported face's vertices lie near the true surface.
  accuracy, _ = spatial.cKDTree(truth).query(vertices[_face(vertices)])
  # Completeness: the true face lies near the exported surface.
  completeness, _ = spatial.cKDTree(_surface_samples(tm)).query(
      truth[_face(truth)])
  # Measured: accuracy median 7 mm, 90% 13 mm; completeness median 7 mm,
  # 90% 13 mm: under a pixel (17 mm) of the training images.
  assert np.median(accuracy) < 0.6 * PIXEL, np.median(accuracy)
  assert np.percentile(accuracy, 90) < 1.1 * PIXEL
  assert np.median(completeness) < 0.6 * PIXEL, np.median(completeness)
  assert np.percentile(completeness, 90) < 1.1 * PIXEL


def test_opening_the_jaw_moves_the_chin_more_than_the_forehead(jaw_sweep):
  out, report = jaw_sweep
  closed, opened = (trimesh.load(out / m['ply'], process=False)
                    for m in report['meshes'])
  # Landmarks from the generator: the chin below and behind the nose tip,
  # the forehead above the eyes.
  chin = np.asarray(synthetic.NOSE_TIP) + [0.0, -0.09, -0.05]
  forehead = np.mean(synthetic.EYE_CENTRES, axis=0) + [0.0, 0.05, 0.0]
  trees = [spatial.cKDTree(_surface_samples(m)) for m in (closed, opened)]

  def moved(landmark):
    """Mean distance from each mesh's vertices within 3 cm of `landmark` to
    the other mesh's surface."""
    found = []
    for a, other in ((closed, trees[1]), (opened, trees[0])):
      vertices = np.asarray(a.vertices)
      near = vertices[np.linalg.norm(vertices - landmark, axis=-1) < 0.03]
      assert len(near) > 20
      found.append(other.query(near)[0])
    return np.concatenate(found).mean()

  # Measured: the chin 6.9 mm, the forehead 2.3 mm (the generator's chin
  # moves by about 2 cm; the 24-pixel avatar learns part of it).
  assert moved(chin) > 2 * moved(forehead), (moved(chin), moved(forehead))
  assert moved(chin) > 4e-3


def test_command_line_exports_and_reports_errors(trained_workdir, tmp_path):
  expression = tmp_path / 'expr.npy'
  np.save(expression, np.zeros(synthetic.EXPR_DIM, np.float32))

  def run(*args):
    return subprocess.run(
        [sys.executable, str(REPO / 'export.py'),
         f'--workdir={trained_workdir}', *args], capture_output=True,
        text=True, cwd=REPO, timeout=300, check=False)

  result = run(f'--out={tmp_path / "out"}', f'--expression={expression}',
               '--resolution=32', '--threshold=10')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'points' in result.stderr  # The progress bar.
  names = sorted(p.name for p in (tmp_path / 'out').iterdir())
  assert names == ['.nerface-render', 'export.json', 'mesh.obj', 'mesh.ply',
                   'mesh.png']
  report = json.loads((tmp_path / 'out' / 'export.json').read_text())
  assert report['meshes'][0]['expression'] == [0.0] * synthetic.EXPR_DIM
  assert report['resolution'] == 32
  assert report['threshold'] == 10.0 and report['threshold_source'] == 'flag'
  for args, message in (
      ([f'--out={tmp_path / "o"}', '--expression=1,2'],
       "--expression: has shape (2,) but the avatar's expressions have 76"),
      ([f'--out={tmp_path / "o"}', '--resolution=4'], '--resolution=4')):
    result = run(*args)
    assert result.returncode == 2, args  # cli.USAGE_EXIT.
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('export.py: error: ') and message in last, (
        args, last)
    assert not (tmp_path / 'o').exists()
