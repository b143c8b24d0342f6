"""Pinhole camera rays in the NeRFace (OpenGL) convention.

The released NeRFace data stores intrinsics as `[fx, fy, cx, cy]` with fx and
fy in SIGNED pixels and cx, cy as fractions of the image width and height. The
camera looks down its -z axis with +y up, so pixel column i and row j map to

  d = R @ [(i - W*cx) / fx, -(j - H*cy) / fy, -1],   o = t,

where R and t are the rotation and translation of the camera-to-world matrix.
Directions are not normalised: a ray parameter is then the camera depth.

`generate_rays` and `image_rays` are the JAX versions (float32, jit-able).
`rays_np`, `image_rays_np` and `project_np` are their numpy twins (float64,
no JAX calls) for host-side code: the synthetic person's ray caster, the
video preprocessor's projections and render-time helpers. `project_np` is the
exact inverse of `rays_np`: a point `o + t * d` projects to the pixel of `d`
at depth `t`.
"""

from typing import Union

import chex
import jax.numpy as jnp
import numpy as np

from nerface_jax import types

Size = Union[int, chex.Array]


def pixel_grid(height: int, width: int) -> chex.Array:
  """Integer pixel coordinates of a whole image.

  Args:
    height: int H, image height in pixels.
    width: int W, image width in pixels.

  Returns:
    float32 [H, W, 2] holding (column i, row j) of every pixel; no half-pixel
    offset, as in the original NeRFace code.
  """
  cols, rows = jnp.meshgrid(
      jnp.arange(width, dtype=jnp.float32),
      jnp.arange(height, dtype=jnp.float32),
      indexing='xy')
  return jnp.stack([cols, rows], axis=-1)


def generate_rays(pixels: chex.Array, intrinsics: chex.Array, c2w: chex.Array,
                  height: Size, width: Size) -> types.Rays:
  """World-space rays through pixels (docs/architecture.md §3).

  All batch shapes broadcast against each other, so one camera can serve a
  whole image ([4, 4] with [H, W, 2] pixels) and training rays drawn from many
  frames can carry a camera each ([R, 4, 4] with [R, 2] pixels).

  Args:
    pixels: float [..., 2] (column i, row j) pixel coordinates.
    intrinsics: float [4] or [..., 4] (fx, fy, cx, cy) as in the dataset json:
      fx, fy signed focal lengths in pixels, cx, cy fractions of W and H.
    c2w: float [4, 4], [..., 4, 4] or [..., 3, 4] camera-to-world matrices.
    height: int or scalar array H, image height in pixels.
    width: int or scalar array W, image width in pixels.

  Returns:
    Rays with float32 [..., 3] origins (the camera centre) and unnormalised
    directions whose camera-space z component is -1.
  """
  pixels = jnp.asarray(pixels, jnp.float32)
  intrinsics = jnp.asarray(intrinsics, jnp.float32)
  c2w = jnp.asarray(c2w, jnp.float32)
  fx, fy, cx, cy = (intrinsics[..., k] for k in range(4))
  i, j = pixels[..., 0], pixels[..., 1]
  x = (i - width * cx) / fx
  # Image rows grow downwards while the camera's y axis points up.
  y = -(j - height * cy) / fy
  dirs_cam = jnp.stack([x, y, -jnp.ones_like(x)], axis=-1)
  rotation = c2w[..., :3, :3]
  # A broadcast multiply-and-sum instead of a matmul: exact float32 on every
  # backend (GPU matmuls may drop to TF32) and it broadcasts batch shapes.
  directions = jnp.sum(rotation * dirs_cam[..., None, :], axis=-1)
  origins = jnp.broadcast_to(c2w[..., :3, 3], directions.shape)
  return types.Rays(origins=origins, directions=directions)


def image_rays(intrinsics: chex.Array, c2w: chex.Array, height: int,
               width: int) -> types.Rays:
  """Rays through every pixel of one image.

  Args:
    intrinsics: float [4] (fx, fy, cx, cy) as in the dataset json.
    c2w: float [4, 4] or [3, 4] camera-to-world matrix.
    height: int H (static: it sets the output shape).
    width: int W (static: it sets the output shape).

  Returns:
    Rays with float32 [H, W, 3] origins and directions.
  """
  return generate_rays(pixel_grid(height, width), intrinsics, c2w, height,
                       width)


# --- numpy twins (float64, host side) -----------------------------------------


