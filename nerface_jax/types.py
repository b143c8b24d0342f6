"""Data containers shared by the pure functions, the model and the pipeline.

Shape letters used in docstrings throughout the package:
  F  frames of a split              H, W  image height and width in pixels
  R  rays (any batch shape: `...`)  S     samples along a ray
  B  bins of a piecewise-constant pdf (B + 1 edges)
  E  expression length (76 in the released data, 52 from our preprocessor)
  L  latent-code (gamma) length     D     channels of an encoded input
"""

from typing import Optional

import chex
from flax import struct


@struct.dataclass
class Rays:
  """Camera rays in world coordinates (the tracked head's frame).

  Directions are NOT normalised: their camera-space z component is -1, so a
  ray parameter t is the camera depth and near/far are depths.

  Attributes:
    origins: float32 [..., 3] ray origins (the camera centre).
    directions: float32 [..., 3] ray directions.
  """
  origins: chex.Array
  directions: chex.Array


@struct.dataclass
class Renderings:
  """What quadrature returns for a batch of rays.

  Attributes:
    rgb: float32 [..., 3] composited colour (background included).
    depth: float32 [..., ] expected t; the background counts at its sample's t.
    acc: float32 [..., ] accumulated opacity of the foreground samples.
    bg_weight: float32 [..., ] weight of the background (transmittance at the
      last sample in 'image' mode, 1 - acc in 'none' mode).
    weights: float32 [..., S] per-sample weights (for resampling).
    t: float32 [..., S] sample depths the weights belong to.
  """
  rgb: chex.Array
  depth: chex.Array
  acc: chex.Array
  bg_weight: chex.Array
  weights: chex.Array
  t: chex.Array


@struct.dataclass
class Batch:
  """One batch of training or evaluation rays with their conditioning.

  Attributes:
    rays: Rays with [R, 3] fields.
    rgb: float32 [R, 3] target colour in [0, 1] (zeros when unknown).
    background: float32 [R, 3] background pixel behind each ray.
    expression: float32 [R, E] the ray's frame expression (unscaled).
    frame: int32 [R] index of the ray's training frame (its gamma row).
    latent: optional float32 [R, L]; when given it replaces the gamma lookup
      (unseen frames: val, test, reenactment, gamma optimisation).
  """
  rays: Rays
  rgb: chex.Array
  background: chex.Array
  expression: chex.Array
  frame: chex.Array
  latent: Optional[chex.Array] = None
