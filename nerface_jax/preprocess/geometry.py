"""Cameras, crops, head poses and face boxes (pure numpy).

Pixel conventions. The tracker's normalised landmarks (x / W, y / H) put the
image edges at 0 and 1 ("corner" coordinates). The dataset's ray formula
(docs/architecture.md §3) sends the ray of integer pixel (i, j) through the
pixel's centre, so dataset pixel coordinates have pixel centres at integers.
A crop [x0, x0 + side) resized by k = size / side maps a corner coordinate
x of the frame to the dataset pixel coordinate k (x - x0) - 1/2.

World coordinates are the tracker's canonical face, scaled: one unit is
1 / `scale` centimetres, chosen so the mean camera distance is 0.5 like the
released NeRFace data (near 0.2 and far 0.8 then bracket the head).
"""

import math
from typing import Optional

import numpy as np

# The face box of the original NeRFace data: the landmarks' box grown by
# these fractions of its size (the forehead's hair needs more room above).
BBOX_TOP = 0.27
BBOX_BOTTOM = 0.15
BBOX_SIDES = 0.15
MEAN_DISTANCE = 0.5  # Mean camera distance after normalisation.


def focal_from_fov(height: float, fov_y_degrees: float) -> float:
  """Focal length in pixels of a camera with this vertical field of view."""
  return 0.5 * height / math.tan(0.5 * math.radians(fov_y_degrees))


def landmark_boxes(landmarks: np.ndarray, height: int,
                   width: int) -> np.ndarray:
  """Per-frame landmark boxes in frame pixels (corner coordinates).

  Args:
    landmarks: float [N, L, 2+] normalised (x / W, y / H, ...) landmarks.
    height: int frame height.
    width: int frame width.

  Returns:
    float64 [N, 4] (x_min, x_max, y_min, y_max).
  """
  x = landmarks[..., 0].astype(np.float64) * width
  y = landmarks[..., 1].astype(np.float64) * height
  return np.stack([x.min(-1), x.max(-1), y.min(-1), y.max(-1)], -1)


def square_crop(boxes: np.ndarray, height: int, width: int,
                margin: float) -> tuple[int, int, int]:
  """One square crop covering the head of every frame, inside the frame.

  The head is the face box grown like the NeRFace bbox (hair above, ears at
  the sides); the crop adds `margin` of the box's longer side on every side
  and is then shrunk and shifted as needed to stay inside the frame (the
  tracker's principal point is the frame's centre, so no padding is
  invented).

  Args:
    boxes: float [N, 4] face boxes (x_min, x_max, y_min, y_max) in frame
      pixels of the frames to cover.
    height: int frame height.
    width: int frame width.
    margin: float >= 0, fraction of the head box's longer side.

  Returns:
    (x0, y0, side) ints: columns x0 .. x0 + side - 1, rows y0 .. y0 + side - 1.
  """
  x_min, y_min = boxes[:, 0].min(), boxes[:, 2].min()
  x_max, y_max = boxes[:, 1].max(), boxes[:, 3].max()
  box_w, box_h = x_max - x_min, y_max - y_min
  x_min, x_max = x_min - BBOX_SIDES * box_w, x_max + BBOX_SIDES * box_w
  y_min, y_max = y_min - BBOX_TOP * box_h, y_max + BBOX_BOTTOM * box_h
  side = max(x_max - x_min, y_max - y_min) * (1.0 + 2.0 * margin)
  side = int(min(round(side), height, width))
  side = max(side, 1)
  # Centred on the head, then clamped into the frame.
  x0 = int(round(0.5 * (x_min + x_max) - 0.5 * side))
  y0 = int(round(0.5 * (y_min + y_max) - 0.5 * side))
  x0 = min(max(x0, 0), width - side)
  y0 = min(max(y0, 0), height - side)
  return x0, y0, side


def crop_intrinsics(height: int, width: int, crop: tuple[int, int, int],
                    size: int, fov_y_degrees: float) -> np.ndarray:
  """Dataset intrinsics of a square crop of the tracker's camera.

  Args:
    height: int frame height (the field of view is vertical, over it).
    width: int frame width.
    crop: (x0, y0, side) as from `square_crop`.
    size: int side of the written images.
    fov_y_degrees: the tracker camera's vertical field of view.

  Returns:
    float64 [4] (fx, fy, cx, cy): fx = fy > 0 in pixels of the written
    image, cx and cy fractions of its width and height.
  """
  x0, y0, side = crop
  scale = size / side
  focal = focal_from_fov(height, fov_y_degrees) * scale
  # The principal point is the frame's centre (corner coordinates W/2, H/2).
  cx = (scale * (0.5 * width - x0) - 0.5) / size
  cy = (scale * (0.5 * height - y0) - 0.5) / size
  return np.array([focal, focal, cx, cy])


def to_crop_pixels(landmarks: np.ndarray, height: int, width: int,
                   crop: tuple[int, int, int], size: int) -> np.ndarray:
  """Normalised landmarks -> pixel coordinates of the written image.

  Args:
    landmarks: float [..., 2+] (x / W, y / H, ...).
    height: int frame height.
    width: int frame width.
    crop: (x0, y0, side).
    size: int side of the written images.

  Returns:
    float64 [..., 2] (column, row), pixel centres at integers.
  """
  x0, y0, side = crop
  scale = size / side
  x = landmarks[..., 0].astype(np.float64) * width
  y = landmarks[..., 1].astype(np.float64) * height
  return np.stack([scale * (x - x0) - 0.5, scale * (y - y0) - 0.5], -1)


