"""Camera paths and expression edits for rendering a trained avatar (numpy).

Orbits about the head, expression sweeps, and the original's delta transfer
for reenactment. Poses are camera-to-world matrices in the dataset's world
(the tracked head's frame).
"""

import math
from typing import Optional, Sequence

import numpy as np

from nerface_jax import errors


def frontal_index(c2w: np.ndarray, centre: np.ndarray) -> int:
  """The frame whose viewing direction is closest to the mean one.

  Args:
    c2w: float [F, 4, 4].
    centre: float [3] head centre.
  """
  offsets = np.asarray(c2w, np.float64)[:, :3, 3] - centre
  offsets /= np.linalg.norm(offsets, axis=-1, keepdims=True)
  mean = offsets.mean(0)
  return int(np.argmax(offsets @ mean))


def _axis_rotation(axis: np.ndarray, angle: float) -> np.ndarray:
  axis = axis / np.linalg.norm(axis)
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]],
                [-axis[1], axis[0], 0]])
  return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def rotate_about(c2w: np.ndarray, rotation: np.ndarray,
                 centre: np.ndarray) -> np.ndarray:
  """Moves a camera rigidly by `rotation` about the point `centre`.

  Args:
    c2w: float [4, 4].
    rotation: float [3, 3].
    centre: float [3].

  Returns:
    float64 [4, 4].
  """
  motion = np.eye(4)
  motion[:3, :3] = rotation
  motion[:3, 3] = centre - rotation @ centre
  return motion @ np.asarray(c2w, np.float64)


def orbit_poses(c2w: np.ndarray, centre: np.ndarray, num: int,
                yaw_degrees: float = 25.0,
                pitch_degrees: float = 10.0) -> np.ndarray:
  """A smooth closed path around the head: yaw sweeps once, pitch twice.

  Args:
    c2w: float [4, 4] the starting camera (looking at the head).
    centre: float [3] the head centre the camera keeps looking at.
    num: N frames.
    yaw_degrees: yaw amplitude.
    pitch_degrees: pitch amplitude.

  Returns:
    float32 [N, 4, 4].
  """
  c2w = np.asarray(c2w, np.float64)
  up, right = c2w[:3, 1], c2w[:3, 0]
  poses = []
  for n in range(num):
    phase = 2 * math.pi * n / num
    rotation = (_axis_rotation(up, math.radians(yaw_degrees) * math.sin(phase))
                @ _axis_rotation(right, math.radians(pitch_degrees) *
                                 math.sin(2 * phase)))
    poses.append(rotate_about(c2w, rotation, centre))
  return np.asarray(poses, np.float32)


def expression_sweep(expression: np.ndarray, coeffs: Sequence[int], low: float,
                     high: float, num: int) -> np.ndarray:
  """Sets coefficients `coeffs` from `low` to `high` over `num` frames.

  Args:
    expression: float [E] the starting expression.
    coeffs: indices into the expression.
    low: first value.
    high: last value.
    num: N frames.

  Returns:
    float32 [N, E]; the other coefficients keep their values.
  """
  expression = np.asarray(expression, np.float32)
  for c in coeffs:
    if not 0 <= c < expression.shape[0]:
      raise errors.RenderError(
          f'--coeff={c} is outside the expression, which has '
          f'{expression.shape[0]} coefficients (0 to '
          f'{expression.shape[0] - 1}).')
  out = np.tile(expression, (num, 1))
  values = np.linspace(low, high, num, dtype=np.float32)
  out[:, list(coeffs)] = values[:, None]
  return out


def neutral_index(expressions: np.ndarray, chosen: Optional[int]) -> int:
  """`chosen`, or the frame of lowest expression norm (the most neutral).

  Args:
    expressions: float [F, E].
    chosen: a frame index, or None.
  """
  if chosen is not None:
    if not 0 <= chosen < len(expressions):
      raise errors.RenderError(f'neutral frame {chosen} is outside the '
                               f'{len(expressions)} frames.')
    return chosen
  return int(np.argmin(np.linalg.norm(expressions, axis=-1)))


def reenactment(target_neutral: np.ndarray, target_front: np.ndarray,
                target_centre: np.ndarray, driver_expressions: np.ndarray,
                driver_neutral: np.ndarray, driver_c2w: np.ndarray,
                driver_front: np.ndarray):
  """The original's delta transfer of expressions and head rotations.

  expression = target neutral + (driver - driver neutral); the driver's head
  rotation relative to its most frontal pose is applied to the target's most
  frontal camera, about the target's head centre (translations are not
  transferred: the two heads differ in size and placement).

  Args:
    target_neutral: float [E] the avatar's neutral expression.
    target_front: float [4, 4] the avatar's most frontal camera.
    target_centre: float [3] the avatar's head centre.
    driver_expressions: float [N, E].
    driver_neutral: float [E] the driver's neutral expression.
    driver_c2w: float [N, 4, 4] the driver's cameras.
    driver_front: float [4, 4] the driver's most frontal camera.

  Returns:
    (expressions float32 [N, E], c2w float32 [N, 4, 4]).
  """
  expressions = (np.asarray(target_neutral)[None] +
                 (np.asarray(driver_expressions) - driver_neutral[None]))
  front_rotation = np.asarray(driver_front, np.float64)[:3, :3]
  poses = [rotate_about(target_front, c[:3, :3] @ front_rotation.T,
                        target_centre)
           for c in np.asarray(driver_c2w, np.float64)]
  return expressions.astype(np.float32), np.asarray(poses, np.float32)
