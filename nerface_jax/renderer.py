"""Whole-frame rendering with a trained model, chunked and sharded.

Pixels of a frame are rendered in chunks by one jitted function; each chunk is
sharded over all devices (of all processes) on the 'data' axis and gathered
back to the host. Rendering is deterministic: no jitter, no density noise.
"""

import dataclasses
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


def frame_inputs(c2w: np.ndarray, intrinsics: np.ndarray,
                 expression: np.ndarray, latent: np.ndarray,
                 background: Optional[np.ndarray], height: int,
                 width: int) -> FrameInputs:
  """FrameInputs from host arrays; a missing background renders black.

  Args:
    c2w: float [4, 4].
    intrinsics: float [4].
    expression: float [E].
    latent: float [L].
    background: uint8 [H, W, 3] or None.
    height: H (for the black background).
    width: W.
  """
  if background is None:
    background = np.zeros((height, width, 3), np.uint8)
  return FrameInputs(
      c2w=np.asarray(c2w, np.float32),
      intrinsics=np.asarray(intrinsics, np.float32),
      expression=np.asarray(expression, np.float32),
      latent=np.asarray(latent, np.float32),
      background=np.asarray(background, np.uint8))


def dataset_inputs(dataset, index: int, latent: np.ndarray) -> FrameInputs:
  """FrameInputs of frame `index` of a `data.Dataset`."""
  return frame_inputs(dataset.c2w[index], dataset.intrinsics,
                      dataset.expressions[index], latent, dataset.background,
                      dataset.height, dataset.width)


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


class RenderInterrupted(Exception):
  """`render_frame` stopped between chunks because `should_stop()` said so."""


def render_frame(render_chunk: Callable[..., Any], params: Any,
                 inputs: FrameInputs, height: int, width: int, chunk: int,
                 mesh, should_stop: Optional[Callable[[], bool]] = None
                 ) -> dict[str, np.ndarray]:
  """Renders a whole frame on the host side of a chunked, sharded renderer.

  Args:
    render_chunk: from `make_render_chunk`.
    params: model parameters (replicated).
    inputs: FrameInputs of the frame.
    height: H.
    width: W.
    chunk: rays per call; rounded up to a multiple of the device count.
    mesh: the device mesh.
    should_stop: if given, asked before every chunk after the first, once
      the chunk before has finished (so a stop wastes at most one chunk's
      work); True abandons the frame. Without it all chunks are dispatched
      at once. With several processes, all must give the same answers.

  Returns:
    {'rgb': float32 [H, W, 3], 'depth': float32 [H, W], 'acc': [H, W]}.

  Raises:
    RenderInterrupted: when `should_stop()` returned True.
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
    if should_stop is not None and outputs:
      # Dispatch is asynchronous: wait for the chunk in flight, so that a
      # stop arriving during it abandons the frame before the next one.
      jax.block_until_ready(outputs[-1])
      if should_stop():
        raise RenderInterrupted(f'stopped after {len(outputs)} of '
                                f'{padded // chunk} chunks')
    piece = jax.device_put(pixels[start:start + chunk], sharded)
    out = render_chunk(params, piece, inputs)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    # Kept on the device until all chunks are dispatched, so that copying
    # results back never stalls the next chunk's computation.
    outputs.append(out)
  outputs = jax.device_get(outputs)
  joined = {k: np.concatenate([o[k] for o in outputs])[:total]
            for k in outputs[0]}
  return {k: v.reshape((height, width) + v.shape[1:]) for k, v in joined.items()}


@dataclasses.dataclass(frozen=True)
class Renderer:
  """A model with its parameters placed on a mesh, ready to render frames.

  Attributes:
    model: the NerfaceModel.
    params: parameters replicated over `mesh`.
    mesh: the device mesh.
    chunk: rays per jitted call (render.chunk).
    render_chunk: from `make_render_chunk`; shared by `with_params` copies so
      new parameters never recompile.
  """
  model: models.NerfaceModel
  params: Any
  mesh: Any
  chunk: int
  render_chunk: Callable[..., Any] = dataclasses.field(repr=False)

  @classmethod
  def create(cls, model: models.NerfaceModel, params: Any, mesh,
             chunk: int) -> 'Renderer':
    """Places host (or replicated device) parameters on `mesh`."""
    return cls(model=model, params=parallel.replicate(params, mesh),
               mesh=mesh, chunk=chunk,
               render_chunk=make_render_chunk(model, mesh))

  def with_params(self, params: Any) -> 'Renderer':
    """The same compiled renderer with other parameters."""
    return dataclasses.replace(self,
                               params=parallel.replicate(params, self.mesh))

  def __call__(self, inputs: FrameInputs, height: int,
               width: int) -> dict[str, np.ndarray]:
    """Renders one frame: see `render_frame`."""
    return render_frame(self.render_chunk, self.params, inputs, height,
                        width, self.chunk, self.mesh)
