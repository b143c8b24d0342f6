"""A browser viewer of a trained avatar (viser): a free camera, expression
sliders, the frames of the data, playback and reenactment.

The browser's camera is the avatar's camera. viser reports it as a rotation
and position in OpenCV axes (+z forward, -y up) with a vertical field of
view; `CameraModel` turns that into the dataset's camera-to-world matrix
(OpenGL axes, looking down -z) and signed intrinsics, and back. The released
data has fx < 0 (its images are mirrored with respect to a right-handed
camera): for such data the viewer's world is the dataset's mirrored in x, so
that the browser's camera is a proper rotation and dragging turns the head
the way the hand moves. `CameraModel.to_viewer` followed by `from_viewer`
reproduces every training camera's rays exactly.

Each browser tab (client) has its own view, GUI and render thread. A view
renders at a low "preview" resolution while the camera or a control moves
(by default the largest offered height expected to render within
`PREVIEW_SECONDS`, from the render times measured so far) and at full
resolution after `IDLE_SECONDS` without a change; a full render is abandoned
between chunks when a new event arrives (`renderer.render_frame`'s
`should_stop`); previews are never abandoned, so a drag shows every one. Render sizes come from a few heights, and widths are padded
up to a multiple of height / `WIDTH_STEPS`, so resizing the window does not
recompile the renderer for every pixel count. The image is sent as the
canvas background (viser stretches it over the canvas), at the canvas aspect.

Only `ViewerServer` needs viser (imported there); the rest is numpy and the
renderer.
"""

import dataclasses
import functools
import json
import math
import pathlib
import threading
import time
import traceback
from typing import Any, Callable, Optional

from absl import logging
import numpy as np

from nerface_jax import avatar as avatar_lib
from nerface_jax import data
from nerface_jax import edits
from nerface_jax import scene
from nerface_jax import errors
from nerface_jax import images
from nerface_jax import renderer
from nerface_jax import synthetic

SPLITS = ('train', 'val', 'test')
DRIVING = 'driving'
# Latent code choices: the picked (or played) frame's own code, or a shared
# one (latents.SHARED).
LATENTS = ('frame', 'mean', 'zero', 'fixed')
IDLE_SECONDS = 0.2  # Without a change for this long, render at full size.
# 'auto' previews: the largest height expected to render in this time (five
# previews a second while dragging).
PREVIEW_SECONDS = 0.2
# A full render checks for new events about this often (chunks are sized
# from the measured render speed).
CHUNK_SECONDS = 0.05
MIN_CHUNK = 256
AUTO = 'auto'
WIDTH_STEPS = 8  # Render widths are multiples of ceil(height / WIDTH_STEPS).
SAVE_DIR = 'viewer'  # Saved images go to <workdir>/viewer/.
JPEG_QUALITY = 90

_GL_TO_CV = np.diag([1.0, -1.0, -1.0])  # A turn of pi about the camera x axis.


# --- Camera maths (numpy) ----------------------------------------------------


