"""Training rays drawn on the device from all training frames.

The whole training split lives on every device (images as uint8), and a batch
is drawn inside jit: no per-step host work and no host-to-device copy of
pixels. Pixels are drawn across ALL frames with per-pixel weight `bbox_weight`
inside a frame's face box and `1 - bbox_weight` outside; the original NeRFace
code meant this but transposed its sampling map, and drew a step's rays from
one image.

Sampling is exact without materialising a [F, H, W] probability map: a frame
is drawn by its total weight, then inside-or-outside by the two areas, then a
uniform pixel of that region (the outside of a rectangle is enumerated in
closed form).
"""

import chex
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from nerface_jax import camera
from nerface_jax import types


@struct.dataclass
class DeviceData:
  """A training split prepared for device-side sampling.

  Attributes:
    images: uint8 [F, H, W, 3].
    c2w: float32 [F, 4, 4].
    expressions: float32 [F, E].
    boxes: int32 [F, 4] face boxes in pixels (row0, row1, col0, col1), ends
      exclusive, never empty.
    background: uint8 [H, W, 3] (zeros when the dataset has none).
    intrinsics: float32 [4] (fx, fy, cx, cy) as in the dataset.
    frame_cdf: float32 [F] cumulative probability of drawing each frame.
    inside_prob: float32 [F] probability that a ray of the frame is inside
      its box.
  """
  images: chex.Array
  c2w: chex.Array
  expressions: chex.Array
  boxes: chex.Array
  background: chex.Array
  intrinsics: chex.Array
  frame_cdf: chex.Array
  inside_prob: chex.Array

  @property
  def height(self) -> int:
    return self.images.shape[1]

  @property
  def width(self) -> int:
    return self.images.shape[2]


def pixel_boxes(bboxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """Fractional boxes to pixel ranges the way the original code cut them.

  Args:
    bboxes: float [F, 4] (h_min, h_max, w_min, w_max) fractions.
    height: H.
    width: W.

  Returns:
    int32 [F, 4] (row0, row1, col0, col1), ends exclusive, at least one pixel.
  """
  bboxes = np.asarray(bboxes, np.float64)
  rows = np.floor(bboxes[:, :2] * height).astype(np.int64)
  cols = np.floor(bboxes[:, 2:] * width).astype(np.int64)
  r0 = np.clip(rows[:, 0], 0, height - 1)
  c0 = np.clip(cols[:, 0], 0, width - 1)
  r1 = np.clip(rows[:, 1], r0 + 1, height)
  c1 = np.clip(cols[:, 1], c0 + 1, width)
  return np.stack([r0, r1, c0, c1], axis=1).astype(np.int32)


def prepare(images: np.ndarray, c2w: np.ndarray, expressions: np.ndarray,
            bboxes: np.ndarray, background, intrinsics: np.ndarray,
            bbox_weight: float) -> DeviceData:
  """Host-side preparation of the sampling tables (numpy; put on device after).

  Args:
    images: uint8 [F, H, W, 3].
    c2w: float [F, 4, 4].
    expressions: float [F, E].
    bboxes: float [F, 4] fractional face boxes (rows first).
    background: uint8 [H, W, 3] or None.
    intrinsics: float [4].
    bbox_weight: per-pixel weight inside the box, in [0, 1].

  Returns:
    DeviceData holding numpy arrays.
  """
  if not 0.0 <= bbox_weight <= 1.0:
    raise ValueError(f'data.bbox_weight must be in [0, 1], got {bbox_weight}.')
  num_frames, height, width = images.shape[:3]
  boxes = pixel_boxes(bboxes, height, width)
  area_in = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).astype(
      np.float64)
  area_out = height * width - area_in
  mass_in = bbox_weight * area_in
  mass = mass_in + (1.0 - bbox_weight) * area_out
  if np.any(mass <= 0):
    raise ValueError('data.bbox_weight = 0 with boxes covering whole frames '
                     'leaves no pixel to sample.')
  cdf = np.cumsum(mass) / mass.sum()
  cdf[-1] = 1.0
  if background is None:
    background = np.zeros((height, width, 3), np.uint8)
  return DeviceData(
      images=np.asarray(images, np.uint8),
      c2w=np.asarray(c2w, np.float32),
      expressions=np.asarray(expressions, np.float32),
      boxes=boxes,
      background=np.asarray(background, np.uint8),
      intrinsics=np.asarray(intrinsics, np.float32),
      frame_cdf=cdf.astype(np.float32),
      inside_prob=(mass_in / mass).astype(np.float32).reshape(num_frames))


def from_dataset(dataset, bbox_weight: float) -> DeviceData:
  """`prepare` on the arrays of a `data.Dataset` (any object with its
  fields: images, c2w, expressions, bboxes, background, intrinsics)."""
  return prepare(dataset.images, dataset.c2w, dataset.expressions,
                 dataset.bboxes, dataset.background, dataset.intrinsics,
                 bbox_weight)