def face_bbox(landmarks: np.ndarray, height: int, width: int,
              crop: tuple[int, int, int]) -> np.ndarray:
  """The NeRFace face box of one frame, as fractions of the written image.

  Args:
    landmarks: float [L, 2+] normalised landmarks of the frame.
    height: int frame height.
    width: int frame width.
    crop: (x0, y0, side).

  Returns:
    float64 [4] (h_min, h_max, w_min, w_max), rows first: the landmarks' box
    grown by 0.27 of its height above, 0.15 below and 0.15 of its width on
    each side, clipped to [0, 1].
  """
  x0, y0, side = crop
  # Fractions of the crop in corner coordinates, as the sampler reads them.
  u = (landmarks[:, 0].astype(np.float64) * width - x0) / side
  v = (landmarks[:, 1].astype(np.float64) * height - y0) / side
  box_w, box_h = np.ptp(u), np.ptp(v)
  box = np.array([v.min() - BBOX_TOP * box_h, v.max() + BBOX_BOTTOM * box_h,
                  u.min() - BBOX_SIDES * box_w, u.max() + BBOX_SIDES * box_w])
  return np.clip(box, 0.0, 1.0)


def camera_poses(matrices: np.ndarray) -> tuple[np.ndarray, float]:
  """Camera-to-world matrices from the tracker's face-to-camera matrices.

  The head is the world: c2w = inverse(M), then the whole world is scaled by
  `scale` (the camera translations with it) so that the mean camera
  distance from the face origin is `MEAN_DISTANCE`.

  Args:
    matrices: float [N, 4, 4] facial transformation matrices (rigid,
      canonical face in cm -> camera in cm).

  Returns:
    (c2w float64 [N, 4, 4] rigid, scale float: world units per centimetre).
  """
  rotation = matrices[:, :3, :3].astype(np.float64)
  translation = matrices[:, :3, 3].astype(np.float64)
  # Re-orthonormalise: the tracker's float32 rotation is rigid to ~1e-7, and
  # the exact inverse of a rotation is its transpose.
  u, _, vt = np.linalg.svd(rotation)
  rotation = u @ vt
  c2w = np.tile(np.eye(4), (matrices.shape[0], 1, 1))
  c2w[:, :3, :3] = np.swapaxes(rotation, 1, 2)
  centre = -np.einsum('nji,nj->ni', rotation, translation)
  scale = MEAN_DISTANCE / np.linalg.norm(centre, axis=-1).mean()
  c2w[:, :3, 3] = centre * scale
  return c2w, float(scale)


def _gaussian_weights(times: np.ndarray, sigma: float) -> np.ndarray:
  """float64 [N, N] row-normalised Gaussian weights over frame times."""
  diff = times[:, None].astype(np.float64) - times[None, :]
  weights = np.exp(-0.5 * (diff / sigma) ** 2)
  # Cut beyond 3 sigma: a skipped stretch must not pull in distant poses.
  weights[np.abs(diff) > 3.0 * sigma] = 0.0
  return weights / weights.sum(axis=1, keepdims=True)


def smooth_series(values: np.ndarray, times: np.ndarray,
                  sigma: float) -> np.ndarray:
  """Gaussian temporal smoothing of per-frame values at given frame times.

  Args:
    values: float [N, D] one row per kept frame.
    times: int [N] frame indices (increasing; gaps are skipped frames).
    sigma: float standard deviation in frames; 0 returns the input.

  Returns:
    float64 [N, D].
  """
  if sigma <= 0:
    return np.asarray(values, np.float64)
  return _gaussian_weights(times, sigma) @ np.asarray(values, np.float64)


def smooth_poses(c2w: np.ndarray, times: np.ndarray,
                 sigma: float) -> np.ndarray:
  """Gaussian temporal smoothing of rigid poses.

  Translations are averaged; rotations are averaged as matrices and
  projected back onto SO(3) (the chordal mean, accurate for the small
  frame-to-frame differences light smoothing sees).

  Args:
    c2w: float [N, 4, 4] rigid camera-to-world matrices.
    times: int [N] frame indices.
    sigma: float standard deviation in frames; 0 returns the input.

  Returns:
    float64 [N, 4, 4] rigid.
  """
  c2w = np.asarray(c2w, np.float64)
  if sigma <= 0:
    return c2w.copy()
  weights = _gaussian_weights(times, sigma)
  mean_rot = np.einsum('nm,mij->nij', weights, c2w[:, :3, :3])
  u, _, vt = np.linalg.svd(mean_rot)
  # Flip the last axis where needed so the result is a rotation (det +1).
  fix = np.ones((c2w.shape[0], 3))
  fix[:, 2] = np.sign(np.linalg.det(u @ vt))
  out = c2w.copy()
  out[:, :3, :3] = (u * fix[:, None, :]) @ vt
  out[:, :3, 3] = weights @ c2w[:, :3, 3]
  return out


def is_rigid(c2w: np.ndarray, tol: float = 1e-6) -> Optional[str]:
  """None when float [4, 4] `c2w` is a rigid transform, else what is wrong."""
  rotation = c2w[:3, :3]
  if np.abs(rotation.T @ rotation - np.eye(3)).max() > tol:
    return 'rotation is not orthonormal'
  if abs(np.linalg.det(rotation) - 1.0) > tol:
    return 'rotation has determinant -1'
  if np.abs(c2w[3] - [0.0, 0.0, 0.0, 1.0]).max() > tol:
    return 'last row is not (0, 0, 0, 1)'
  return None
