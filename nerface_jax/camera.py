"""Pinhole camera rays in the NeRFace (OpenGL) convention.

The released NeRFace data stores intrinsics as `[fx, fy, cx, cy]` with fx and
fy in SIGNED pixels and cx, cy as fractions of the image width and height. The
camera looks down its -z axis with +y up, so pixel column i and row j map to

  d = R @ [(i - W*cx) / fx, -(j - H*cy) / fy, -1],   o = t,

where R and t are the rotation and translation of the camera-to-world matrix.
Directions are not normalised: a ray parameter is then the camera depth.
"""

from typing import Union

import chex
import jax.numpy as jnp

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
  """World-space rays through pixels (DESIGN.md section 3).

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
