"""The built-in synthetic person: a procedurally rendered talking head.

A small analytic scene stands in for a tracked video of a real person: a head
made of ellipsoids (cranium, jaw, nose, ears, eyes, eyelids, a mouth cavity)
on a cylindrical neck, with smooth procedural skin, hair, brows and lips. It is
ray-cast in numpy with exactly the camera of docs/architecture.md §3 and written
to disk in the NeRFace dataset format, so the loader, the sampler and the
model see it like any real subject. `render` is the ground truth for an
arbitrary pose, expression and appearance (controllability checks).

Head coordinates are metre-like, as in the released data: the head sits at the
origin looking along +z with +y up, so the person's left is +x.

What drives the image:
  - the camera-to-world matrix (the head pose folded into the camera);
  - four expression coefficients: `JAW` (0 closed .. 1 open: the chin drops,
    changing the silhouette, and a dark mouth cavity appears), `BLINK_L` and
    `BLINK_R` (0 open .. 1 closed eyelid) and `BROWS` (-1 low .. 1 raised).
    The other coefficients of the `EXPR_DIM`-long vector carry smooth
    tracker-like noise that does not change the image;
  - an appearance vector (light yaw, light pitch in radians, warmth of the
    light's colour) that drifts per frame as a random walk: the part of the
    image no expression explains, which the per-frame latent code must absorb.
"""

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from nerface_jax import camera
from nerface_jax import data

EXPR_DIM = 76  # Expression length of the released NeRFace data.
JAW = 0  # Mouth opening, 0 (closed) .. 1 (wide open).
BLINK_L = 1  # Person's left eyelid (at +x), 0 (open) .. 1 (closed).
BLINK_R = 2  # Person's right eyelid (at -x), 0 (open) .. 1 (closed).
BROWS = 3  # Eyebrow height, -1 (lowered) .. 1 (raised).
APPEARANCE_DIM = 3  # (light yaw [rad], light pitch [rad], light warmth).

# Bump whenever the generated images or json change, so cached copies of an
# older generator are not mistaken for the current one.
VERSION = 1

FPS = 25.0  # Frame rate the trajectory's time constants assume.
DISTANCE = 0.5  # Camera distance from the head centre (the released data: mean camera z about 0.5).
FOCAL = 1.2  # |fx| = |fy| = FOCAL * size: the head fills ~half the height.
PRINCIPAL = (0.49, 0.51)  # (cx, cy) as fractions, slightly off-centre.
SUPERSAMPLE = 3  # Rays per pixel along each axis (3x3, centre included).
SPLIT_TEST = 0.1  # Last fraction of the frames in time.
SPLIT_VAL = 0.05  # Random fraction of the remaining frames.

# Eye centres (person's left eye first) and the eyelid radius: everything a
# blink changes lies inside these spheres.
EYE_CENTRES = ((0.029, 0.024, 0.071), (-0.029, 0.024, 0.071))
LID_RADIUS = 0.0142

_EYE_RADIUS = 0.0128
_JSON_DIGITS = 7  # Significant digits of every float written to json.


# ---------------------------------------------------------------------------
# Scene geometry.


@dataclasses.dataclass(frozen=True, eq=False)
class _Primitive:
  """An ellipsoid (or, with an infinite radius, an elliptic cylinder).

  Attributes:
    name: selects the material.
    centre: float64 [3] centre in head coordinates.
    radii: float64 [3] semi-axes along the local axes (inf: unbounded).
    rotation: float64 [3, 3] columns are the local axes in head coordinates.
    keep: optional predicate on local points float64 [N, 3] -> bool [N]; a
      front-surface hit outside it is a miss (eyelids, the neck's extent).
    edge: local y of the upper eyelid's edge (eyelids only).
  """
  name: str
  centre: np.ndarray
  radii: np.ndarray
  rotation: np.ndarray
  keep: Optional[Callable[[np.ndarray], np.ndarray]] = None
  edge: float = 0.0


def _const(values) -> np.ndarray:
  """A read-only float64 array: module constants must not be mutable."""
  array = np.array(values, np.float64)
  array.flags.writeable = False
  return array


def _rot_x(angle: float) -> np.ndarray:
  """float64 [3, 3] rotation about +x; positive angles move +z towards -y."""
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
  """float64 [3, 3] rotation about +y; positive angles move +z towards +x."""
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(angle: float) -> np.ndarray:
  """float64 [3, 3] rotation about +z; positive angles move +x towards +y."""
  c, s = math.cos(angle), math.sin(angle)
  return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


_CRANIUM_CENTRE = _const([0.0, 0.012, -0.005])
_CRANIUM_RADII = _const([0.074, 0.104, 0.09])
_JAW_CENTRE = _const([0.0, -0.056, 0.008])
_JAW_RADII = _const([0.05, 0.045, 0.07])
# The jaw swings about a hinge behind the cheeks, like a mandible, and slides
# down a little: the chin drops and moves back, so the lower silhouette moves.
_JAW_HINGE = _const([0.0, -0.02, -0.03])
_JAW_ANGLE = math.radians(18.0)
_JAW_DROP = 0.01
_MOUTH_CENTRE = _const([0.0, -0.052, 0.033])
_MOUTH_RADII = _const([0.023, 0.016, 0.042])
_NOSE_CENTRE = _const([0.0, -0.002, 0.084])
_NOSE_RADII = _const([0.013, 0.022, 0.022])
_NOSE_TILT = math.radians(-12.0)  # Nose ridge leans back towards the brow.
# A point on the head surface, the tip of the nose (the end of the nose
# ellipsoid's forward axis), in head coordinates: visible from every pose of
# the trajectory, it anchors projection tests.
NOSE_TIP = tuple(float(v) for v in _NOSE_CENTRE + _NOSE_RADII[2] * _rot_x(
    _NOSE_TILT)[:, 2])
