"""Image helpers of rendered frames (numpy, host side): quantisation,
colour-mapped depth, normals, upscaling and PNG files."""

import os
import pathlib

import numpy as np
from PIL import Image

from nerface_jax import camera


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float [..., 3] in [0, 1] -> uint8 (rounded, clipped)."""
  return (np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255 + 0.5).astype(
      np.uint8)


def depth_image(depth: np.ndarray, near: float, far: float) -> np.ndarray:
  """A colour-mapped depth map: uint8 [H, W, 3] (near bright, far dark).

  Args:
    depth: float [H, W] depths.
    near: depth shown brightest.
    far: depth shown darkest.
  """
  x = np.clip((far - np.asarray(depth, np.float64)) / (far - near), 0.0, 1.0)
  # A perceptually ordered blue -> orange -> yellow ramp, cheap to compute.
  r = np.clip(1.6 * x - 0.2, 0, 1)
  g = np.clip(1.6 * x - 0.6, 0, 1) * 0.9 + 0.1 * x
  b = np.clip(0.6 - 1.2 * np.abs(x - 0.35), 0, 1)
  return (np.stack([r, g, b], axis=-1) * 255 + 0.5).astype(np.uint8)


def normals_image(depth: np.ndarray, acc: np.ndarray,
                  intrinsics: np.ndarray) -> np.ndarray:
  """Camera-space normals of the rendered surface, as colours.

  The surface is the depth map lifted through the frame's rays; normals are
  cross products of its finite differences, shown in the camera's frame
  (x right: red, y up: green, z towards the viewer: blue) so that a face
  turned to the camera reads the same in every frame.

  Args:
    depth: float [H, W] depths.
    acc: float [H, W] foreground opacity (below 0.5 shows black).
    intrinsics: float [4] (fx, fy, cx, cy).

  Returns:
    uint8 [H, W, 3].
  """
  height, width = depth.shape
  rays = camera.image_rays_np(intrinsics, np.eye(4), height, width)
  points = rays * np.asarray(depth, np.float64)[..., None]  # Camera space.
  du = np.gradient(points, axis=1)
  dv = np.gradient(points, axis=0)
  normals = np.cross(dv, du)
  # Orient towards the camera (which looks down -z), whatever the sign of fx.
  normals *= np.where(normals[..., 2:] < 0, -1.0, 1.0)
  normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)
  colour = (normals * 0.5 + 0.5) * (np.asarray(acc) >= 0.5)[..., None]
  return to_uint8(colour)


def upscale(image: np.ndarray, min_width: int = 256) -> np.ndarray:
  """Nearest-neighbour upscaling by the smallest integer factor that makes
  the image at least `min_width` wide (pixels stay sharp squares).

  Args:
    image: [H, W, C] any dtype.
    min_width: the width to reach.

  Returns:
    [k H, k W, C] with k = ceil(min_width / W) (1 for wide enough images).
  """
  image = np.asarray(image)
  factor = max(1, -(-min_width // image.shape[1]))
  if factor == 1:
    return image
  return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def save_png(path: os.PathLike[str] | str, image: np.ndarray) -> pathlib.Path:
  """Writes uint8 [H, W, 3] as a PNG, creating the folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.asarray(image, np.uint8)).save(path)
  return path
