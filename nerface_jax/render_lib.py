"""Full-image rendering with a trained model.

Pixels of a frame are rendered in chunks by one jitted function; each chunk is
sharded over all devices (of all processes) on the 'data' axis and gathered
back to the host. Rendering is deterministic: no jitter, no density noise.
"""

from typing import Any, Callable, Optional

import chex
from flax import struct
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from nerface_jax import camera
from nerface_jax import models
from nerface_jax import parallel
from nerface_jax import types

LATENT_CHOICES = ('fixed', 'zero', 'mean', 'optimize')


@struct.dataclass
class FrameInputs:
  """What a frame needs besides its pixels (all replicated on devices).

  Attributes:
    c2w: float32 [4, 4] camera-to-world.
    intrinsics: float32 [4] (fx, fy, cx, cy) as in the dataset.
    expression: float32 [E] (unscaled).
    latent: float32 [L] the frame's gamma (zeros when the model has none).
    background: uint8 [H, W, 3].
  """
  c2w: chex.Array
  intrinsics: chex.Array
  expression: chex.Array
  latent: chex.Array
  background: chex.Array


def eval_latent(params: Any, choice: str, latent_frame: int = 0,
                latent_dim: int = 0) -> np.ndarray:
  """The gamma used for frames without a trained code.

  Args:
    params: model parameters ({'latent': {'gamma': [F, L]}} when the model
      has codes).
    choice: 'fixed' (row `latent_frame`, the original's choice), 'zero' or
      'mean'. ('optimize' is per frame; see `optimize_latents`.)
    latent_frame: the training frame used by 'fixed'.
    latent_dim: L, for models without codes (returns zeros [L]).

  Returns:
    float32 [L].
  """
  if 'latent' not in params:
    return np.zeros((latent_dim,), np.float32)
  gamma = np.asarray(params['latent']['gamma'], np.float32)
  if choice == 'zero':
    return np.zeros(gamma.shape[1:], np.float32)
  if choice == 'mean':
    return gamma.mean(axis=0)
  if choice == 'fixed':
    if not 0 <= latent_frame < gamma.shape[0]:
      raise ValueError(f'eval.latent_frame = {latent_frame} but there are '
                       f'{gamma.shape[0]} training frames.')
    return gamma[latent_frame]
  raise ValueError(f'eval.latent must be one of {LATENT_CHOICES[:3]} here, got '
                   f'{choice!r}.')


def make_render_chunk(model: models.NerfaceModel, mesh) -> Callable[..., Any]:
  """A jitted renderer of one chunk of pixels of one frame.

  Args:
    model: the NerfaceModel.
    mesh: the device mesh; chunks are sharded over its 'data' axis.

  Returns:
    fn(params, pixels int32 [C, 2] (column, row), inputs: FrameInputs) ->
    dict of float32 'rgb' [C, 3], 'depth' [C], 'acc' [C] (fine level), with
    C a multiple of the device count.
  """
  def render(params, pixels, inputs: FrameInputs):
    height, width = inputs.background.shape[:2]
    num = pixels.shape[0]
    rays = camera.generate_rays(pixels.astype(jnp.float32), inputs.intrinsics,
                                inputs.c2w, height, width)
    background = inputs.background[pixels[:, 1], pixels[:, 0]]
    batch = types.Batch(
        rays=rays,
        rgb=jnp.zeros((num, 3), jnp.float32),
        background=background.astype(jnp.float32) / 255.0,
        expression=jnp.broadcast_to(inputs.expression,
                                    (num,) + inputs.expression.shape),
        frame=jnp.zeros((num,), jnp.int32),
        latent=jnp.broadcast_to(inputs.latent, (num,) + inputs.latent.shape))
    _, fine = model.apply({'params': params}, batch)
    return {'rgb': fine.rgb, 'depth': fine.depth, 'acc': fine.acc}

  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(parallel.AXIS))
  return jax.jit(render, in_shardings=(replicated, sharded, replicated),
                 out_shardings=sharded)


def render_frame(render_chunk: Callable[..., Any], params: Any,
                 inputs: FrameInputs, height: int, width: int, chunk: int,
                 mesh) -> dict[str, np.ndarray]:
  """Renders a whole frame on the host side of a chunked, sharded renderer.

  Args:
    render_chunk: from `make_render_chunk`.
    params: model parameters (replicated).
    inputs: FrameInputs of the frame.
    height: H.
    width: W.
    chunk: rays per call; rounded up to a multiple of the device count.
    mesh: the device mesh.

  Returns:
    {'rgb': float32 [H, W, 3], 'depth': float32 [H, W], 'acc': [H, W]}.
  """
  devices = mesh.devices.size
  chunk = -(-min(chunk, height * width) // devices) * devices
  pixels = np.asarray(camera.pixel_grid(height, width), np.int32).reshape(-1, 2)
  total = pixels.shape[0]
  # Padding repeats pixel (0, 0); its results are cut off below. One chunk
  # shape means one compilation for every frame of every size-H x W split.
  padded = -(-total // chunk) * chunk
  pixels = np.concatenate([pixels, np.zeros((padded - total, 2), np.int32)])
  sharded = NamedSharding(mesh, P(parallel.AXIS))
  inputs = parallel.replicate(inputs, mesh)
  outputs = []
  for start in range(0, padded, chunk):
    piece = jax.device_put(pixels[start:start + chunk], sharded)
    out = render_chunk(params, piece, inputs)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    outputs.append(jax.device_get(out))
  joined = {k: np.concatenate([o[k] for o in outputs])[:total]
            for k in outputs[0]}
  return {k: v.reshape((height, width) + v.shape[1:]) for k, v in joined.items()}


def depth_image(depth: np.ndarray, near: float, far: float) -> np.ndarray:
  """A colour-mapped depth map: uint8 [H, W, 3] (near bright, far dark).

  Args:
    depth: float [H, W] depths.
    near: depth shown brightest.
    far: depth shown darkest.
  """
  x = np.clip((far - np.asarray(depth, np.float64)) / (far - near), 0.0, 1.0)
  # A perceptually ordered blue -> orange -> yellow ramp, cheap to compute.
  r = np.clip(1.6 * x - 0.2, 0, 1)
  g = np.clip(1.6 * x - 0.6, 0, 1) * 0.9 + 0.1 * x
  b = np.clip(0.6 - 1.2 * np.abs(x - 0.35), 0, 1)
  return (np.stack([r, g, b], axis=-1) * 255 + 0.5).astype(np.uint8)


def to_uint8(image: np.ndarray) -> np.ndarray:
  """float [..., 3] in [0, 1] -> uint8 (rounded)."""
  return (np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255 + 0.5).astype(
      np.uint8)


def frame_inputs(dataset, index: int, latent: np.ndarray,
                 background: Optional[np.ndarray] = None) -> FrameInputs:
  """FrameInputs of frame `index` of a `data.Dataset` (host arrays)."""
  bg = dataset.background if background is None else background
  if bg is None:
    bg = np.zeros((dataset.height, dataset.width, 3), np.uint8)
  return FrameInputs(
      c2w=np.asarray(dataset.c2w[index], np.float32),
      intrinsics=np.asarray(dataset.intrinsics, np.float32),
      expression=np.asarray(dataset.expressions[index], np.float32),
      latent=np.asarray(latent, np.float32),
      background=np.asarray(bg, np.uint8))