_EAR_CENTRE = _const([0.073, 0.005, -0.012])
_EAR_RADII = _const([0.012, 0.027, 0.017])
_NECK_CENTRE = _const([0.0, 0.0, -0.022])
_NECK_RADII = _const([0.04, np.inf, 0.044])
_NECK_RANGE = (-0.6, -0.02)  # Its top is buried in the head.
# Eyelid openings in eye-local y: the lower lid is fixed, the upper one comes
# down to meet it as the blink coefficient goes to 1.
_LID_LOWER = -0.0085
_LID_UPPER = 0.0065
_BROW_HEIGHT = 0.049
_BROW_TRAVEL = 0.008


def _check_expression(expression: np.ndarray) -> np.ndarray:
  expression = np.asarray(expression, np.float64)
  if expression.shape != (EXPR_DIM,):
    raise ValueError(f'expression must have shape ({EXPR_DIM},), got '
                     f'{expression.shape}.')
  return expression


def _jaw_pose(jaw: float) -> tuple[np.ndarray, np.ndarray]:
  """Centre float64 [3] and rotation float64 [3, 3] of the jaw ellipsoid."""
  # Clipped so extrapolated coefficients cannot push the jaw through the neck.
  jaw = float(np.clip(jaw, -0.2, 1.5))
  rotation = _rot_x(jaw * _JAW_ANGLE)
  centre = _JAW_HINGE + rotation @ (_JAW_CENTRE - _JAW_HINGE)
  return centre + np.array([0.0, -_JAW_DROP * jaw, 0.0]), rotation


def _lid_edge(blink: float) -> float:
  """Eye-local y of the upper eyelid's edge; at blink 1 it meets the lower."""
  blink = float(np.clip(blink, 0.0, 1.0))
  return _LID_UPPER + blink * (_LID_LOWER - _LID_UPPER)


def _lid_keep(edge: float) -> Callable[[np.ndarray], np.ndarray]:
  """Eyelid extent: eye-local points [N, 3] -> bool [N]."""

  def keep(local: np.ndarray) -> np.ndarray:
    return (local[:, 1] >= edge) | (local[:, 1] <= _LID_LOWER)

  return keep


def _neck_keep(local: np.ndarray) -> np.ndarray:
  return (local[:, 1] > _NECK_RANGE[0]) & (local[:, 1] < _NECK_RANGE[1])


def _primitives(expression: np.ndarray) -> list[_Primitive]:
  """The scene for one expression float64 [EXPR_DIM]."""
  eye = np.eye(3)
  jaw_centre, jaw_rotation = _jaw_pose(expression[JAW])
  mirror = np.array([-1.0, 1.0, 1.0])
  prims = [
      _Primitive('cranium', _CRANIUM_CENTRE, _CRANIUM_RADII, eye),
      _Primitive('jaw', jaw_centre, _JAW_RADII, jaw_rotation),
      _Primitive('mouth', _MOUTH_CENTRE, _MOUTH_RADII, eye),
      _Primitive('nose', _NOSE_CENTRE, _NOSE_RADII, _rot_x(_NOSE_TILT)),
      _Primitive('ear', _EAR_CENTRE, _EAR_RADII, eye),
      _Primitive('ear', _EAR_CENTRE * mirror, _EAR_RADII, eye),
      _Primitive('neck', _NECK_CENTRE, _NECK_RADII, eye, _neck_keep),
  ]
  for centre, blink in zip(EYE_CENTRES, (expression[BLINK_L],
                                         expression[BLINK_R])):
    centre = np.asarray(centre)
    prims.append(_Primitive('eye', centre, np.full(3, _EYE_RADIUS), eye))
    edge = _lid_edge(blink)
    prims.append(_Primitive('lid', centre, np.full(3, LID_RADIUS), eye,
                            _lid_keep(edge), edge))
  return prims


def _intersect(prim: _Primitive, origin: np.ndarray,
               dirs: np.ndarray) -> np.ndarray:
  """Depth of the front surface hit of rays sharing one origin.

  Args:
    prim: the primitive.
    origin: float64 [3] ray origin in head coordinates.
    dirs: float64 [3, ...] unnormalised directions (camera z component -1),
      components first so that every operation runs on long contiguous rows.

  Returns:
    float64 [...] ray parameter (= camera depth) of the first hit, inf on a
    miss.
  """
  # In the local frame scaled by the radii the ellipsoid is the unit sphere;
  # an infinite radius drops its axis, which makes an elliptic cylinder.
  rel = prim.rotation.T @ (origin - prim.centre)
  local_dirs = [_local_dir(prim, dirs, k) for k in range(3)]
  a = b = c = 0.0
  for k in range(3):
    if np.isfinite(prim.radii[k]):
      scaled = local_dirs[k] * (1.0 / prim.radii[k])
      a = a + scaled * scaled
      b = b + scaled * (rel[k] / prim.radii[k])
      c = c + (rel[k] / prim.radii[k]) ** 2
  disc = b * b - a * (c - 1.0)
  # a is 0 only for a ray along a cylinder's axis, which never meets it.
  with np.errstate(divide='ignore', invalid='ignore'):
    t = (-b - np.sqrt(np.maximum(disc, 0.0))) / a
  # Only the front surface counts: t <= 0 means the camera is inside, which
  # no usable view has.
  t[(disc <= 0.0) | ~(t > 0.0)] = np.inf
  if prim.keep is not None:
    idx = np.nonzero(np.isfinite(t))
    local = np.stack([rel[k] + t[idx] * local_dirs[k][idx] for k in range(3)],
                     axis=1)
    miss = ~prim.keep(local)
    t[tuple(i[miss] for i in idx)] = np.inf
  return t


def _local_dir(prim: _Primitive, dirs: np.ndarray, k: int) -> np.ndarray:
  """Component k float64 [...] of directions [3, ...] in the local frame."""
  if np.array_equal(prim.rotation, np.eye(3)):
    return dirs[k]  # Most primitives are axis-aligned: skip the arithmetic.
  r = prim.rotation[:, k]
  return r[0] * dirs[0] + r[1] * dirs[1] + r[2] * dirs[2]


