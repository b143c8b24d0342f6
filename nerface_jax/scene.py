"""The head's volume in world coordinates, from the training cameras.

Pure numpy (and one scipy linear programme): the box a hash grid and an
occupancy grid span, and the region a mesh is extracted from.
"""

from typing import Optional

import numpy as np
from scipy import optimize


def head_centre(c2w: np.ndarray) -> np.ndarray:
  """The point closest (least squares) to every camera's optical axis.

  Args:
    c2w: float [F, 4, 4] cameras that look at the head.

  Returns:
    float64 [3].
  """
  c2w = np.asarray(c2w, np.float64)
  origins = c2w[:, :3, 3]
  axes = -c2w[:, :3, 2]
  axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
  # Sum of projectors orthogonal to each axis; solvable unless all axes are
  # parallel, in which case the pseudo-inverse picks the closest point.
  projectors = np.eye(3)[None] - axes[:, :, None] * axes[:, None, :]
  return np.linalg.lstsq(projectors.sum(0),
                         np.einsum('fij,fj->i', projectors, origins),
                         rcond=None)[0]


def frustum_overlap(c2w: np.ndarray, intrinsics: np.ndarray, height: int,
                    width: int, near: float,
                    far: float) -> Optional[tuple[np.ndarray, np.ndarray]]:
  """The bounding box of the points every camera sees between near and far.

  A point is seen by a camera when it projects onto the image (pixel
  positions 0 .. W-1, 0 .. H-1: the rays of training) at a depth in
  [near, far]. Each camera's set is a convex frustum of six half-spaces, so
  the overlap is convex and its extremes along x, y and z are six linear
  programmes.

  Args:
    c2w: float [F, 4, 4] cameras.
    intrinsics: float [4] (fx, fy, cx, cy) as in the dataset.
    height: H.
    width: W.
    near: nearest depth.
    far: farthest depth.

  Returns:
    (lo, hi) float64 [3] each, or None when the frusta have no common point.
  """
  c2w = np.asarray(c2w, np.float64).reshape(-1, 4, 4)
  fx, fy, cx, cy = (float(v) for v in intrinsics)
  # Camera-space x / depth and y / depth at the image's edges.
  us = sorted(((0.0 - width * cx) / fx, (width - 1.0 - width * cx) / fx))
  vs = sorted((-(0.0 - height * cy) / fy, -(height - 1.0 - height * cy) / fy))
  rows, bounds = [], []
  for pose in c2w:
    r, t = pose[:3, :3], pose[:3, 3]
    ax, ay, az = r[:, 0], r[:, 1], r[:, 2]  # p_cam_k = a_k . (p - t).
    # depth = -z_cam in [near, far]; u_min depth <= x_cam <= u_max depth.
    for a, b in ((az, -near), (-az, far),
                 (ax + us[1] * az, 0.0), (-ax - us[0] * az, 0.0),
                 (ay + vs[1] * az, 0.0), (-ay - vs[0] * az, 0.0)):
      rows.append(a)
      bounds.append(a @ t + b)
  a_ub, b_ub = np.asarray(rows), np.asarray(bounds)
  lo, hi = np.zeros(3), np.zeros(3)
  for k in range(3):
    for sign, out in ((1.0, lo), (-1.0, hi)):
      cost = np.zeros(3)
      cost[k] = sign
      result = optimize.linprog(cost, A_ub=a_ub, b_ub=b_ub,
                                bounds=[(None, None)] * 3, method='highs')
      if result.status != 0:
        return None
      out[k] = result.x[k]
  return lo, hi


def head_region(c2w: np.ndarray, intrinsics: np.ndarray, height: int,
                width: int, near: float,
                far: float) -> tuple[np.ndarray, np.ndarray]:
  """The head region: `frustum_overlap`, or, when the cameras share no
  view, the cube around `head_centre` of half-side (far - near) / 2.

  Returns:
    (lo, hi) float64 [3] each.
  """
  box = frustum_overlap(c2w, intrinsics, height, width, near, far)
  if box is not None and np.all(box[1] > box[0]):
    return box
  centre = head_centre(np.asarray(c2w, np.float64).reshape(-1, 4, 4))
  radius = 0.5 * (far - near)
  return centre - radius, centre + radius


def head_box(c2w: np.ndarray, intrinsics: np.ndarray, height: int,
             width: int, near: float, far: float) -> list[list[float]]:
  """The hash and occupancy grids' box: `head_region` as JSON-ready lists.

  Returns:
    [[x0, y0, z0], [x1, y1, z1]] floats, lower and upper corner.
  """
  lo, hi = head_region(c2w, intrinsics, height, width, near, far)
  return [[float(v) for v in lo], [float(v) for v in hi]]
