"""Face tracking with the MediaPipe Face Landmarker, and its canonical mesh.

Every frame gets 478 landmarks, 52 blendshape scores and the facial
transformation matrix, which maps the canonical face (centimetres) into an
OpenGL camera with a 63 degree vertical field of view and the principal point
at the image centre. A frame is kept only when the matrix explains its
landmarks (`MAX_REPROJECTION`): the tracker can return a face for a frame in
which it lost the person, and such a pose would poison training silently.

The model bundle `face_landmarker.task` is a zip that also carries the
canonical face mesh; `canonical_mesh` reads it with a minimal protobuf
decoder, so nothing beyond the bundle itself is needed to check the tracking.
"""

import contextlib
import dataclasses
import math
import os
import pathlib
import struct
import zipfile
from typing import Callable, Iterable, Optional

import numpy as np

from nerface_jax import data
from nerface_jax.preprocess import errors
from nerface_jax.preprocess import geometry

MODEL_FILE = 'face_landmarker.task'
MODEL_URL = ('https://storage.googleapis.com/mediapipe-models/face_landmarker/'
             'face_landmarker/float16/latest/face_landmarker.task')
MODEL_PAGE = ('https://ai.google.dev/edge/mediapipe/solutions/vision/'
              'face_landmarker')
# Members the bundle must hold; checked before MediaPipe sees the file, whose
# own error for a damaged bundle does not say which file is at fault.
MODEL_MEMBERS = ('face_detector.tflite', 'face_landmarks_detector.tflite',
                 'face_blendshapes.tflite',
                 'geometry_pipeline_metadata_landmarks.binarypb')
GEOMETRY_MEMBER = 'geometry_pipeline_metadata_landmarks.binarypb'
NUM_LANDMARKS = 478  # 468 mesh vertices + 10 iris points.
NUM_MESH_VERTICES = 468
NUM_BLENDSHAPES = 52
FOV_Y_DEGREES = 63.0  # Vertical field of view of the tracker's camera.
# A frame whose canonical mesh, posed by its matrix, lands further than this
# fraction of the face height (RMS over the mesh) from its landmarks is a
# failed track. Good tracks measure about 0.02-0.04 (expressions move the
# landmarks, not the rigid mesh); a lost face is far above.
MAX_REPROJECTION = 0.15


def default_model_path() -> pathlib.Path:
  """Where the tracker bundle is looked for when no path is given.

  `<cache>/face_landmarker.task`, with the cache of the built-in person:
  `$NERFACE_JAX_CACHE`, else `~/.cache/nerface_jax`.
  """
  return data.cache_dir() / MODEL_FILE


def _download_hint(path: pathlib.Path) -> str:
  return (f'Download {MODEL_FILE} from {MODEL_URL} (MediaPipe Face Landmarker, '
          f'see {MODEL_PAGE}) and save it as {path}, or pass its location with '
          '--tracker_model=PATH.')


def check_model(path: Optional[os.PathLike[str] | str] = None) -> pathlib.Path:
  """Resolves and validates the tracker bundle.

  Args:
    path: the bundle; None looks in `default_model_path()`.

  Returns:
    The bundle's path.

  Raises:
    PreprocessError: the file is missing, not a zip, or lacks a model; the
      message says where to download `face_landmarker.task`.
  """
  path = (default_model_path() if path is None
          else pathlib.Path(path).expanduser())
  if not path.is_file():
    raise errors.PreprocessError(
        f'{path}: face tracker model not found. ' + _download_hint(path))
  try:
    with zipfile.ZipFile(path) as bundle:
      missing = [m for m in MODEL_MEMBERS if m not in bundle.namelist()]
      damaged = bundle.testzip()
  except (zipfile.BadZipFile, OSError) as e:
    raise errors.PreprocessError(
        f'{path}: not a valid face tracker model ({e}); the file is corrupt '
        'or not a MediaPipe .task bundle. ' + _download_hint(path)) from None
  if missing or damaged:
    what = (f'lacks {", ".join(missing)}' if missing
            else f'has a corrupt member {damaged}')
    raise errors.PreprocessError(
        f'{path}: not a Face Landmarker bundle (it {what}). ' +
        _download_hint(path))
  return path


# ---------------------------------------------------------------------------
# The canonical mesh inside the bundle.


def _varint(buffer: bytes, pos: int) -> tuple[int, int]:
  """Decodes a protobuf varint at `pos`; returns (value, next position)."""
  value = shift = 0
  while True:
    if pos >= len(buffer):
      raise ValueError('truncated varint')
    byte = buffer[pos]
    value |= (byte & 0x7F) << shift
    pos += 1
    if byte < 0x80:
      return value, pos
    shift += 7