def _bound(prim: _Primitive) -> _Primitive:
  """A sphere (or, for a cylinder, the cylinder) enclosing a primitive."""
  if not np.all(np.isfinite(prim.radii)):
    return dataclasses.replace(prim, keep=None)
  return _Primitive('bound', prim.centre, np.full(3, prim.radii.max()),
                    np.eye(3))


def _grow(prim: _Primitive, margin: float) -> _Primitive:
  """The primitive with every radius enlarged by `margin`."""
  return dataclasses.replace(prim, radii=prim.radii + margin, keep=None)


# ---------------------------------------------------------------------------
# Materials.


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
  u = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
  return u * u * (3.0 - 2.0 * u)


# Fixed wave vectors (rad per metre) and phases of the skin's mottling:
# wavelengths of 2.3 to 3.1 cm, a few pixels even at 64 pixels.
_MOTTLE_WAVES = _const([[170.0, 60.0, 90.0], [-80.0, 190.0, 40.0],
                        [60.0, -110.0, 230.0], [240.0, 120.0, -70.0]])
_MOTTLE_PHASES = _const([0.3, 1.7, 4.1, 2.6])
_MOTTLE_AMPS = _const([0.35, 0.3, 0.2, 0.15])
_SKIN = _const([0.86, 0.64, 0.52])
_HAIR = _const([0.24, 0.15, 0.09])
_BROW = _const([0.2, 0.13, 0.08])
_LIP = _const([0.72, 0.33, 0.33])
_MOUTH = _const([0.23, 0.05, 0.06])
_TEETH = _const([0.9, 0.88, 0.8])
_SCLERA = _const([0.95, 0.94, 0.9])
_IRIS = _const([0.2, 0.42, 0.55])
_PUPIL = _const([0.04, 0.03, 0.03])
_LASH = _const([0.12, 0.08, 0.06])
# A small dark mole on the person's right cheek: a sharp, easily located
# feature that is not symmetric (it tells left from right).
_MOLE = _const([-0.042, -0.022, 0.062])
_MOLE_RADIUS = 0.0035


def _matmul(v: np.ndarray, m: np.ndarray) -> np.ndarray:
  """v @ m for float [M, 3] v and a small m [3, K] (or [3], giving [M])."""
  if m.ndim == 1:
    return v[:, 0] * m[0] + v[:, 1] * m[1] + v[:, 2] * m[2]
  # numpy's matmul is slow for an inner dimension of 3; three broadcast
  # multiply-adds are several times faster.
  return v[:, 0:1] * m[0] + v[:, 1:2] * m[1] + v[:, 2:3] * m[2]


def _normalize(v: np.ndarray) -> np.ndarray:
  """Rows of float [M, 3] scaled to unit length."""
  return v / np.sqrt(v[:, 0:1] ** 2 + v[:, 1:2] ** 2 + v[:, 2:3] ** 2)


def _mix(base: np.ndarray, colour: np.ndarray,
         weight: np.ndarray) -> np.ndarray:
  """Blends float [M, 3] `base` towards colour [3] by weight [M]."""
  return base + weight[:, None] * (colour - base)


def _skin(p: np.ndarray) -> np.ndarray:
  """Skin albedo float64 [M, 3] at head points p [M, 3]."""
  waves = np.sin(_matmul(p, _MOTTLE_WAVES.T) + _MOTTLE_PHASES)
  mottle = np.sum(waves * _MOTTLE_AMPS, axis=1)
  albedo = _SKIN * (1.0 + 0.08 * mottle)[:, None]
  # Rosy cheeks: low-frequency colour variation the network must place.
  for side in (1.0, -1.0):
    cheek = np.array([0.045 * side, -0.018, 0.058])
    q = p - cheek
    blush = np.exp((q[:, 0] ** 2 + q[:, 1] ** 2 + q[:, 2] ** 2) *
                   (-0.5 / 0.016 ** 2))
    albedo = albedo + blush[:, None] * np.array([0.06, -0.05, -0.04])
  return albedo


