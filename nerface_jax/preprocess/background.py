"""The static background image NeRFace composites at the end of every ray.

NeRFace needs a photo of the empty scene, which a casual video rarely comes
with. `auto` recovers it from the video itself: the person is masked out of
every frame, each pixel takes the temporal median of the samples where it was
visible, and pixels the person never uncovered are inpainted from their
surroundings. The mask starts from the tracked landmarks (the face hull grown
for hair and ears, swept down to the image's bottom edge, plus shoulders) and
is then refined by GrabCut, a colour-model segmentation OpenCV ships, with the
face itself as certain foreground: hair rarely fits a fixed shape, and a
background pixel masked needlessly is one more to inpaint.

Modes (`--background`):
  auto          masked temporal median + inpainting (the default);
  median        plain temporal median (a person who moves across the frame);
  color         one colour, the median of the visible samples (green screen);
  color:R,G,B   one given colour (0-255 each);
  file:PATH     a photo of the empty scene taken with the same camera, at the
                video's frame size (cropped and resized like the frames).
"""

import dataclasses
import pathlib
from typing import Optional

import cv2
import numpy as np

from nerface_jax.preprocess import errors
from nerface_jax.preprocess import video

# Growth of the landmark hull into a head mask, in units of the landmark
# box: hair and ears reach well beyond the face mesh, and a generous mask
# only costs pixels that other frames (or inpainting) provide.
HEAD_SIDES = 0.35
HEAD_TOP = 0.6
# The shoulders: a trapezoid from the neck (below the chin) widening to the
# bottom of the image, in units of the landmark box.
NECK_DROP = 0.15
NECK_HALF_WIDTH = 0.6
SHOULDER_DROP = 0.75
SHOULDER_HALF_WIDTH = 2.0
# A pixel visible in fewer than this fraction of the frames is inpainted:
# a handful of samples is too few for a median that rejects hair and motion
# blur at the mask's edge.
MIN_VISIBLE_FRACTION = 0.2
# GrabCut runs at most at this resolution (about 50 ms a frame); its mask is
# grown by DILATION of the image side to cover hair edges and motion blur.
GRABCUT_SIZE = 128
GRABCUT_ITERATIONS = 4
DILATION = 0.04
# GrabCut starts its colour models with k-means++ drawn from OpenCV's RNG,
# which is per thread and advances with every call: unseeded, a frame's mask
# depends on which pool thread ran it and what that thread ran before, and
# the background changes from run to run. Every call reseeds with this.
GRABCUT_SEED = 0


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed `--background` value.

  Attributes:
    mode: 'auto', 'median', 'color' or 'file'.
    color: uint8 [3] for 'color:R,G,B', else None (estimated).
    path: the photo for 'file:', else None.
  """
  mode: str
  color: Optional[tuple[int, int, int]] = None
  path: Optional[pathlib.Path] = None

  @property
  def needs_frames(self) -> bool:
    """Whether `estimate` needs sample frames."""
    return self.mode != 'file' and self.color is None

  @property
  def needs_masks(self) -> bool:
    """Whether `estimate` needs person masks of its frames."""
    return self.needs_frames and self.mode != 'median'


def parse_spec(value: str) -> Spec:
  """Parses `auto`, `median`, `color`, `color:R,G,B` or `file:PATH`.

  Raises:
    PreprocessError: an unknown mode, a bad colour, or a missing photo.
  """
  if value in ('auto', 'median', 'color'):
    return Spec(value)
  if value.startswith('color:'):
    parts = value[len('color:'):].split(',')
    try:
      color = tuple(int(p) for p in parts)
    except ValueError:
      color = ()
    if len(color) != 3 or not all(0 <= c <= 255 for c in color):
      raise errors.PreprocessError(
          f'--background={value}: expected color:R,G,B with three integers '
          'in 0..255, e.g. color:0,177,64.')
    return Spec('color', color=color)
  if value.startswith('file:'):
    path = pathlib.Path(value[len('file:'):]).expanduser()
    if not path.is_file():
      raise errors.PreprocessError(
          f'{path}: background photo not found (--background={value}).')
    return Spec('file', path=path)
  raise errors.PreprocessError(
      f'--background={value}: unknown mode; use auto, median, color, '
      'color:R,G,B or file:PATH.')


def face_hull(pixels: np.ndarray, size: int) -> np.ndarray:
  """bool [size, size]: the convex hull of landmarks float [L, 2] (col, row)."""
  mask = np.zeros((size, size), np.uint8)
  hull = cv2.convexHull(pixels.astype(np.float32)).reshape(-1, 2)
  cv2.fillConvexPoly(mask, np.round(hull * 16).astype(np.int32), 1,
                     lineType=cv2.LINE_8, shift=4)
  return mask.astype(bool)


def person_mask(pixels: np.ndarray, size: int, grow: float = 1.0
                ) -> np.ndarray:
  """Pixels the person may cover in one frame: head, hair, neck, shoulders.

  A prior from the landmarks alone (see `refine_mask`).

  Args:
    pixels: float [L, 2] landmark (column, row) in the image.
    size: int side of the square image.
    grow: multiplies the growth beyond the face (2: the outer limit of
      where GrabCut may find the person).

  Returns:
    bool [size, size], True on the person.
  """
  x, y = pixels[:, 0], pixels[:, 1]
  centre = np.array([0.5 * (x.min() + x.max()), 0.5 * (y.min() + y.max())])
  box_w, box_h = np.ptp(x), np.ptp(y)
  # The face hull grown sideways and upwards; its copy moved to the bottom
  # edge makes one convex region from the hair down through the neck.
  grown = centre + (pixels - centre) * [1.0 + 2.0 * HEAD_SIDES * grow, 1.0]
  hair = grown - [0.0, HEAD_TOP * grow * box_h]
  floor = np.stack([grown[:, 0], np.full_like(grown[:, 0], size + 1.0)], -1)
  chin = y.max()
  neck_y = chin + NECK_DROP * box_h
  shoulder_y = chin + SHOULDER_DROP * box_h
  neck, shoulder = NECK_HALF_WIDTH * box_w, SHOULDER_HALF_WIDTH * grow * box_w
  shoulders = np.array([
      [centre[0] - neck, neck_y], [centre[0] + neck, neck_y],
      [centre[0] + shoulder, shoulder_y], [centre[0] + shoulder, size + 1.0],
      [centre[0] - shoulder, size + 1.0], [centre[0] - shoulder, shoulder_y]])
  mask = np.zeros((size, size), np.uint8)
  head = np.concatenate([grown, hair, floor])
  # Fixed-point coordinates (4 fractional bits) keep sub-pixel placement.
  for polygon in (cv2.convexHull(head.astype(np.float32)).reshape(-1, 2),
                  shoulders):
    cv2.fillConvexPoly(mask, np.round(polygon * 16).astype(np.int32), 1,
                       lineType=cv2.LINE_8, shift=4)
  return mask.astype(bool)


def refine_mask(image: np.ndarray, pixels: np.ndarray,
                size: int) -> np.ndarray:
  """The person in one frame: GrabCut started from the landmark prior.

  Args:
    image: uint8 [G, G, 3] RGB frame at GrabCut's working resolution
      (`GRABCUT_SIZE`, or the output size when smaller than that).
    pixels: float [L, 2] landmark (column, row) in `image`.
    size: int side of the mask to return.

  Returns:
    bool [size, size] True on the person: the GrabCut foreground (started
    from `person_mask`, kept within `person_mask(grow=2)`), dilated, plus
    the face hull. The prior itself when GrabCut has too little background
    to learn from. A function of the arguments alone: the same on any
    thread and in any order of calls (the calling thread's OpenCV RNG is
    reseeded with `GRABCUT_SEED`).
  """
  work = image.shape[0]
  prior = person_mask(pixels, work)
  labels = np.where(prior, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
  labels[face_hull(pixels, work)] = cv2.GC_FGD
  person = prior
  # With almost no pixels to call background the colour model is noise.
  if (labels == cv2.GC_PR_BGD).sum() >= 0.02 * work * work:
    try:
      # Per thread in OpenCV: seeds the RNG that this call's k-means uses.
      cv2.setRNGSeed(GRABCUT_SEED)
      cv2.grabCut(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), labels, None,
                  np.zeros((1, 65)), np.zeros((1, 65)), GRABCUT_ITERATIONS,
                  cv2.GC_INIT_WITH_MASK)
      # GrabCut may leave the prior (a bun, long hair), but not for
      # background far away that happens to share the hair's colour.
      person = (((labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD))
                & person_mask(pixels, work, grow=2.0))
    except cv2.error:
      pass
  if work != size:
    person = cv2.resize(person.astype(np.uint8), (size, size),
                        interpolation=cv2.INTER_LINEAR).astype(bool)
  radius = max(1, int(round(DILATION * size)))
  kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE,
                                     (2 * radius + 1, 2 * radius + 1))
  person = cv2.dilate(person.astype(np.uint8), kernel).astype(bool)
  return person | face_hull((pixels + 0.5) * (size / work) - 0.5, size)


def masked_median(frames: np.ndarray, visible: Optional[np.ndarray] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel temporal median over the visible samples.

  Args:
    frames: uint8 [N, H, W, C].
    visible: bool [N, H, W] samples to use (None: all).

  Returns:
    (median float32 [H, W, C] (NaN where no sample is visible; the mean of
     the two middle samples for an even count), count int [H, W] of visible
     samples).
  """
  n, h, w, c = frames.shape
  if visible is None:
    visible = np.ones((n, h, w), bool)
  count = visible.sum(axis=0)
  median = np.full((h, w, c), np.nan, np.float32)
  # Row blocks bound the uint16 copy's memory; hidden samples become 256,
  # which sorts after every real value, so the k-th smallest of the visible
  # ones is the k-th of the row.
  rows = max(1, (1 << 24) // max(1, n * w * c))
  for r0 in range(0, h, rows):
    block = frames[:, r0:r0 + rows].astype(np.uint16)
    block[~visible[:, r0:r0 + rows]] = 256
    block.sort(axis=0)
    k = count[r0:r0 + rows][None, :, :, None]
    lo = np.take_along_axis(block, np.maximum(k - 1, 0) // 2, axis=0)[0]
    hi = np.take_along_axis(block, k // 2 * (k > 0), axis=0)[0]
    value = 0.5 * (lo.astype(np.float32) + hi.astype(np.float32))
    value[np.broadcast_to(k[0] == 0, value.shape)] = np.nan
    median[r0:r0 + rows] = value
  return median, count


def _push_pull(values: np.ndarray, known: np.ndarray) -> np.ndarray:
  """Fills unknown pixels from a pyramid of known-pixel averages.

  Args:
    values: float32 [H, W, 3]; only `known` pixels are read.
    known: float32 [H, W] 1 on known pixels, 0 elsewhere.

  Returns:
    float32 [H, W, 3]: `values` where known, elsewhere the average of the
    nearest known pixels at the coarsest level that has any, smoothly
    interpolated.
  """
  h, w = known.shape
  if known.min() > 0 or max(h, w) == 1:
    return values
  size = (max(1, w // 2), max(1, h // 2))
  coarse_known = cv2.resize(known, size, interpolation=cv2.INTER_AREA)
  coarse_sum = cv2.resize(values * known[..., None], size,
                          interpolation=cv2.INTER_AREA).reshape(
                              size[1], size[0], 3)
  coarse = coarse_sum / np.maximum(coarse_known, 1e-12)[..., None]
  coarse = _push_pull(coarse, (coarse_known > 0).astype(np.float32))
  up = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR).reshape(
      h, w, 3)
  return np.where(known[..., None] > 0, values, up)


def inpaint(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
  """Fills `hole` (bool [H, W]) of uint8 [H, W, 3] `image`.

  The hole behind a person is large and was never seen, so no detail can be
  recovered; a smooth fill from the surrounding colours (push-pull over an
  image pyramid) is the least distracting guess, where diffusion inpainting
  smears the hole's edge into streaks.

  Returns:
    uint8 [H, W, 3], equal to `image` outside the hole.
  """
  if not hole.any():
    return image
  if hole.all():
    # Nothing to propagate from: a flat mid-grey is the least wrong guess.
    return np.full_like(image, 128)
  filled = _push_pull(image.astype(np.float32), (~hole).astype(np.float32))
  return np.where(hole[..., None], np.clip(np.round(filled), 0, 255),
                  image).astype(np.uint8)


def estimate(frames: np.ndarray, masks: Optional[np.ndarray], spec: Spec
             ) -> tuple[np.ndarray, np.ndarray]:
  """The background of a static camera from samples of its frames.

  Args:
    frames: uint8 [N, S, S, 3] cropped and resized frames (a sample of the
      video spread over time).
    masks: bool [N, S, S] True on the person (`refine_mask`); unused (may be
      None) in 'median' mode.
    spec: the mode ('file' is handled by `from_photo`).

  Returns:
    (background uint8 [S, S, 3], filled bool [S, S]: pixels that were
     inpainted or set to a uniform colour rather than observed).
  """
  size = frames.shape[1]
  if spec.mode == 'median':
    median, _ = masked_median(frames)
    return np.round(median).astype(np.uint8), np.zeros((size, size), bool)
  median, count = masked_median(frames, ~masks)
  if spec.mode == 'color':
    color = spec.color
    if color is None:
      seen = count > 0
      # The median of the per-pixel medians: robust to the spill and shadows
      # near the person that a plain mean would average in.
      color = (np.median(median[seen], axis=0) if seen.any()
               else np.median(frames.reshape(-1, 3), axis=0))
    color = np.round(np.asarray(color, np.float64)).astype(np.uint8)
    return (np.broadcast_to(color, (size, size, 3)).copy(),
            np.ones((size, size), bool))
  if spec.mode != 'auto':
    raise ValueError(f'unknown background mode {spec.mode!r}')
  hole = count < max(1, int(np.ceil(MIN_VISIBLE_FRACTION * frames.shape[0])))
  image = np.round(np.nan_to_num(median)).astype(np.uint8)
  return inpaint(image, hole), hole


def load_photo(path: pathlib.Path, height: int, width: int) -> np.ndarray:
  """The empty-scene photo at full size, checked against the video's frames.

  Args:
    path: the photo.
    height: int video frame height (the photo must match).
    width: int video frame width.

  Returns:
    uint8 [height, width, 3] RGB.

  Raises:
    PreprocessError: unreadable, or not the size of the video's frames.
  """
  try:
    image = video.read_image(path)
  except errors.PreprocessError:
    raise errors.PreprocessError(
        f'{path}: the background photo is not a readable image.') from None
  if image.shape[:2] != (height, width):
    raise errors.PreprocessError(
        f'{path}: background photo is {image.shape[1]}x{image.shape[0]} '
        f'pixels but the video frames are {width}x{height}; take it with the '
        'same camera and framing.')
  return image


def from_photo(path: pathlib.Path, height: int, width: int,
               crop: tuple[int, int, int], size: int) -> np.ndarray:
  """The empty-scene photo, cropped and resized like the frames.

  Args:
    path: the photo.
    height: int video frame height (the photo must match).
    width: int video frame width.
    crop: (x0, y0, side) of the frames.
    size: int side of the written images.

  Returns:
    uint8 [size, size, 3].

  Raises:
    PreprocessError: unreadable, or not the size of the video's frames.
  """
  return video.crop_and_resize(load_photo(path, height, width), crop, size)