def quaternion_to_matrix(wxyz: np.ndarray) -> np.ndarray:
  """float64 [3, 3] rotation of a (not necessarily unit) quaternion."""
  w, x, y, z = np.asarray(wxyz, np.float64) / np.linalg.norm(wxyz)
  return np.array([
      [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
      [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
      [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def matrix_to_quaternion(rotation: np.ndarray) -> np.ndarray:
  """float64 [4] unit quaternion (w, x, y, z), w >= 0, of a rotation."""
  m = np.asarray(rotation, np.float64)
  trace = np.trace(m)
  # Shepperd's method: divide by the largest of the four candidates.
  if trace > max(m[0, 0], m[1, 1], m[2, 2]):
    s = 2.0 * math.sqrt(1.0 + trace)
    q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s,
         (m[1, 0] - m[0, 1]) / s]
  elif m[0, 0] >= m[1, 1] and m[0, 0] >= m[2, 2]:
    s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
    q = [(m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s,
         (m[0, 2] + m[2, 0]) / s]
  elif m[1, 1] >= m[2, 2]:
    s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
    q = [(m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s,
         (m[1, 2] + m[2, 1]) / s]
  else:
    s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
    q = [(m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s,
         (m[1, 2] + m[2, 1]) / s, 0.25 * s]
  q = np.asarray(q)
  q /= np.linalg.norm(q)
  return -q if q[0] < 0 else q


@dataclasses.dataclass(frozen=True)
class CameraModel:
  """The training camera's intrinsics, and the map to the browser's camera.

  With F = diag(sign fx, sign fy, 1) (the dataset's signed focal lengths),
  G = diag(1, -1, -1) (OpenGL <-> OpenCV camera axes) and S = diag(-1, 1, 1)
  when fx fy < 0 (else the identity; a mirror of the world in x):

    viewer rotation R_cv = S R F G,  viewer position = S t,
    R = S R_cv G F,  t = S position  (all four are their own inverses),

  and for a render of h x w pixels with the browser's vertical field of
  view `fov`: |fy| = (h / 2) / tan(fov / 2), |fx| = |fy| |fx0 / fy0| with
  the signs of the dataset's fx0, fy0, and the dataset's principal point
  (cx, cy) as fractions. The dataset camera sees the pixel (i, j) along
  R F [(i - W cx)/|fx|, -(j - H cy)/|fy|, -1]; in the mirrored world that is
  R_cv [(i - W cx)/|fx|, (j - H cy)/|fy|, 1], the ray of a right-handed
  OpenCV camera, which is what the browser's controls move.

  Attributes:
    intrinsics: float64 [4] (fx, fy, cx, cy) of the training images.
    height: H of the training images.
    width: W.
  """
  intrinsics: np.ndarray
  height: int
  width: int

  @property
  def flip(self) -> np.ndarray:
    """F: diag(sign fx, sign fy, 1)."""
    return np.diag([np.sign(self.intrinsics[0]), np.sign(self.intrinsics[1]),
                    1.0])

  @property
  def mirror(self) -> np.ndarray:
    """S: the dataset world -> the viewer's world (and back)."""
    if self.intrinsics[0] * self.intrinsics[1] < 0:
      return np.diag([-1.0, 1.0, 1.0])
    return np.eye(3)

  @property
  def fov(self) -> float:
    """The training camera's vertical field of view, radians."""
    return 2.0 * math.atan(0.5 * self.height / abs(self.intrinsics[1]))

  def to_viewer(self, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A dataset camera-to-world -> the viewer's (wxyz, position)."""
    c2w = np.asarray(c2w, np.float64)
    rotation = self.mirror @ c2w[:3, :3] @ self.flip @ _GL_TO_CV
    return matrix_to_quaternion(rotation), self.mirror @ c2w[:3, 3]

  def from_viewer(self, wxyz: np.ndarray, position: np.ndarray, fov: float,
                  height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The viewer's camera -> (c2w float64 [4, 4], intrinsics float64 [4])
    of a `height` x `width` render."""
    c2w = np.eye(4)
    c2w[:3, :3] = (self.mirror @ quaternion_to_matrix(wxyz) @ _GL_TO_CV @
                   self.flip)
    c2w[:3, 3] = self.mirror @ np.asarray(position, np.float64)
    focal = 0.5 * height / math.tan(0.5 * fov)
    fx0, fy0, cx, cy = (float(v) for v in self.intrinsics)
    fy = math.copysign(focal, fy0)
    fx = math.copysign(focal * abs(fx0 / fy0), fx0)
    del width  # The principal point is a fraction; no other use.
    return c2w, np.array([fx, fy, cx, cy])

  def orbit(self, c2w: np.ndarray, centre: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The viewer's (position, look_at, up) of a dataset camera.

    look_at is the point of the optical axis at the depth of `centre` (the
    head centre), so that the browser orbits about the head and its camera
    is exactly `c2w`; up is the camera's up.
    """
    wxyz, position = self.to_viewer(c2w)
    rotation = quaternion_to_matrix(wxyz)
    forward = rotation[:, 2]
    depth = float((self.mirror @ np.asarray(centre, np.float64) - position)
                  @ forward)
    return position, position + max(depth, 1e-3) * forward, -rotation[:, 1]


@dataclasses.dataclass(frozen=True)
class RenderSize:
  """A render's size: `width` is shown, `padded` columns are rendered."""
  height: int
  width: int
  padded: int

  @property
  def rays(self) -> int:
    return self.height * self.padded


def render_size(height: int, aspect: float) -> RenderSize:
  """`height` rows at the canvas aspect (width / height), the width padded
  to a multiple of ceil(height / WIDTH_STEPS)."""
  width = max(1, int(round(height * aspect)))
  step = max(1, -(-height // WIDTH_STEPS))
  return RenderSize(height, width, -(-width // step) * step)


def height_options(height: int) -> list[int]:
  """Render heights offered for a `height`-pixel avatar (8 pixels at least):
  a quarter, a half, one and two times the training height."""
  return sorted({max(8, height // 4), max(8, height // 2), height, 2 * height})


def scaled_background(background: Optional[np.ndarray], cx: float, cy: float,
                      size: RenderSize) -> np.ndarray:
  """The training background seen by a render of `size`.

  The background is in training pixels; a render `size.height` rows high
  sees it scaled by size.height / H about the principal point (as its focal
  length is), sampled bilinearly, with the edge pixels repeated where a
  wider canvas reaches past it, and the padding columns edge-filled.

  Args:
    background: uint8 [H, W, 3] or None (black).
    cx: principal point, fraction of the width.
    cy: fraction of the height.
    size: the render's size.

  Returns:
    uint8 [size.height, size.padded, 3].
  """
  if background is None:
    return np.zeros((size.height, size.padded, 3), np.uint8)
  src_h, src_w = background.shape[:2]
  scale = src_h / size.height
  u = (np.arange(size.width) - size.width * cx) * scale + src_w * cx
  v = (np.arange(size.height) - size.height * cy) * scale + src_h * cy
  u = np.clip(u, 0, src_w - 1)
  v = np.clip(v, 0, src_h - 1)
  u0 = np.minimum(np.floor(u).astype(np.int64), src_w - 2 if src_w > 1 else 0)
  v0 = np.minimum(np.floor(v).astype(np.int64), src_h - 2 if src_h > 1 else 0)
  du = (u - u0)[None, :, None]
  dv = (v - v0)[:, None, None]
  u1 = np.minimum(u0 + 1, src_w - 1)
  v1 = np.minimum(v0 + 1, src_h - 1)
  bg = background.astype(np.float64)
  top = bg[v0][:, u0] * (1 - du) + bg[v0][:, u1] * du
  bottom = bg[v1][:, u0] * (1 - du) + bg[v1][:, u1] * du
  out = np.clip(np.round(top * (1 - dv) + bottom * dv), 0, 255).astype(
      np.uint8)
  if size.padded > size.width:
    out = np.concatenate(
        [out, np.repeat(out[:, -1:], size.padded - size.width, axis=1)], 1)
  return out


def expression_labels(dataset_dir: pathlib.Path, expr_dim: int) -> list[str]:
  """A label per expression coefficient: 'index name' where names are known
  (the `expression_names` of our preprocessor's preprocess_report.json, or
  the built-in person's four coefficients), else the index."""
  names: list[Optional[str]] = [None] * expr_dim
  try:
    report = json.loads((pathlib.Path(dataset_dir) /
                         'preprocess_report.json').read_text())
    found = report.get('expression_names')
    if isinstance(found, list) and len(found) == expr_dim:
      names = [str(n) for n in found]
  except (OSError, ValueError, AttributeError):
    pass
  if (all(n is None for n in names) and expr_dim == synthetic.EXPR_DIM and
      pathlib.Path(dataset_dir).name.startswith('synthetic_')):
    names[synthetic.JAW] = 'jaw open'
    names[synthetic.BLINK_L] = 'blink left'
    names[synthetic.BLINK_R] = 'blink right'
    names[synthetic.BROWS] = 'brows up'
  return [f'{i} {n}' if n else str(i) for i, n in enumerate(names)]


# --- What a view renders ------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ViewState:
  """Everything a frame of a view depends on.

  Attributes:
    wxyz: float [4] the browser camera's rotation (OpenCV axes).
    position: float [3] its position (viewer world).
    fov: vertical field of view, radians.
    aspect: canvas width / height.
    expression: float32 [E].
    latent: float32 [L].
    motion: float [4, 4] a head motion (dataset world) applied to the
      camera: the rendered camera is motion @ camera.
  """
  wxyz: np.ndarray
  position: np.ndarray
  fov: float
  aspect: float
  expression: np.ndarray
  latent: np.ndarray
  motion: np.ndarray


@dataclasses.dataclass(frozen=True)
class Frame:
  """A rendered view: the uint8 image shown and how it was made."""
  image: np.ndarray
  size: RenderSize
  seconds: float
  c2w: np.ndarray
  intrinsics: np.ndarray
  state: ViewState
  compiled: bool = False  # The render's time includes compiling its size.


@dataclasses.dataclass(frozen=True)
class Sequence:
  """Frames to play: expressions, head motions (relative to the frontal
  training camera) and the split whose codes the frames have (or None)."""
  expressions: np.ndarray
  motions: np.ndarray
  split: Optional[str]

  def __len__(self) -> int:
    return len(self.expressions)


class Viewer:
  """An avatar with its data, ready to render views (shared by all clients).

  Attributes:
    avatar: the Avatar.
    splits: {'train', 'val', 'test'}: the avatar's datasets.
    camera: the CameraModel of the training camera.
    centre: float64 [3] the head centre (dataset world).
    front: index of the most frontal training frame.
    neutral: index of the training frame of lowest expression norm.
    low, high: float32 [E] the training expressions' range.
    labels: the expression coefficients' labels.
    sequences: what can be played: the splits, and 'driving' when given.
  """

  def __init__(self, avatar: avatar_lib.Avatar,
               driving: Optional[str] = None, driving_split: str = 'test'):
    self.avatar = avatar
    self.splits = {s: avatar_lib.load_dataset(avatar, s) for s in SPLITS}
    train = self.splits['train']
    self.camera = CameraModel(np.asarray(train.intrinsics, np.float64),
                              train.height, train.width)
    self.background = train.background
    self.centre = scene.head_centre(train.c2w)
    self.front = edits.frontal_index(train.c2w, self.centre)
    self.front_c2w = np.asarray(train.c2w[self.front], np.float64)
    self.neutral = edits.neutral_index(train.expressions, None)
    self.low = train.expressions.min(axis=0)
    self.high = train.expressions.max(axis=0)
    self.labels = expression_labels(train.path, avatar.expr_dim)
    self.trained = avatar_lib.is_training_data(avatar, train, 'train')
    inverse_front = np.linalg.inv(self.front_c2w)
    self.sequences = {
        s: Sequence(d.expressions, np.asarray(d.c2w, np.float64) @
                    inverse_front, s) for s, d in self.splits.items()}
    if driving:
      self.sequences[DRIVING] = self._driving(driving, driving_split)
    self._backgrounds: dict[RenderSize, np.ndarray] = {}
    self._seconds: dict[RenderSize, float] = {}  # Render times, smoothed.
    self._compiled: set[tuple[RenderSize, int]] = set()
    self._chunks: dict[RenderSize, int] = {}
    self._lock = threading.Lock()

  def _driving(self, path: str, split: str) -> Sequence:
    """The delta transfer of render_modes.render_reenact, as head motions."""
    try:
      driver = data.load(path, split, background=False,
                         expr_dim=self.avatar.expr_dim,
                         expr_origin=f'the avatar (step {self.avatar.step})')
    except data.DatasetError as e:
      raise errors.RenderError(f'--driving: {e}') from None
    train = self.splits['train']
    driver_centre = scene.head_centre(driver.c2w)
    expressions, poses = edits.reenactment(
        train.expressions[self.neutral], self.front_c2w, self.centre,
        driver.expressions,
        driver.expressions[edits.neutral_index(driver.expressions, None)],
        driver.c2w, driver.c2w[edits.frontal_index(driver.c2w,
                                                   driver_centre)])
    return Sequence(expressions,
                    np.asarray(poses, np.float64) @ np.linalg.inv(
                        self.front_c2w), None)

  @property
  def height_options(self) -> list[int]:
    return height_options(self.camera.height)

  def code(self, choice: str, split: Optional[str], index: int) -> np.ndarray:
    """The latent code of a view: `choice` in LATENTS; 'frame' is frame
    `index` of `split`'s own code (the shared eval.latent code for frames
    without one, or when `split` is None)."""
    if choice == 'frame':
      if split is None:
        return self.avatar.shared_code()
      return self.avatar.frame_code(split, index)
    return self.avatar.shared_code(choice)

  def background_for(self, size: RenderSize) -> np.ndarray:
    with self._lock:
      if size not in self._backgrounds:
        if len(self._backgrounds) > 32:
          self._backgrounds.clear()
        self._backgrounds[size] = scaled_background(
            self.background, float(self.camera.intrinsics[2]),
            float(self.camera.intrinsics[3]), size)
      return self._backgrounds[size]

  def chunk_for(self, size: RenderSize) -> int:
    """Rays per call for a render of `size`.

    A power of two from MIN_CHUNK to render.chunk, taking about
    CHUNK_SECONDS at the speed measured so far (so that a new event stops a
    full render soon), and at most a quarter of the frame. Fixed per size
    once a speed is known: the chunk's shape is compiled.
    """
    with self._lock:
      if size in self._chunks:
        return self._chunks[size]
      per_ray = self._per_ray()
    limit = self.avatar.renderer.chunk
    quarter = max(MIN_CHUNK, -(-size.rays // 4))
    if per_ray is None:
      return int(min(limit, quarter))
    target = CHUNK_SECONDS / per_ray
    chunk = MIN_CHUNK
    while chunk * 2 <= min(target, limit, quarter):
      chunk *= 2
    with self._lock:
      return self._chunks.setdefault(size, int(min(chunk, limit)))

  def _per_ray(self) -> Optional[float]:
    """Median seconds per ray of the sizes rendered so far (lock held)."""
    if not self._seconds:
      return None
    return float(np.median([t / s.rays for s, t in self._seconds.items()]))

  def warm_up(self):
    """Compiles and times the smallest render (so the first chunk sizes and
    previews already know the speed)."""
    wxyz, position = self.camera.to_viewer(self.front_c2w)
    train = self.splits['train']
    state = ViewState(wxyz, position, self.camera.fov,
                      self.camera.width / self.camera.height,
                      train.expressions[self.front],
                      self.code('frame', 'train', self.front), np.eye(4))
    for _ in range(2):
      self.render(state, min(self.height_options))

  def inputs_for(self, state: ViewState, size: RenderSize
                 ) -> tuple[renderer.FrameInputs, np.ndarray, np.ndarray]:
    """(FrameInputs of the padded render, c2w and intrinsics of the shown
    image)."""
    c2w, intrinsics = self.camera.from_viewer(state.wxyz, state.position,
                                              state.fov, size.height,
                                              size.width)
    c2w = np.asarray(state.motion, np.float64) @ c2w
    padded = intrinsics.copy()
    # The shown columns 0 .. width-1 keep their rays in the wider render.
    padded[2] = intrinsics[2] * size.width / size.padded
    inputs = renderer.frame_inputs(c2w, padded, state.expression, state.latent,
                                   self.background_for(size), size.height,
                                   size.padded)
    return inputs, c2w, intrinsics

  def render(self, state: ViewState, height: int,
             should_stop: Optional[Callable[[], bool]] = None) -> Frame:
    """Renders a view `height` rows high at its canvas aspect.

    Raises:
      renderer.RenderInterrupted: when `should_stop()` said so.
    """
    size = render_size(height, state.aspect)
    inputs, c2w, intrinsics = self.inputs_for(state, size)
    render = self.avatar.renderer
    chunk = self.chunk_for(size)
    start = time.perf_counter()
    out = render(inputs, size.height, size.padded, chunk, should_stop)
    seconds = time.perf_counter() - start
    compiled = self._record(size, chunk, seconds)
    image = images.to_uint8(out['rgb'][:, :size.width])
    return Frame(image, size, seconds, c2w, intrinsics, state, compiled)

  def _record(self, size: RenderSize, chunk: int, seconds: float) -> bool:
    """Keeps a render's time; True (and not kept) for the first render of
    a size and chunk, which compiled them."""
    with self._lock:
      if (size, chunk) not in self._compiled:
        self._compiled.add((size, chunk))
        return True
      old = self._seconds.get(size)
      self._seconds[size] = seconds if old is None else 0.5 * (old + seconds)
    return False

  def estimate(self, size: RenderSize) -> Optional[float]:
    """Expected seconds to render `size` (from the sizes rendered so far,
    in proportion to rays where it was not), or None before any."""
    with self._lock:
      if size in self._seconds:
        return self._seconds[size]
      per_ray = self._per_ray()
    return None if per_ray is None else per_ray * size.rays

  def auto_preview(self, full_height: int, aspect: float) -> int:
    """The largest offered height up to `full_height` expected to render in
    PREVIEW_SECONDS (the smallest before anything was measured)."""
    options = [h for h in self.height_options if h <= full_height] or [
        min(self.height_options)]
    best = options[0]
    for height in options:
      seconds = self.estimate(render_size(height, aspect))
      if seconds is not None and seconds <= PREVIEW_SECONDS:
        best = height
    return best

  def save(self, frame: Frame, extra: dict[str, Any]) -> pathlib.Path:
    """Writes `frame` to <workdir>/viewer/view_NNNN.png (the next free
    number) with a json of its camera and expression beside it."""
    folder = pathlib.Path(self.avatar.workdir) / SAVE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with self._lock:
      number = 1 + max([int(p.stem[5:]) for p in folder.glob('view_*.png')
                        if p.stem[5:].isdigit()], default=0)
      path = folder / f'view_{number:04d}.png'
      images.save_png(path, frame.image)
    path.with_suffix('.json').write_text(json.dumps({
        'workdir': str(self.avatar.workdir), 'step': self.avatar.step,
        'height': frame.size.height, 'width': frame.size.width,
        'c2w': frame.c2w.tolist(), 'intrinsics': frame.intrinsics.tolist(),
        'expression': np.asarray(frame.state.expression).tolist(),
        'latent': np.asarray(frame.state.latent).tolist(), **extra},
                                                indent=1) + '\n')
    return path


# --- The browser side (viser) -------------------------------------------------


def _one_at_a_time(method):
  """Runs a ClientView action under the view's action lock."""
  @functools.wraps(method)
  def locked(self, *args, **kwargs):
    with self._action:  # pylint: disable=protected-access
      return method(self, *args, **kwargs)
  return locked


class ClientView:
  """One browser tab: its GUI, its view state and its render thread.

  Attributes (read by tests; guarded by the view's lock):
    expression: float32 [E] the expression the view shows.
    shown: the last Frame sent to the browser, or None.
    shown_full: whether it was a full-resolution frame.
    frames_shown: frames sent so far.
    previews_shown: of which previews.
    abandoned: full renders abandoned for a newer event.
  """

  def __init__(self, viewer: Viewer, client: Any):
    self.viewer = viewer
    self.client = client
    self._cond = threading.Condition()
    self._version = 0
    self._changed = time.monotonic()
    self._closed = False
    self._syncing = False
    # GUI callbacks run on viser's thread pool, concurrently: one action at a
    # time, so that e.g. a pick right after "Pause" is not undone by it.
    self._action = threading.RLock()
    self._save_pending: list[Callable[[], None]] = []
    train = viewer.splits['train']
    self.split, self.index = 'train', viewer.front
    self.latent_choice = 'frame'
    self.expression = np.array(train.expressions[viewer.front], np.float32)
    self.latent = viewer.code('frame', 'train', viewer.front)
    self.motion = np.eye(4)
    self.full_height = viewer.camera.height
    self.preview_choice = AUTO
    self.playing = False
    self.play_source = 'train'
    self.play_position = 0
    self.head_motion = True
    self.shown: Optional[Frame] = None
    self.shown_full = False
    self.frames_shown = 0
    self.previews_shown = 0
    self.abandoned = 0
    self.camera_updates = 0
    self._camera = None
    self._build_gui()
    self._place_camera(viewer.front_c2w)
    client.camera.on_update(self._on_camera)
    self._read_camera()
    self._thread = threading.Thread(target=self._loop, daemon=True,
                                    name=f'viewer-client-{client.client_id}')
    self._thread.start()

  # GUI -----------------------------------------------------------------------

  def _build_gui(self):
    gui = self.client.gui
    viewer = self.viewer
    options = [str(h) for h in viewer.height_options]
    self._status = gui.add_markdown('Starting...')
    with gui.add_folder('View'):
      self._full = gui.add_dropdown(
          'Resolution', options, initial_value=str(self.full_height),
          hint='Render height (rows) when the view is still.')
      self._preview = gui.add_dropdown(
          'Preview', [AUTO] + options, initial_value=AUTO,
          hint='Render height while the camera or a slider moves; auto: '
          f'the largest expected to take at most {PREVIEW_SECONDS} s.')
      self._latent = gui.add_dropdown(
          'Latent', LATENTS, initial_value=self.latent_choice,
          hint='frame: the picked frame\'s own code (the shared one for '
          'unseen frames); mean / zero / fixed: one code for all.')
      self._reset = gui.add_button('Reset', hint='Frontal training camera '
                                   'and its frame\'s expression.')
      self._neutral = gui.add_button('Neutral', hint='The most neutral '
                                     'training expression (lowest norm).')
      self._save = gui.add_button(
          'Save image', hint=f'Full resolution, to <workdir>/{SAVE_DIR}/.')
    with gui.add_folder('Frame'):
      self._split = gui.add_dropdown('Split', SPLITS, initial_value='train')
      self._index = gui.add_slider(
          'Index', 0, max(1, viewer.splits['train'].num_frames - 1), 1,
          self.index, hint='Snaps camera, expression and latent to this '
          'frame.')
    with gui.add_folder('Play'):
      self._source = gui.add_dropdown('Source', tuple(viewer.sequences),
                                      initial_value='train')
      self._motion = gui.add_checkbox(
          'Head motion', True, hint='Apply the frames\' head motion '
          '(relative to the frontal camera) to the view.')
      self._play = gui.add_button('Play')
    self._sliders = []
    with gui.add_folder('Expression'):
      for k, label in enumerate(viewer.labels):
        low, high = float(viewer.low[k]), float(viewer.high[k])
        if high - low < 1e-6:
          low, high = low - 0.5, high + 0.5
        slider = gui.add_slider(label, low, high, (high - low) / 100,
                                float(np.clip(self.expression[k], low, high)))
        slider.on_update(self._expression_callback(k))
        self._sliders.append(slider)

    self._full.on_update(lambda _: self._set_heights())
    self._preview.on_update(lambda _: self._set_heights())
    self._latent.on_update(lambda _: self._set_latent())
    self._reset.on_click(lambda _: self.reset())
    self._neutral.on_click(lambda _: self.neutral())
    self._save.on_click(lambda _: self.save())
    self._split.on_update(lambda _: self._pick_split())
    self._index.on_update(lambda _: self._pick_index())
    self._source.on_update(lambda _: self._set_source())
    self._motion.on_update(lambda _: self._set_motion())
    self._play.on_click(lambda _: self.toggle_play())

  def _expression_callback(self, k: int):
    def update(_):
      if self._syncing:
        return
      with self._cond:
        self.expression = self.expression.copy()
        self.expression[k] = self._sliders[k].value
      self._touch()
    return update

  def _sync_sliders(self):
    """Moves the sliders to `expression` without feeding back."""
    self._syncing = True
    try:
      for slider, value in zip(self._sliders, self.expression):
        slider.value = float(np.clip(value, slider.min, slider.max))
    finally:
      self._syncing = False

  def _set_heights(self):
    with self._cond:
      self.full_height = int(self._full.value)
      self.preview_choice = self._preview.value
    self._touch()

  def _set_latent(self):
    with self._cond:
      self.latent_choice = self._latent.value
      self.latent = self.viewer.code(self.latent_choice, self.split,
                                     self.index)
    self._touch()

  def _pick_split(self):
    if self._syncing:
      return
    frames = self.viewer.splits[self._split.value].num_frames
    self._syncing = True
    try:
      self._index.max = max(1, frames - 1)
      self._index.value = min(int(self._index.value), frames - 1)
    finally:
      self._syncing = False
    self.pick(self._split.value, int(self._index.value))

  def _pick_index(self):
    if not self._syncing:
      self.pick(self._split.value, int(self._index.value))

  def _set_source(self):
    with self._cond:
      self.play_source = self._source.value
      self.play_position = 0
    self._touch()

  def _set_motion(self):
    with self._cond:
      self.head_motion = bool(self._motion.value)
      if not self.head_motion:
        self.motion = np.eye(4)
    self._touch()

  # Actions -----------------------------------------------------------------

  @_one_at_a_time
  def pick(self, split: str, index: int):
    """Snaps camera, expression and latent to frame `index` of `split`."""
    dataset = self.viewer.splits[split]
    index = int(np.clip(index, 0, dataset.num_frames - 1))
    with self._cond:
      self.playing = False
      self.split, self.index = split, index
      self.expression = np.array(dataset.expressions[index], np.float32)
      self.latent = self.viewer.code(self.latent_choice, split, index)
      self.motion = np.eye(4)
    self._play.label = 'Play'
    self._sync_sliders()
    self._syncing = True
    try:
      self._split.value = split
      self._index.max = max(1, dataset.num_frames - 1)
      self._index.value = index
    finally:
      self._syncing = False
    self._place_camera(dataset.c2w[index])
    self._touch()

  @_one_at_a_time
  def reset(self):
    """The frontal training camera with its frame's expression and code."""
    with self._cond:
      self.latent_choice = 'frame'
    self._syncing = True
    try:
      self._latent.value = 'frame'
    finally:
      self._syncing = False
    self.pick('train', self.viewer.front)

  @_one_at_a_time
  def neutral(self):
    """The most neutral training expression; the camera stays."""
    with self._cond:
      self.expression = np.array(
          self.viewer.splits['train'].expressions[self.viewer.neutral],
          np.float32)
    self._sync_sliders()
    self._touch()

  @_one_at_a_time
  def toggle_play(self):
    with self._cond:
      self.playing = not self.playing
      playing = self.playing
      sequence = self.viewer.sequences[self.play_source]
      if playing and self.play_source == self.split:
        self.play_position = self.index
      self.play_position %= len(sequence)
    self._play.label = 'Pause' if playing else 'Play'
    if not playing:
      self._settle()
    self._touch()

  def _settle(self):
    """After playing: the played frame's expression stays in the sliders and
    its head motion moves into the browser's camera."""
    with self._cond:
      motion, self.motion = self.motion, np.eye(4)
      camera = self._camera
      split, index = self.split, self.index
    self._sync_sliders()
    if camera is not None and not np.allclose(motion, np.eye(4)):
      wxyz, position, fov, _ = camera
      c2w, _ = self.viewer.camera.from_viewer(wxyz, position, fov, 1, 1)
      self._place_camera(motion @ c2w)
    self._syncing = True
    try:
      self._split.value = split
      self._index.value = index
    finally:
      self._syncing = False

  def save(self):
    """Writes the current view at full resolution (after rendering it)."""
    def write(frame: Frame):
      path = self.viewer.save(frame, {
          'latent_choice': self.latent_choice,
          'frame': [self.split, int(self.index)]})
      self._set_status(self._status_text(frame) + f'  \nsaved {path}')
      try:
        self.client.add_notification('Saved', str(path), auto_close_seconds=5)
      except Exception:  # pylint: disable=broad-except
        pass
      logging.info('viewer: saved %s', path)
    with self._cond:
      self._save_pending.append(write)
      self._cond.notify_all()

  def close(self):
    with self._cond:
      self._closed = True
      self._cond.notify_all()

  # Camera --------------------------------------------------------------------

  def _place_camera(self, c2w: np.ndarray):
    """Moves the browser's camera to a dataset camera."""
    position, look_at, up = self.viewer.camera.orbit(c2w, self.viewer.centre)
    camera = self.client.camera
    with self.client.atomic():
      camera.fov = self.viewer.camera.fov
      camera.position = position
      camera.look_at = look_at
      camera.up_direction = up
    self._read_camera()

  def _read_camera(self):
    camera = self.client.camera
    snapshot = (np.array(camera.wxyz, np.float64),
                np.array(camera.position, np.float64), float(camera.fov),
                float(camera.aspect) if camera.image_height else
                self.viewer.camera.width / self.viewer.camera.height)
    with self._cond:
      changed = self._camera is None or any(
          not np.allclose(a, b, rtol=0, atol=1e-9)
          for a, b in zip(snapshot, self._camera))
      self._camera = snapshot
    return changed

  def _on_camera(self, _):
    with self._cond:
      self.camera_updates += 1
    if self._read_camera():
      self._touch()

  def camera_state(self):
    """(wxyz, position, fov, aspect) as last seen from the browser."""
    with self._cond:
      return self._camera

  # Rendering -----------------------------------------------------------------

  def _touch(self):
    with self._cond:
      self._version += 1
      self._changed = time.monotonic()
      self._cond.notify_all()

  def _state(self) -> ViewState:
    wxyz, position, fov, aspect = self._camera
    return ViewState(wxyz, position, fov, aspect, self.expression.copy(),
                     np.asarray(self.latent, np.float32).copy(),
                     self.motion.copy())

  def _advance_play(self):
    """Moves to the next frame of the played sequence (lock held)."""
    sequence = self.viewer.sequences[self.play_source]
    n = self.play_position % len(sequence)
    self.expression = np.array(sequence.expressions[n], np.float32)
    self.motion = (sequence.motions[n] if self.head_motion else np.eye(4))
    if sequence.split is not None:
      self.split, self.index = sequence.split, n
      self.latent = self.viewer.code(self.latent_choice, sequence.split, n)
    else:
      self.latent = self.viewer.code(self.latent_choice, None, 0)
    self.play_position = n + 1

  def _loop(self):
    shown_version, shown_full = -1, False
    while True:
      saves, note = [], ''
      with self._cond:
        while not self._closed:
          since = time.monotonic() - self._changed
          idle = since >= IDLE_SECONDS
          current = shown_version == self._version
          if self._save_pending and current and shown_full:
            saves, self._save_pending = self._save_pending, []
            break
          if (self.playing or not current or
              (not shown_full and (idle or self._save_pending))):
            break
          self._cond.wait(None if shown_full else IDLE_SECONDS - since)
        if self._closed:
          return
        if not saves:
          # Saving renders at full resolution at once.
          full = idle or bool(self._save_pending)
          version = self._version
          if self.playing:
            self._advance_play()
            note = (f'playing {self.play_source} {self.play_position}/'
                    f'{len(self.viewer.sequences[self.play_source])}')
          state = self._state()
          if full:
            height = self.full_height
          elif self.preview_choice == AUTO:
            height = self.viewer.auto_preview(self.full_height, state.aspect)
          else:
            height = int(self.preview_choice)
          frame = None
        else:
          frame = self.shown
      if saves:
        for write in saves:
          write(frame)
        continue
      # A preview is never abandoned (while dragging, every one is shown); a
      # full render is, at the next change.
      should_stop = ((lambda v=version: self._version != v or self._closed)
                     if full else None)
      try:
        frame = self.viewer.render(state, height, should_stop)
      except renderer.RenderInterrupted:
        with self._cond:
          self.abandoned += 1
        continue
      except Exception as e:  # pylint: disable=broad-except
        logging.error('viewer: render failed: %s', traceback.format_exc())
        self._set_status(f'render failed: {e}')
        with self._cond:
          self._save_pending.clear()
        shown_version, shown_full = version, True
        continue
      if not self._show(frame, full, note):
        return
      with self._cond:
        self.shown, self.shown_full = frame, full
        self.frames_shown += 1
        self.previews_shown += not full
        self._cond.notify_all()
      shown_version, shown_full = version, full

  def _status_text(self, frame: Frame, full: bool = True) -> str:
    ms = 1000 * frame.seconds
    rays = frame.size.rays / max(frame.seconds, 1e-9)
    return (f'**{frame.size.width}x{frame.size.height}**'
            f'{"" if full else " preview"}: {ms:.0f} ms/frame, '
            f'{rays / 1000:.1f}k rays/s' +
            (' (compiling this size)' if frame.compiled else ''))

  def _set_status(self, text: str):
    try:
      self._status.content = text
    except Exception:  # pylint: disable=broad-except
      pass

  def _show(self, frame: Frame, full: bool, note: str = '') -> bool:
    """Sends a frame to the browser; False once the client is gone."""
    try:
      self.client.scene.set_background_image(frame.image, format='jpeg',
                                             jpeg_quality=JPEG_QUALITY)
      self._status.content = self._status_text(frame, full) + (
          f'  \n{note}' if note else '')
      return True
    except Exception:  # pylint: disable=broad-except
      with self._cond:
        if self._closed:
          return False
      logging.warning('viewer: could not send a frame: %s',
                      traceback.format_exc())
      return True

  def wait_for(self, predicate: Callable[['ClientView'], bool],
               timeout: float) -> bool:
    """Waits until `predicate(self)` holds (checked whenever a frame is
    shown); returns whether it did."""
    end = time.monotonic() + timeout
    with self._cond:
      while not predicate(self):
        left = end - time.monotonic()
        if left <= 0:
          return False
        self._cond.wait(min(left, 0.1))
      return True


class ViewerServer:
  """A viser server showing a Viewer to every browser tab that connects.

  Attributes:
    viewer: the Viewer.
    server: the viser.ViserServer.
    views: {client id: ClientView} of the connected tabs.
  """

  def __init__(self, viewer: Viewer, host: str = '127.0.0.1',
               port: int = 8080, verbose: bool = False):
    import viser  # pylint: disable=g-import-not-at-top
    self.viewer = viewer
    viewer.warm_up()
    self.host = host
    self.server = viser.ViserServer(host=host, port=port, verbose=verbose)
    self.views: dict[int, ClientView] = {}
    self._lock = threading.Lock()
    gui = self.server.gui
    gui.configure_theme(show_share_button=False, control_width='medium')
    gui.set_panel_label(f'nerface-jax: {viewer.avatar.workdir.name} '
                        f'(step {viewer.avatar.step})')
    position, look_at, up = viewer.camera.orbit(viewer.front_c2w,
                                                viewer.centre)
    initial = self.server.initial_camera
    initial.fov = viewer.camera.fov
    initial.position = position
    initial.look_at = look_at
    initial.up = up
    self.server.on_client_connect(self._connect)
    self.server.on_client_disconnect(self._disconnect)

  @property
  def port(self) -> int:
    return self.server.get_port()

  @property
  def url(self) -> str:
    host = self.host if self.host not in ('0.0.0.0', '::', '') else (
        '127.0.0.1')
    return f'http://{host}:{self.port}'

  def _connect(self, client):
    view = ClientView(self.viewer, client)
    with self._lock:
      self.views[client.client_id] = view

  def _disconnect(self, client):
    with self._lock:
      view = self.views.pop(client.client_id, None)
    if view is not None:
      view.close()

  def wait_for_view(self, timeout: float) -> Optional[ClientView]:
    """The first connected view, waiting up to `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      with self._lock:
        if self.views:
          return next(iter(self.views.values()))
      time.sleep(0.05)
    return None

  def stop(self):
    with self._lock:
      views = list(self.views.values())
      self.views.clear()
    for view in views:
      view.close()
    self.server.stop()