def _albedo(prim: _Primitive, p: np.ndarray, local: np.ndarray,
            expression: np.ndarray) -> np.ndarray:
  """Albedo float64 [M, 3] of a primitive at head points p [M, 3].

  Args:
    prim: the primitive (its name selects the material).
    p: float64 [M, 3] surface points in head coordinates.
    local: float64 [M, 3] the same points in the primitive's local frame
      (textures that move with a part, such as the lower lip, use these).
    expression: float64 [EXPR_DIM].

  Returns:
    float64 [M, 3] albedo in [0, 1].
  """
  name = prim.name
  if name == 'mouth':
    # Upper teeth show at the top of the opening.
    teeth = _smoothstep(0.25, 0.45, local[:, 1] / _MOUTH_RADII[1]) * (
        _smoothstep(0.55, 0.8, local[:, 2] / _MOUTH_RADII[2]))
    return _mix(np.broadcast_to(_MOUTH, p.shape), _TEETH, teeth)
  if name == 'eye':
    # Angle from the gaze axis (+z) picks sclera, iris and pupil.
    cos = local[:, 2] / _EYE_RADIUS
    albedo = _mix(np.broadcast_to(_SCLERA, p.shape), _IRIS,
                  _smoothstep(0.86, 0.9, cos))
    return _mix(albedo, _PUPIL, _smoothstep(0.965, 0.975, cos))
  albedo = _skin(p)
  if name in ('neck', 'ear'):
    return albedo * 0.95
  if name == 'lid':
    # A dark lash line along the edge of the upper lid.
    lash = 1.0 - _smoothstep(0.0008, 0.0018, np.abs(local[:, 1] - prim.edge))
    return _mix(albedo * 0.92, _LASH, lash)
  if name == 'jaw':
    # Lower lip, in jaw coordinates so that it moves down with the jaw.
    u = local / _JAW_RADII
    lip = _smoothstep(0.8, 0.9, u[:, 2]) * (1.0 - _smoothstep(
        0.8, 1.0, np.hypot(u[:, 0] / 0.45, (u[:, 1] - 0.32) / 0.2)))
    return _mix(albedo, _LIP, lip)
  if name == 'cranium':
    u = local / _CRANIUM_RADII
    # Hairline: high on the forehead, low at the back of the head.
    hairline = 0.12 + 0.43 * u[:, 2]
    hair = _smoothstep(hairline, hairline + 0.06, u[:, 1])
    # Strands radiate from a crown behind the head.
    streaks = np.sin(38.0 * np.arctan2(u[:, 0], u[:, 2] + 1.3))
    albedo = _mix(albedo, _HAIR, hair) * (1.0 + 0.12 * hair * streaks)[:, None]
    # Brows: arched bands above the eyes; their height is an expression.
    height = _BROW_HEIGHT + _BROW_TRAVEL * float(
        np.clip(expression[BROWS], -1.5, 1.5))
    for side in (1.0, -1.0):
      dx = (p[:, 0] - 0.03 * side) / 0.017
      arch = height + 0.004 * (1.0 - dx ** 2)
      brow = (1.0 - _smoothstep(0.8, 1.0, np.abs(dx))) * (
          1.0 - _smoothstep(0.0022, 0.0034, np.abs(p[:, 1] - arch)))
      albedo = _mix(albedo, _BROW, brow * (p[:, 2] > 0.03))
    # Upper lip: just above where the jaw meets the cranium.
    lip = _smoothstep(0.75, 0.85, u[:, 2]) * (1.0 - _smoothstep(
        0.8, 1.0, np.hypot(p[:, 0] / 0.022, (p[:, 1] + 0.038) / 0.0075)))
    albedo = _mix(albedo, _LIP, lip)
    q = p - _MOLE
    mole = 1.0 - _smoothstep(0.7 * _MOLE_RADIUS, _MOLE_RADIUS,
                             np.sqrt(q[:, 0] ** 2 + q[:, 1] ** 2 + q[:, 2] ** 2))
    return _mix(albedo, np.array([0.3, 0.18, 0.12]), mole)
  return albedo  # The nose.


_SHININESS = {'eye': (0.6, 80.0), 'lid': (0.08, 12.0), 'mouth': (0.15, 30.0)}
_SKIN_SHINE = (0.07, 12.0)