def _fields(buffer: bytes) -> Iterable[tuple[int, int, object]]:
  """Yields (field number, wire type, value) of a protobuf message.

  Values: int for varints, bytes for length-delimited fields and for the
  4- and 8-byte fixed types (decoded by the caller, which knows their type).
  """
  pos = 0
  sizes = {1: 8, 5: 4}
  while pos < len(buffer):
    key, pos = _varint(buffer, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(buffer, pos)
    elif wire == 2:
      length, pos = _varint(buffer, pos)
      value, pos = buffer[pos:pos + length], pos + length
    elif wire in sizes:
      value, pos = buffer[pos:pos + sizes[wire]], pos + sizes[wire]
    else:
      raise ValueError(f'unsupported wire type {wire}')
    yield number, wire, value


def parse_canonical_mesh(metadata: bytes) -> tuple[np.ndarray, np.ndarray]:
  """The canonical face mesh of MediaPipe's geometry pipeline metadata.

  Args:
    metadata: bytes of `geometry_pipeline_metadata_landmarks.binarypb`.

  Returns:
    (vertices float64 [468, 3] in centimetres, landmark order;
     triangles int32 [T, 3] vertex indices).
  """
  mesh = next(v for n, w, v in _fields(metadata) if n == 1 and w == 2)
  floats, indices = [], []
  for number, wire, value in _fields(mesh):
    if number == 3:
      # Packed (one length-delimited run) or one fixed32 per value.
      floats.extend(struct.unpack(f'<{len(value) // 4}f', value))
    elif number == 4:
      if wire == 2:
        pos = 0
        while pos < len(value):
          index, pos = _varint(value, pos)
          indices.append(index)
      else:
        indices.append(value)
  # Five floats per vertex: x, y, z, u, v.
  vertex_buffer = np.asarray(floats, np.float64).reshape(-1, 5)
  return (vertex_buffer[:, :3],
          np.asarray(indices, np.int32).reshape(-1, 3))


def canonical_mesh(model_path: os.PathLike[str] | str
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(vertices float64 [468, 3] cm, triangles int32 [T, 3]) of the bundle."""
  with zipfile.ZipFile(model_path) as bundle:
    return parse_canonical_mesh(bundle.read(GEOMETRY_MEMBER))


# ---------------------------------------------------------------------------
# Tracking.


@dataclasses.dataclass(frozen=True)
class Tracks:
  """Per-frame tracker output of a whole video (N decoded frames).

  Attributes:
    landmarks: float32 [N, 478, 3] (x / W, y / H, relative depth) as the
      tracker gives them; NaN on frames without a valid track.
    matrices: float64 [N, 4, 4] facial transformation matrices (canonical
      face in cm -> OpenGL camera in cm); NaN where invalid.
    blendshapes: float32 [N, 52] blendshape scores in [0, 1]; NaN where
      invalid.
    valid: bool [N] frames with a usable track.
    reasons: N entries, None for valid frames, else why the frame is skipped.
    reprojection: float64 [N] RMS distance between the posed canonical mesh
      and the landmarks as a fraction of the face height (NaN: no face).
    blendshape_names: the 52 category names, in order.
    height: int frame height in pixels.
    width: int frame width in pixels.
  """
  landmarks: np.ndarray
  matrices: np.ndarray
  blendshapes: np.ndarray
  valid: np.ndarray
  reasons: list[Optional[str]]
  reprojection: np.ndarray
  blendshape_names: list[str]
  height: int
  width: int

  @property
  def num_frames(self) -> int:
    return self.valid.shape[0]


def reprojection_error(landmarks: np.ndarray, matrix: np.ndarray,
                       vertices: np.ndarray, height: int,
                       width: int) -> float:
  """RMS landmark-to-projected-mesh distance, as a fraction of face height.

  Args:
    landmarks: float [478 or 468, 2+] normalised (x / W, y / H) landmarks.
    matrix: float [4, 4] facial transformation matrix.
    vertices: float [468, 3] canonical mesh vertices in cm.
    height: int frame height.
    width: int frame width.

  Returns:
    float; inf when the mesh lands behind the camera.
  """
  pixels = landmarks[:NUM_MESH_VERTICES, :2] * np.array([width, height])
  cam = vertices @ matrix[:3, :3].T + matrix[:3, 3]
  if np.any(cam[:, 2] >= 0):
    return math.inf
  focal = geometry.focal_from_fov(height, FOV_Y_DEGREES)
  projected = np.stack([0.5 * width + focal * cam[:, 0] / -cam[:, 2],
                        0.5 * height - focal * cam[:, 1] / -cam[:, 2]], -1)
  face_height = np.ptp(pixels[:, 1])
  rms = np.sqrt(np.mean(np.sum((projected - pixels) ** 2, axis=-1)))
  return float(rms / max(face_height, 1.0))


def _timestamps(fps: float) -> Callable[[int], int]:
  """Frame index -> strictly increasing integer milliseconds."""
  return lambda index: int(round(index * 1000.0 / fps))


def track(frames: Iterable[tuple[int, np.ndarray]], model_path: pathlib.Path,
          fps: float, height: int, width: int,
          progress: Optional[Callable[[int], None]] = None) -> Tracks:
  """Tracks every frame with the Face Landmarker in VIDEO mode.

  Args:
    frames: (index, uint8 [H, W, 3] RGB) in time order, indices 0, 1, 2, ...
    model_path: a bundle that passed `check_model`.
    fps: frames per second (spaces the tracker's timestamps).
    height: int frame height.
    width: int frame width.
    progress: called with the number of frames done, now and then.

  Returns:
    Tracks of all frames given.

  Raises:
    PreprocessError: MediaPipe refuses the bundle (a damaged model).
  """
  # Imported here so that only tracking needs MediaPipe (and its TFLite).
  import mediapipe as mp  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python import vision  # pylint: disable=g-import-not-at-top
  from mediapipe.tasks.python.core import base_options  # pylint: disable=g-import-not-at-top

  vertices, _ = canonical_mesh(model_path)
  options = vision.FaceLandmarkerOptions(
      base_options=base_options.BaseOptions(
          model_asset_path=str(model_path)),
      running_mode=vision.RunningMode.VIDEO, num_faces=1,
      output_face_blendshapes=True,
      output_facial_transformation_matrixes=True)
  quiet = contextlib.ExitStack()
  native_log = quiet.enter_context(errors.native_stderr())
  try:
    landmarker = vision.FaceLandmarker.create_from_options(options)
  except (RuntimeError, ValueError) as e:
    lines = (str(e).strip() or native_log().strip()).splitlines()
    quiet.close()
    raise errors.PreprocessError(
        f'{model_path}: MediaPipe cannot load the face tracker model '
        f'({lines[-1] if lines else type(e).__name__}). ' +
        _download_hint(model_path)) from None

  landmarks, matrices, blendshapes, reasons, reproj = [], [], [], [], []
  names: list[str] = []
  stamp = _timestamps(fps)
  # The landmarker must be closed explicitly: left to the garbage collector
  # it raises at interpreter exit.
  with landmarker, quiet:
    for index, rgb in frames:
      if index != len(reasons):
        raise ValueError(f'frames must be numbered 0, 1, ...; got {index} '
                         f'after {len(reasons)} frames.')
      image = mp.Image(image_format=mp.ImageFormat.SRGB,
                       data=np.ascontiguousarray(rgb))
      result = landmarker.detect_for_video(image, stamp(index))
      # The native start-up chatter ends with the first frame.
      quiet.close()
      frame_landmarks = np.full((NUM_LANDMARKS, 3), np.nan, np.float32)
      frame_matrix = np.full((4, 4), np.nan)
      frame_blend = np.full((NUM_BLENDSHAPES,), np.nan, np.float32)
      reason, error = None, math.nan
      if not result.face_landmarks:
        reason = 'no face'
      elif (not result.facial_transformation_matrixes
            or not result.face_blendshapes):
        reason = 'tracker returned no pose or no blendshapes'
      else:
        points = np.array([(p.x, p.y, p.z) for p in result.face_landmarks[0]],
                          np.float32)
        matrix = np.asarray(result.facial_transformation_matrixes[0],
                            np.float64)
        scores = np.array([c.score for c in result.face_blendshapes[0]],
                          np.float32)
        names = names or [c.category_name for c in result.face_blendshapes[0]]
        if (points.shape != (NUM_LANDMARKS, 3)
            or scores.shape != (NUM_BLENDSHAPES,)
            or not (np.all(np.isfinite(points)) and np.all(np.isfinite(matrix))
                    and np.all(np.isfinite(scores)))):
          reason = 'tracker output incomplete or not finite'
        else:
          error = reprojection_error(points, matrix, vertices, height, width)
          if not error <= MAX_REPROJECTION:
            reason = (f'failed track (posed mesh {error:.2f} face heights '
                      'from the landmarks)')
          else:
            frame_landmarks, frame_matrix, frame_blend = points, matrix, scores
      landmarks.append(frame_landmarks)
      matrices.append(frame_matrix)
      blendshapes.append(frame_blend)
      reasons.append(reason)
      reproj.append(error)
      if progress is not None and (index + 1) % 100 == 0:
        progress(index + 1)
  if not reasons:
    raise ValueError('no frames to track.')
  return Tracks(
      landmarks=np.stack(landmarks), matrices=np.stack(matrices),
      blendshapes=np.stack(blendshapes),
      valid=np.array([r is None for r in reasons]), reasons=reasons,
      reprojection=np.asarray(reproj, np.float64),
      blendshape_names=names, height=height, width=width)