def _outside_pixel(k: chex.Array, box: chex.Array, width: int):
  """The k-th pixel (row-major) of an image that lies outside `box`.

  Args:
    k: int32 [R] indices in [0, H*W - box area).
    box: int32 [R, 4] (row0, row1, col0, col1).
    width: W.

  Returns:
    (row, col) int32 [R] each.
  """
  r0, r1, c0, c1 = (box[:, n] for n in range(4))
  above = r0 * width
  side_width = width - (c1 - c0)
  beside = (r1 - r0) * side_width
  # Rows fully above the box, then the parts of box rows left and right of
  # it, then rows fully below.
  k_mid = k - above
  mid_row = r0 + k_mid // jnp.maximum(side_width, 1)
  mid_col = k_mid % jnp.maximum(side_width, 1)
  mid_col = jnp.where(mid_col < c0, mid_col, mid_col + (c1 - c0))
  k_low = k - above - beside
  row = jnp.where(k < above, k // width,
                  jnp.where(k_mid < beside, mid_row, r1 + k_low // width))
  col = jnp.where(k < above, k % width,
                  jnp.where(k_mid < beside, mid_col, k_low % width))
  return row, col


def _uniform_index(key: chex.PRNGKey, count: chex.Array) -> chex.Array:
  """Uniform integers in [0, count) for an int32 array of counts (>= 1)."""
  u = jax.random.uniform(key, count.shape)
  return jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)


def sample_pixels(key: chex.PRNGKey, data: DeviceData, num_rays: int):
  """Draws (frame, pixel) pairs with the bbox-weighted distribution.

  Args:
    key: PRNG key.
    data: DeviceData (device or host arrays).
    num_rays: R.

  Returns:
    frame int32 [R] and pixels int32 [R, 2] as (column i, row j).
  """
  frame_key, pixel_key = jax.random.split(key)
  u = jax.random.uniform(frame_key, (num_rays,))
  num_frames = data.frame_cdf.shape[0]
  frame = jnp.minimum(
      jnp.searchsorted(data.frame_cdf, u, side='right'), num_frames - 1)
  frame = frame.astype(jnp.int32)
  return frame, pixels_in_frames(pixel_key, data, frame)


def pixels_in_frames(key: chex.PRNGKey, data: DeviceData,
                     frame: chex.Array) -> chex.Array:
  """Draws one pixel of each given frame, bbox-weighted within the frame.

  Args:
    key: PRNG key.
    data: DeviceData.
    frame: int32 [R] frame of each ray (fixed by the caller: per-frame
      fitting of latent codes draws a set number of rays from every frame).

  Returns:
    int32 [R, 2] pixels as (column i, row j).
  """
  num_rays = frame.shape[0]
  k_side, k_row, k_col, k_out = jax.random.split(key, 4)
  box = data.boxes[frame]
  inside = jax.random.uniform(k_side, (num_rays,)) < data.inside_prob[frame]
  row_in = box[:, 0] + _uniform_index(k_row, box[:, 1] - box[:, 0])
  col_in = box[:, 2] + _uniform_index(k_col, box[:, 3] - box[:, 2])
  area_out = data.height * data.width - (box[:, 1] - box[:, 0]) * (
      box[:, 3] - box[:, 2])
  row_out, col_out = _outside_pixel(
      _uniform_index(k_out, jnp.maximum(area_out, 1)), box, data.width)
  row = jnp.where(inside, row_in, row_out)
  col = jnp.where(inside, col_in, col_out)
  return jnp.stack([col, row], axis=-1)


def gather_batch(data: DeviceData, frame: chex.Array,
                 pixels: chex.Array) -> types.Batch:
  """The training batch of given (frame, pixel) pairs.

  Args:
    data: DeviceData.
    frame: int32 [R] training-frame indices.
    pixels: int32 [R, 2] (column i, row j).

  Returns:
    Batch with rays [R, 3], rgb and background float32 [R, 3] in [0, 1],
    expression [R, E] and frame [R].
  """
  col, row = pixels[:, 0], pixels[:, 1]
  rays = camera.generate_rays(pixels.astype(jnp.float32), data.intrinsics,
                              data.c2w[frame], data.height, data.width)
  to_unit = lambda x: x.astype(jnp.float32) / 255.0
  return types.Batch(
      rays=rays,
      rgb=to_unit(data.images[frame, row, col]),
      background=to_unit(data.background[row, col]),
      expression=data.expressions[frame],
      frame=frame)


def sample_batch(key: chex.PRNGKey, data: DeviceData,
                 num_rays: int) -> types.Batch:
  """Draws a training batch of `num_rays` rays (jit-able, device-side)."""
  frame, pixels = sample_pixels(key, data, num_rays)
  return gather_batch(data, frame, pixels)