def pixel_grid_np(height: int, width: int) -> np.ndarray:
  """`pixel_grid` in numpy: float64 [H, W, 2] (column i, row j)."""
  cols, rows = np.meshgrid(np.arange(width, dtype=np.float64),
                           np.arange(height, dtype=np.float64), indexing='xy')
  return np.stack([cols, rows], axis=-1)


def rays_np(pixels: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray,
            height: float, width: float) -> tuple[np.ndarray, np.ndarray]:
  """`generate_rays` in numpy float64: world rays through pixels.

  Batch shapes broadcast as in `generate_rays`.

  Args:
    pixels: float [..., 2] (column i, row j) pixel coordinates; integers are
      the pixels' own positions (no half-pixel offset).
    intrinsics: float [4] or [..., 4] (fx, fy, cx, cy) as in the dataset
      json: fx, fy signed focal lengths in pixels, cx, cy fractions of W, H.
    c2w: float [4, 4], [3, 4], [..., 4, 4] or [..., 3, 4] camera-to-world.
    height: H, image height in pixels.
    width: W, image width in pixels.

  Returns:
    (origins, directions): float64 [..., 3] each, the batch shape being the
    broadcast of pixels [...], intrinsics [...] and c2w [...]. Origins are
    the camera centre (a fresh array); directions are unnormalised with
    camera-space z component -1, so a ray parameter is the camera depth.
  """
  pixels = np.asarray(pixels, np.float64)
  intrinsics = np.asarray(intrinsics, np.float64)
  c2w = np.asarray(c2w, np.float64)
  fx, fy, cx, cy = (intrinsics[..., k] for k in range(4))
  x = (pixels[..., 0] - width * cx) / fx
  # Image rows grow downwards while the camera's y axis points up.
  y = -(pixels[..., 1] - height * cy) / fy
  r = c2w[..., :3, :3]
  # R @ [x, y, -1] written out per component (the synthetic person's images
  # are cached on disk and depend on this exact float64 arithmetic).
  directions = np.stack(
      [r[..., k, 0] * x + r[..., k, 1] * y - r[..., k, 2] for k in range(3)],
      axis=-1)
  origins = np.broadcast_to(c2w[..., :3, 3], directions.shape).copy()
  return origins, directions


def image_rays_np(intrinsics: np.ndarray, c2w: np.ndarray, height: int,
                  width: int) -> np.ndarray:
  """Ray directions through every pixel of one image, numpy float64.

  Args:
    intrinsics: float [4] (fx, fy, cx, cy) as in the dataset json.
    c2w: float [4, 4] or [3, 4] camera-to-world matrix.
    height: int H.
    width: int W.

  Returns:
    float64 [H, W, 3] unnormalised directions (camera-space z = -1); the
    origin of every ray is c2w[:3, 3].
  """
  _, directions = rays_np(pixel_grid_np(height, width), intrinsics, c2w,
                          height, width)
  return directions


def project_np(points: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray,
               height: float, width: float) -> tuple[np.ndarray, np.ndarray]:
  """World points -> pixel coordinates and depth: `rays_np` inverted.

  From R^T (p - t) = depth * [(i - W cx) / fx, -(j - H cy) / fy, -1]. For a
  point `o + s * d` on a ray of `rays_np`, this returns that ray's pixel and
  s. Points behind the camera get a negative depth (and mirrored pixels);
  points in the camera plane inf or nan pixels, without a warning.

  Args:
    points: float [..., 3] world points.
    intrinsics: float [4] or [..., 4] (fx, fy, cx, cy) as in the dataset.
    c2w: float [4, 4], [3, 4], [..., 4, 4] or [..., 3, 4] camera-to-world
      (rigid: its rotation's inverse is taken to be its transpose).
    height: H, image height in pixels.
    width: W, image width in pixels.

  Returns:
    (pixels float64 [..., 2] (column i, row j), depth float64 [...] camera
    depth, i.e. the ray parameter), batch shapes broadcast.
  """
  points = np.asarray(points, np.float64)
  intrinsics = np.asarray(intrinsics, np.float64)
  c2w = np.asarray(c2w, np.float64)
  rel = points - c2w[..., :3, 3]
  if c2w.ndim == 2:
    cam = rel @ c2w[:3, :3]  # R^T p for row vectors.
  else:
    cam = (rel[..., None, :] @ c2w[..., :3, :3])[..., 0, :]
  depth = -cam[..., 2]
  fx, fy, cx, cy = (intrinsics[..., k] for k in range(4))
  with np.errstate(divide='ignore', invalid='ignore'):
    pixels = np.stack([width * cx + fx * cam[..., 0] / depth,
                       height * cy - fy * cam[..., 1] / depth], axis=-1)
  return pixels, depth