def _light(appearance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Light direction float64 [3] (head coordinates) and colour float64 [3]."""
  yaw, pitch, warmth = appearance
  base = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
  direction = _rot_y(yaw) @ _rot_x(-pitch) @ base
  colour = np.array([1.0 + warmth, 1.0 + 0.2 * warmth, 1.0 - warmth])
  return direction, colour


def _shade(prim: _Primitive, p: np.ndarray, local: np.ndarray,
           normal: np.ndarray, view: np.ndarray, expression: np.ndarray,
           light: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """Colour float64 [M, 3] in [0, 1]: ambient + Lambert + Blinn-Phong.

  Args:
    prim: the primitive hit.
    p: float64 [M, 3] surface points in head coordinates.
    local: float64 [M, 3] the same points in the primitive's frame.
    normal: float64 [M, 3] unit outward normals.
    view: float64 [M, 3] unit vectors towards the camera.
    expression: float64 [EXPR_DIM].
    light: direction [3] and colour [3] from `_light`.
  """
  direction, colour = light
  albedo = _albedo(prim, p, local, expression)
  diffuse = np.maximum(_matmul(normal, direction), 0.0)
  # Light from above fills the shadowed side a little.
  ambient = 0.3 + 0.08 * normal[:, 1]
  half = _normalize(view + direction)
  strength, exponent = _SHININESS.get(prim.name, _SKIN_SHINE)
  cos = (normal[:, 0] * half[:, 0] + normal[:, 1] * half[:, 1] +
         normal[:, 2] * half[:, 2])
  spec = strength * np.maximum(cos, 0.0) ** exponent
  rgb = albedo * (ambient + 0.75 * diffuse)[:, None] + spec[:, None]
  return np.clip(rgb * colour, 0.0, 1.0)


# ---------------------------------------------------------------------------
# Background and rendering.


def background(size: int) -> np.ndarray:
  """The static background, the same in every frame.

  Smooth gradients, soft blobs and a faint pattern, all defined in normalised
  image coordinates so every size shows the same picture.

  Args:
    size: int image side (H = W = size).

  Returns:
    uint8 [size, size, 3].
  """
  u = (np.arange(size) + 0.5) / size
  vv, uu = np.meshgrid(u, u, indexing='ij')
  top = np.array([0.58, 0.66, 0.72])
  bottom = np.array([0.3, 0.36, 0.42])
  rgb = top + vv[..., None] * (bottom - top)
  rgb = rgb + (uu[..., None] - 0.5) * np.array([0.08, 0.02, -0.06])
  # A warm lamp glow and a green plant-like blob: large-scale structure.
  for (cu, cv), radius, colour in (((0.82, 0.18), 0.16, (0.25, 0.15, -0.05)),
                                   ((0.12, 0.78), 0.13, (-0.1, 0.12, -0.08))):
    glow = np.exp(-((uu - cu) ** 2 + (vv - cv) ** 2) / (2 * radius ** 2))
    rgb = rgb + glow[..., None] * np.array(colour)
  # A soft window frame on the wall (smooth edges: no aliasing at 64 px).
  frame = (_smoothstep(0.015, 0.0, np.abs(uu - 0.2)) +
           _smoothstep(0.015, 0.0, np.abs(vv - 0.3))) * (
               _smoothstep(0.6, 0.5, vv) * _smoothstep(0.45, 0.35, uu))
  rgb = rgb - 0.12 * np.clip(frame, 0.0, 1.0)[..., None]
  stripes = np.sin(2 * np.pi * 5.0 * (uu + 0.6 * vv))
  rgb = rgb * (1.0 + 0.04 * stripes)[..., None]
  return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def default_intrinsics(size: int) -> np.ndarray:
  """The dataset's intrinsics for images of side `size`.

  Args:
    size: int image side.

  Returns:
    float64 [4] (fx, fy, cx, cy): fx negative as in the released data, fx, fy
    in pixels, cx, cy fractions.
  """
  focal = FOCAL * size
  return np.array([-focal, focal, PRINCIPAL[0], PRINCIPAL[1]])


def _ray_dirs(c2w: np.ndarray, intr: np.ndarray, cols: np.ndarray,
              rows: np.ndarray, size: int) -> np.ndarray:
  """`camera.rays_np` directions through pixel coordinates cols, rows (float
  [...] each), components first: float64 [3, ...]."""
  _, dirs = camera.rays_np(np.stack([cols, rows], axis=-1), intr, c2w, size,
                           size)
  # Components first: `_intersect` then runs on long contiguous rows.
  return np.ascontiguousarray(np.moveaxis(dirs, -1, 0))


def _colours(origin: np.ndarray, dirs: np.ndarray, depth: np.ndarray,
             index: np.ndarray, prims: Sequence[_Primitive],
             expression: np.ndarray,
             light: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """Shaded colour float64 [N, 3] of rays [3, N] that hit (index >= 0)."""
  rgb = np.zeros((depth.shape[0], 3))
  for k, prim in enumerate(prims):
    idx = np.nonzero(index == k)[0]
    if idx.size == 0:
      continue
    d = dirs[:, idx].T
    p = origin + depth[idx, None] * d
    local = _matmul(p - prim.centre, prim.rotation)
    # Gradient of the implicit function; an infinite radius contributes 0.
    normal = _normalize(_matmul(local / prim.radii ** 2, prim.rotation.T))
    view = -_normalize(d)
    rgb[idx] = _shade(prim, p, local, normal, view, expression, light)
  return rgb


def _render(c2w: np.ndarray, expression: np.ndarray, size: int,
            intr: np.ndarray, appearance: np.ndarray, bg: np.ndarray,
            supersample: int) -> tuple[np.ndarray, np.ndarray]:
  """`render` with the background precomputed (uint8 [size, size, 3])."""
  prims = _primitives(expression)
  light = _light(appearance)
  origin = c2w[:3, 3]

  # Cull whole pixels first. A sub-pixel ray leaves its pixel's centre ray
  # by less than half a pixel diagonal per unit depth, and no hit is deeper
  # than the camera's distance plus the scene's radius (0.62, the neck's
  # end), so a pixel any of whose rays hits a shape has a centre ray that
  # hits the shape grown by `margin` (a full diagonal: a factor 2 to spare).
  margin = (np.linalg.norm(origin) + 1.0) * math.sqrt(2.0) / min(
      abs(intr[0]), abs(intr[1]))
  rows, cols = np.mgrid[0:size, 0:size]
  rows, cols = rows.ravel().astype(np.float64), cols.ravel().astype(np.float64)
  all_dirs = _ray_dirs(c2w, intr, cols, rows, size)
  head = [p for p in prims if np.all(np.isfinite(p.radii))]
  unbounded = [p for p in prims if not np.all(np.isfinite(p.radii))]
  head_bound = _Primitive(
      'bound', np.zeros(3),
      np.full(3, max(np.linalg.norm(p.centre) + p.radii.max() for p in head)),
      np.eye(3))
  cover = np.zeros(size * size, bool)
  for prim in [head_bound] + unbounded:
    cover |= np.isfinite(_intersect(_grow(_bound(prim), margin), origin,
                                    all_dirs))
  pix = np.nonzero(cover)[0]
  # Per primitive, the candidate pixels it may cover (most are small).
  masks = [np.isfinite(_intersect(_grow(_bound(p), margin), origin,
                                  all_dirs[:, pix])) for p in prims]

  image = bg.reshape(-1, 3).astype(np.float64)
  depth = np.full(size * size, np.inf)
  # Sub-pixel offsets centred on the integer pixel position.
  offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
  off_r, off_c = [o.ravel() for o in np.meshgrid(offsets, offsets,
                                                  indexing='ij')]
  if supersample % 2 == 0:
    # No sample at the centre: add the centre ray for the depth only.
    off_r, off_c = np.append(off_r, 0.0), np.append(off_c, 0.0)
  centre_k = int(np.argmin(off_r ** 2 + off_c ** 2))
  num_colour = supersample * supersample
  # Bounded memory: at most ~2^18 rays at a time.
  block = max(1, (1 << 18) // off_r.size)
  for start in range(0, pix.size, block):
    p_idx = pix[start:start + block]
    n = p_idx.size
    dirs = _ray_dirs(c2w, intr, cols[p_idx, None] + off_c,
                     rows[p_idx, None] + off_r, size)  # [3, n, samples]
    t = np.full((n, off_r.size), np.inf)
    index = np.full((n, off_r.size), -1)
    for k, prim in enumerate(prims):
      sel = np.nonzero(masks[k][start:start + block])[0]
      if sel.size == 0:
        continue
      if sel.size == n:
        tk = _intersect(prim, origin, dirs)
        nearer = tk < t
        t[nearer] = tk[nearer]
        index[nearer] = k
      else:
        tk = _intersect(prim, origin, dirs[:, sel])
        t_sel, index_sel = t[sel], index[sel]
        nearer = tk < t_sel
        t_sel[nearer] = tk[nearer]
        index_sel[nearer] = k
        t[sel], index[sel] = t_sel, index_sel
    depth[p_idx] = t[:, centre_k]
    t, index = t[:, :num_colour].ravel(), index[:, :num_colour].ravel()
    rgb = _colours(origin, dirs[:, :, :num_colour].reshape(3, -1), t, index,
                   prims, expression, light)
    hit = (index >= 0).reshape(n, num_colour)
    # Misses take the background pixel itself: a pixel whose rays all miss
    # is then exactly the background.
    fg = (rgb * 255.0).reshape(n, num_colour, 3)
    samples = np.where(hit[..., None], fg, image[p_idx, None, :])
    image[p_idx] = samples.mean(axis=1)
  image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  return (image.reshape(size, size, 3),
          depth.reshape(size, size).astype(np.float32))


def render(c2w: np.ndarray, expression: np.ndarray, size: int,
           intrinsics: Optional[np.ndarray] = None,
           appearance: Optional[np.ndarray] = None, *,
           supersample: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray]:
  """Renders the synthetic person: the ground truth for any pose/expression.

  Rays follow docs/architecture.md §3 exactly; each pixel averages a
  supersample x supersample grid of rays centred on its integer position.

  Args:
    c2w: float [4, 4] (or [3, 4]) camera-to-world matrix in head coordinates.
    expression: float [EXPR_DIM]; only JAW, BLINK_L, BLINK_R and BROWS matter.
    size: int image side (H = W = size).
    intrinsics: float [4] (fx, fy, cx, cy) as in the dataset json; default
      `default_intrinsics(size)`.
    appearance: float [APPEARANCE_DIM] (light yaw, light pitch, warmth);
      default zeros (the neutral light).
    supersample: int rays per pixel along each axis.

  Returns:
    image: uint8 [size, size, 3] RGB.
    depth: float32 [size, size] camera depth of the head along the ray through
      the pixel's integer position, inf where that ray misses the head.
  """
  c2w = np.asarray(c2w, np.float64)
  if c2w.shape not in ((4, 4), (3, 4)):
    raise ValueError(f'c2w must be [4, 4] or [3, 4], got {c2w.shape}.')
  expression = _check_expression(expression)
  intr = (default_intrinsics(size) if intrinsics is None else
          np.asarray(intrinsics, np.float64))
  appearance = (np.zeros(APPEARANCE_DIM) if appearance is None else
                np.asarray(appearance, np.float64))
  if appearance.shape != (APPEARANCE_DIM,):
    raise ValueError(f'appearance must have shape ({APPEARANCE_DIM},), got '
                     f'{appearance.shape}.')
  if supersample < 1:
    raise ValueError(f'supersample must be >= 1, got {supersample}.')
  return _render(c2w, expression, size, intr, appearance, background(size),
                 supersample)


# ---------------------------------------------------------------------------
# The video: poses, expressions and appearance over time.


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
  """Everything that varies per frame, rounded as written to the json.

  Attributes:
    c2w: float64 [F, 4, 4] camera-to-world matrices in head coordinates.
    expressions: float64 [F, EXPR_DIM] expression coefficients.
    appearance: float64 [F, APPEARANCE_DIM] per-frame lighting (not in the
      json: nothing but the image shows it, as in a real video).
  """
  c2w: np.ndarray
  expressions: np.ndarray
  appearance: np.ndarray


def _round(values: np.ndarray) -> np.ndarray:
  """Rounds to the json's significant digits (what is written is rendered)."""
  flat = [float(f'{v:.{_JSON_DIGITS}g}') for v in np.ravel(values)]
  return np.array(flat, np.float64).reshape(np.shape(values))


def _smooth_noise(rng: np.random.Generator, frames: int, channels: int,
                  sigma: float) -> np.ndarray:
  """Temporally smooth noise of unit standard deviation.

  White noise filtered by a Gaussian of `sigma` frames, normalised by the
  filter (not by the sample), so short sequences are not inflated.

  Returns:
    float64 [frames, channels].
  """
  radius = int(math.ceil(3.0 * sigma))
  kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  kernel /= np.sqrt(np.sum(kernel ** 2))
  white = rng.standard_normal((frames + 2 * radius, channels))
  return np.stack([np.convolve(white[:, c], kernel, mode='valid')
                   for c in range(channels)], axis=1)


def _poses(rng: np.random.Generator, frames: int) -> np.ndarray:
  """Camera-to-world float64 [F, 4, 4]: the head's motion folded in."""
  angles = np.tanh(0.8 * _smooth_noise(rng, frames, 3, 0.8 * FPS))
  yaw = math.radians(20.0) * angles[:, 0]
  pitch = math.radians(10.0) * angles[:, 1]
  roll = math.radians(4.0) * angles[:, 2]
  shift = _smooth_noise(rng, frames, 3, FPS) * np.array([0.005, 0.004, 0.008])
  camera = np.array([0.0, -0.01, DISTANCE])  # Fixed camera in the world.
  c2w = np.tile(np.eye(4), (frames, 1, 1))
  for f in range(frames):
    # The head moves in a world seen by a fixed camera; expressed in head
    # coordinates the head is still and the camera moves by the inverse.
    head = _rot_z(roll[f]) @ _rot_y(yaw[f]) @ _rot_x(pitch[f])
    c2w[f, :3, :3] = head.T
    c2w[f, :3, 3] = head.T @ (camera - shift[f])
  return c2w


def _expressions(rng: np.random.Generator, frames: int) -> np.ndarray:
  """Expression coefficients float64 [F, EXPR_DIM] of a talking person."""
  expr = 0.05 * _smooth_noise(rng, frames, EXPR_DIM, 0.25 * FPS)
  # Speech: a fast syllable rhythm gated by slower phrases.
  syllables = _smooth_noise(rng, frames, 1, 0.07 * FPS)[:, 0]
  phrases = _smooth_noise(rng, frames, 1, 0.8 * FPS)[:, 0]
  expr[:, JAW] = np.clip(0.5 + 0.5 * syllables, 0.0, 1.0) * np.clip(
      0.7 + 0.6 * phrases, 0.0, 1.0)
  # Blinks about every 3 s, a fifth of a second long; some are winks.
  profile = np.array([0.4, 0.9, 1.0, 0.8, 0.4])
  blinks = np.zeros((frames, 2))
  starts = np.nonzero(rng.random(frames) < 1.0 / (3.0 * FPS))[0]
  eyes = rng.choice(3, size=starts.size, p=[0.8, 0.1, 0.1])
  for start, eye in zip(starts, eyes):
    which = [0, 1] if eye == 0 else [eye - 1]
    stop = min(frames, start + profile.size)
    for e in which:
      blinks[start:stop, e] = np.maximum(blinks[start:stop, e],
                                         profile[:stop - start])
  expr[:, BLINK_L] = blinks[:, 0]
  expr[:, BLINK_R] = blinks[:, 1]
  expr[:, BROWS] = np.tanh(_smooth_noise(rng, frames, 1, 0.5 * FPS)[:, 0])
  return expr


def _appearance(rng: np.random.Generator, frames: int) -> np.ndarray:
  """Per-frame lighting float64 [F, APPEARANCE_DIM]: a bounded random walk."""
  std = np.array([0.25, 0.12, 0.06])  # Stationary spread of each channel.
  keep = 0.97  # Mean reversion per frame keeps the walk within range.
  steps = rng.standard_normal((frames, APPEARANCE_DIM)) * std * math.sqrt(
      1.0 - keep ** 2)
  walk = np.zeros((frames, APPEARANCE_DIM))
  walk[0] = rng.standard_normal(APPEARANCE_DIM) * std
  for f in range(1, frames):
    walk[f] = keep * walk[f - 1] + steps[f]
  return walk


def trajectory(frames: int, seed: int) -> Trajectory:
  """The per-frame poses, expressions and lighting of the dataset.

  Args:
    frames: int F, number of frames.
    seed: int, seeds every random choice.

  Returns:
    Trajectory with c2w [F, 4, 4], expressions [F, EXPR_DIM] and appearance
    [F, APPEARANCE_DIM], float64, exactly as written to the json.
  """
  # Independent streams: changing one component leaves the others alone.
  pose_rng, expr_rng, light_rng = (
      np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
  return Trajectory(
      c2w=_round(_poses(pose_rng, frames)),
      expressions=_round(_expressions(expr_rng, frames)),
      appearance=_appearance(light_rng, frames))


def splits(frames: int, seed: int) -> dict[str, np.ndarray]:
  """Frame indices int [*] of 'train', 'val' and 'test', each sorted.

  The last SPLIT_TEST of the frames in time are test (novel poses and
  expressions after the training period); SPLIT_VAL of the rest, drawn with
  the seed, are val.
  """
  if frames < 3:
    raise ValueError(f'need at least 3 frames (one per split), got {frames}.')
  num_test = max(1, int(round(SPLIT_TEST * frames)))
  rest = frames - num_test
  num_val = max(1, int(round(SPLIT_VAL * rest)))
  rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(4)[3])
  val = np.sort(rng.choice(rest, size=num_val, replace=False))
  train = np.setdiff1d(np.arange(rest), val)
  return {'train': train, 'val': val, 'test': np.arange(rest, frames)}


def _face_points(expression: np.ndarray) -> np.ndarray:
  """float64 [N, 3] points on the surface of the face's primitives."""
  # A fixed spherical grid mapped onto each ellipsoid: its projected extent
  # is the silhouette's (to the grid's resolution), independent of pixels.
  theta, phi = np.meshgrid(np.linspace(0.0, np.pi, 17),
                           np.linspace(0.0, 2.0 * np.pi, 33), indexing='ij')
  unit = np.stack([np.sin(theta) * np.cos(phi), np.cos(theta),
                   np.sin(theta) * np.sin(phi)], axis=-1).reshape(-1, 3)
  points = [p.centre + (unit * p.radii) @ p.rotation.T
            for p in _primitives(expression)
            if p.name in ('cranium', 'jaw', 'nose', 'ear')]
  return np.concatenate(points)


def bbox(c2w: np.ndarray, expression: np.ndarray, size: int,
         intr: Optional[np.ndarray] = None) -> np.ndarray:
  """The face's box as the dataset stores it.

  Args:
    c2w: float [4, 4] camera-to-world matrix.
    expression: float [EXPR_DIM].
    size: int image side.
    intr: float [4] intrinsics; default `default_intrinsics(size)`.

  Returns:
    float64 [4] (h_min, h_max, w_min, w_max) as fractions of the image (rows
    first), the projected head without the neck, enlarged by 10% of its
    extent on every side and clipped to [0, 1].
  """
  intr = default_intrinsics(size) if intr is None else np.asarray(intr)
  pixels, _ = camera.project_np(_face_points(_check_expression(expression)),
                                intr, np.asarray(c2w, np.float64), size, size)
  pixels = pixels / size
  lo, hi = pixels.min(axis=0), pixels.max(axis=0)
  pad = 0.1 * (hi - lo)
  lo, hi = np.clip(lo - pad, 0.0, 1.0), np.clip(hi + pad, 0.0, 1.0)
  return np.array([lo[1], hi[1], lo[0], hi[0]])


# ---------------------------------------------------------------------------
# Writing the dataset.


def _write_into(root: pathlib.Path, size: int, frames: int, seed: int,
                verbose: bool):
  """Writes the whole dataset into the new folder `root`."""
  traj = trajectory(frames, seed)
  intr = _round(default_intrinsics(size))
  bg = background(size)
  (root / 'bg').mkdir(parents=True)
  Image.fromarray(bg).save(root / 'bg' / '00050.png')
  split_of = {}
  split_frames = splits(frames, seed)
  for split, indices in split_frames.items():
    (root / split).mkdir()
    split_of.update((int(f), split) for f in indices)
  # Train rows are in time order, like the json written below.
  np.save(root / data.INDEX_MAP_FILE,
          data.make_index_map(np.arange(frames), split_frames['train']))
  entries = {split: [] for split in ('train', 'val', 'test')}
  digits = max(4, len(str(frames - 1)))
  start = time.time()
  for f in range(frames):
    image, _ = _render(traj.c2w[f], traj.expressions[f], size, intr,
                       traj.appearance[f], bg, SUPERSAMPLE)
    # The global frame index in the name keeps the time order recoverable.
    name = f'{split_of[f]}/f_{f:0{digits}d}'
    Image.fromarray(image).save(root / f'{name}.png')
    entries[split_of[f]].append({
        'file_path': f'./{name}',
        'transform_matrix': _round(traj.c2w[f]).tolist(),
        'expression': _round(traj.expressions[f]).tolist(),
        'bbox': _round(bbox(traj.c2w[f], traj.expressions[f], size,
                            intr)).tolist(),
    })
    if verbose and ((f + 1) % max(1, frames // 20) == 0 or f + 1 == frames):
      elapsed = time.time() - start
      print(f'synthetic person: frame {f + 1}/{frames}, {elapsed:.0f} s',
            file=sys.stderr, flush=True)
  for split, frame_entries in entries.items():
    # One frame per line: readable and diffable, and still plain json.
    lines = [
        '{',
        # The released data stores the angle too; a negative fx makes it
        # negative, and loaders use `intrinsics` when both are present.
        '  "camera_angle_x": %s,' % json.dumps(
            float(_round(2.0 * math.atan(0.5 * size / intr[0])))),
        f'  "intrinsics": {json.dumps(intr.tolist())},',
        '  "frames": [',
        ',\n'.join('    ' + json.dumps(entry) for entry in frame_entries),
        '  ]',
        '}',
    ]
    (root / f'transforms_{split}.json').write_text('\n'.join(lines) + '\n')


def write(out_dir: os.PathLike[str] | str, size: int = 512, frames: int = 300,
          seed: int = 0, *, verbose: Optional[bool] = None) -> pathlib.Path:
  """Writes the synthetic person as a NeRFace dataset folder.

  transforms_{train,val,test}.json, <split>/f_<frame>.png, bg/00050.png and
  index_map.npy (frames 0 .. frames - 1 over all splits, see
  `data.make_index_map`). The folder is built under a temporary sibling
  name and renamed at the end, so a folder at `out_dir` is always complete.
  The same arguments give byte-identical files.

  Args:
    out_dir: the dataset folder to create; it must not exist or be empty.
    size: int image side in pixels.
    frames: int number of frames over all splits (at least 3).
    seed: int seed of the trajectory, lighting drift and val frames.
    verbose: print progress to stderr; default for sizes of 256 and more.

  Returns:
    The dataset folder.

  Raises:
    FileExistsError: if `out_dir` exists and is not empty.
  """
  if size < 1:
    raise ValueError(f'size must be positive, got {size}.')
  splits(frames, seed)  # Validates the frame count before any work.
  out = pathlib.Path(out_dir).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f'{out} exists and is not empty; remove it or '
                          'choose another folder.')
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f'.{out.name}.partial-{os.getpid()}'
  if tmp.exists():
    shutil.rmtree(tmp)
  try:
    _write_into(tmp, size, frames, seed,
                size >= 256 if verbose is None else verbose)
    # A rename onto an empty folder (or none) is atomic on POSIX.
    os.rename(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _complete(path: pathlib.Path) -> bool:
  # index_map.npy is optional: cache folders written before it existed hold
  # the same images and json and stay valid.
  return all((path / f'transforms_{s}.json').is_file()
             for s in ('train', 'val', 'test')) and (
                 path / 'bg' / '00050.png').is_file()


def ensure(cache_dir: os.PathLike[str] | str, size: int, frames: int,
           seed: int) -> pathlib.Path:
  """The cached dataset folder of the synthetic person, written if missing.

  Args:
    cache_dir: folder holding generated datasets.
    size: int image side in pixels.
    frames: int number of frames over all splits.
    seed: int seed.

  Returns:
    `<cache_dir>/synthetic_s{size}_f{frames}_seed{seed}_v{VERSION}`.
  """
  path = pathlib.Path(cache_dir).expanduser() / (
      f'synthetic_s{size}_f{frames}_seed{seed}_v{VERSION}')
  if _complete(path):
    return path
  try:
    write(path, size, frames, seed)
  except OSError:
    # Another process (a second host, a parallel test) may have finished the
    # same folder first; its copy is identical.
    if _complete(path):
      return path
    raise
  return path


def main(argv: Optional[Sequence[str]] = None):
  """Command line: `python -m nerface_jax.synthetic OUT_DIR [--size N] ...`."""
  parser = argparse.ArgumentParser(
      prog='python -m nerface_jax.synthetic',
      description='Writes the built-in synthetic person as a NeRFace dataset.')
  parser.add_argument('out_dir', help='dataset folder to create')
  parser.add_argument('--size', type=int, default=512,
                      help='image side in pixels (default 512)')
  parser.add_argument('--frames', type=int, default=300,
                      help='frames over all splits (default 300)')
  parser.add_argument('--seed', type=int, default=0, help='seed (default 0)')
  args = parser.parse_args(argv)
  start = time.time()
  try:
    path = write(args.out_dir, args.size, args.frames, args.seed, verbose=True)
  except (ValueError, OSError) as e:
    # Bad values and an occupied or unwritable folder are the user's to fix.
    parser.exit(2, f'{parser.prog}: error: {e}\n')
  print(f'Wrote {path} ({args.frames} frames of {args.size}x{args.size}) in '
        f'{time.time() - start:.1f} s.')


if __name__ == '__main__':
  main()
