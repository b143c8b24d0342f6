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
from nerface_jax import occupancy
from nerface_jax import parallel
from nerface_jax import rendering
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


def _frame_batch(pixels: jax.Array, inputs: FrameInputs) -> types.Batch:
  """The Batch of rays through `pixels` int32 [C, 2] (column, row)."""
  height, width = inputs.background.shape[:2]
  num = pixels.shape[0]
  rays = camera.generate_rays(pixels.astype(jnp.float32), inputs.intrinsics,
                              inputs.c2w, height, width)
  background = inputs.background[pixels[:, 1], pixels[:, 0]]
  return types.Batch(
      rays=rays,
      rgb=jnp.zeros((num, 3), jnp.float32),
      background=background.astype(jnp.float32) / 255.0,
      expression=jnp.broadcast_to(inputs.expression,
                                  (num,) + inputs.expression.shape),
      frame=jnp.zeros((num,), jnp.int32),
      latent=jnp.broadcast_to(inputs.latent, (num,) + inputs.latent.shape))


def _jit_sharded(fn, mesh, replicated_args: int, sharded_args: int):
  """jit(fn) with its first `replicated_args` arguments replicated, the next
  `sharded_args` and the outputs split over the mesh's 'data' axis."""
  replicated = NamedSharding(mesh, P())
  sharded = NamedSharding(mesh, P(parallel.AXIS))
  return jax.jit(fn, in_shardings=(replicated,) * replicated_args +
                 (sharded,) * sharded_args, out_shardings=sharded)


@dataclasses.dataclass(frozen=True)
class ChunkFns:
  """The jitted per-chunk programs of a model (compiled once per chunk size).

  Each takes (params, inputs: FrameInputs, grid or None, ...per-ray arrays
  [C, ...] sharded) and returns per-ray arrays sharded over 'data'.

  Attributes:
    full: (pixels int32 [C, 2]) -> {'rgb' [C, 3], 'depth' [C], 'acc' [C]},
      the whole model (fine level).
    crosses: (pixels) -> {'hit' bool [C]}: the ray crosses an occupied
      cell (the walk alone, for a first test on a coarsened grid).
    hits: (pixels) -> {'hit' bool [C]}: the ray crosses an occupied cell;
      with one level also {'t' float32 [C, S]}, its sample depths (the same
      walk through the grid finds both).
    depths: (pixels) -> {'t' float32 [C, S]}: the fine sample depths.
    segment: (pixels, t [C, K + 1], trans [C]) -> {'rgb' [C, 3], 'depth'
      [C], 'trans' [C]}: one run of the fine samples composited.
    far: the model's far depth (where the background sits).
    use_background: the model composites a background ('image' mode).
  """
  full: Callable[..., Any]
  crosses: Callable[..., Any]
  hits: Callable[..., Any]
  depths: Callable[..., Any]
  segment: Callable[..., Any]
  far: float
  use_background: bool


def make_chunk_fns(model: models.NerfaceModel, mesh) -> ChunkFns:
  """The jitted chunk programs of `model` on `mesh` (see ChunkFns)."""
  apply = lambda params, *args, **kw: model.apply({'params': params}, *args,
                                                  **kw)

  def full(params, inputs, grid, pixels):
    _, fine = apply(params, _frame_batch(pixels, inputs), None, grid)
    return {'rgb': fine.rgb, 'depth': fine.depth, 'acc': fine.acc}

  def crosses(params, inputs, grid, pixels):
    del params
    rays = _frame_batch(pixels, inputs).rays
    return {'hit': occupancy.crosses_occupied(grid, rays.origins,
                                              rays.directions, model.near,
                                              model.far)}

  def hits(params, inputs, grid, pixels):
    del params
    rays = _frame_batch(pixels, inputs).rays
    one_level = not model.num_fine
    t, hit = occupancy.sample(None, grid, rays.origins, rays.directions,
                              model.near, model.far,
                              model.num_coarse if one_level else 2)
    return {'hit': hit, 't': t} if one_level else {'hit': hit}

  def depths(params, inputs, grid, pixels):
    return {'t': apply(params, _frame_batch(pixels, inputs), grid,
                       method=models.NerfaceModel.fine_depths)}

  def segment(params, inputs, grid, pixels, t, trans):
    del grid
    batch = _frame_batch(pixels, inputs)
    rgb, sigma = apply(params, batch, t[:, :-1],
                       method=models.NerfaceModel.fine_samples)
    rgb_sum, depth_sum, trans_out = rendering.composite_segment(
        rgb, sigma, t, batch.rays.directions, trans)
    return {'rgb': rgb_sum, 'depth': depth_sum, 'trans': trans_out}

  return ChunkFns(full=_jit_sharded(full, mesh, 3, 1),
                  crosses=_jit_sharded(crosses, mesh, 3, 1),
                  hits=_jit_sharded(hits, mesh, 3, 1),
                  depths=_jit_sharded(depths, mesh, 3, 1),
                  segment=_jit_sharded(segment, mesh, 3, 3),
                  far=float(model.far), use_background=model.use_background)


class RenderInterrupted(Exception):
  """`render_frame` stopped between chunks because `should_stop()` said so."""


# Smaller chunk shapes for the rays left after the full chunks: each one is
# compiled once, and a pass over a few surviving rays no longer pays for a
# whole chunk of padding.
_TAIL_HALVINGS = 3


def chunk_sizes(total: int, chunk: int, devices: int = 1,
                halvings: int = _TAIL_HALVINGS) -> list[int]:
  """Sizes of the calls that cover `total` rays, padding at most a little.

  Full chunks first; the rest greedily in chunk / 2, chunk / 4, ...
  (`halvings` halvings, each a multiple of `devices`), the last piece
  rounded up to the smallest size that holds it.

  Args:
    total: rays N > 0.
    chunk: the largest call, a multiple of `devices`.
    devices: the device count.
    halvings: how many smaller shapes (0: whole chunks only).

  Returns:
    Call sizes (ints, at most 1 + halvings distinct) summing to >= N.
  """
  shapes = [chunk >> k for k in range(halvings + 1)
            if (chunk >> k) >= devices and (chunk >> k) % devices == 0]
  sizes = [chunk] * (total // chunk)
  rest = total - chunk * len(sizes)
  for size in shapes[1:]:
    while rest >= size:
      sizes.append(size)
      rest -= size
  if rest > 0:
    sizes.append(min(s for s in shapes if s >= rest))
  return sizes


def _map_chunks(fn: Callable[..., Any], const: tuple, arrays: list,
                chunk: int, mesh,
                should_stop: Optional[Callable[[], bool]],
                tails: bool = False) -> dict[str, np.ndarray]:
  """Runs `fn(*const, *chunk_of_arrays)` over rays in chunks (`chunk_sizes`).

  Args:
    fn: a ChunkFns program.
    const: its replicated leading arguments.
    arrays: host arrays [N, ...] split into chunks along axis 0; the last
      chunk is padded with copies of row 0 (a real ray, so padded lanes stay
      finite), whose results are cut off.
    chunk: rays of the largest call, a multiple of the device count.
    mesh: the device mesh.
    should_stop: see `render_frame`.
    tails: cover what is left after the full chunks with smaller shapes
      (for runs whose ray count varies, such as the passes over still-active
      rays); False pads to a whole chunk, so a frame size compiles one shape.

  Returns:
    dict of host arrays [N, ...].
  """
  total = arrays[0].shape[0]
  sizes = chunk_sizes(total, chunk, mesh.devices.size,
                      _TAIL_HALVINGS if tails else 0)
  padded = sum(sizes)
  arrays = [np.concatenate([a, np.repeat(a[:1], padded - total, axis=0)])
            for a in arrays]
  sharded = NamedSharding(mesh, P(parallel.AXIS))
  outputs = []
  start = 0
  for size in sizes:
    if should_stop is not None and outputs:
      # Dispatch is asynchronous: wait for the chunk in flight, so that a
      # stop arriving during it abandons the frame before the next one.
      jax.block_until_ready(outputs[-1])
      if should_stop():
        raise RenderInterrupted(f'stopped after {len(outputs)} of '
                                f'{len(sizes)} chunks')
    pieces = [jax.device_put(a[start:start + size], sharded) for a in arrays]
    start += size
    out = fn(*const, *pieces)
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    # Kept on the device until all chunks are dispatched, so that copying
    # results back never stalls the next chunk's computation.
    outputs.append(out)
  outputs = jax.device_get(outputs)
  return {k: np.concatenate([o[k] for o in outputs])[:total]
          for k in outputs[0]}


# Rays whose transmittance falls below this stop being evaluated: what they
# miss changes their pixel by less than this (colours are in [0, 1]).
STOP_TRANSMITTANCE = 1e-3


def render_frame(fns: ChunkFns, params: Any, inputs: FrameInputs,
                 height: int, width: int, chunk: int, mesh,
                 should_stop: Optional[Callable[[], bool]] = None,
                 grid: Optional[occupancy.Grid] = None,
                 passes: int = 4,
                 coarse_grid: Optional[occupancy.Grid] = None
                 ) -> dict[str, np.ndarray]:
  """Renders a whole frame on the host side of chunked, sharded programs.

  Without a grid every pixel runs the whole model. With an occupancy grid:
  rays that cross no occupied cell return their background pixel without a
  network call; the others get their fine sample depths from a first pass,
  then the fine samples are evaluated in `passes` runs front to back, each
  over the rays still active (transmittance above STOP_TRANSMITTANCE),
  compacted into full chunks.

  Args:
    fns: from `make_chunk_fns`.
    params: model parameters (replicated).
    inputs: FrameInputs of the frame.
    height: H.
    width: W.
    chunk: rays per call; rounded up to a multiple of the device count.
    mesh: the device mesh.
    should_stop: if given, asked before every chunk after the first, once
      the chunk before has finished (so a stop wastes at most one chunk's
      work); True abandons the frame. Without it all chunks of a pass are
      dispatched at once. With several processes, all must give the same
      answers.
    grid: the occupancy grid (replicated), or None.
    passes: runs of fine samples with a grid (1: no early termination).
    coarse_grid: with a grid, optionally `occupancy.coarsened(grid)`
      (replicated): rays crossing none of its cells are culled by that
      cheaper walk before the exact one.

  Returns:
    {'rgb': float32 [H, W, 3], 'depth': float32 [H, W], 'acc': [H, W]}.

  Raises:
    RenderInterrupted: when `should_stop()` returned True.
  """
  devices = mesh.devices.size
  chunk = -(-min(chunk, height * width) // devices) * devices
  pixels = np.asarray(camera.pixel_grid(height, width), np.int32).reshape(-1, 2)
  inputs = parallel.replicate(inputs, mesh)
  if grid is None:
    out = _map_chunks(fns.full, (params, inputs, None), [pixels], chunk,
                      mesh, should_stop)
  else:
    out = _render_in_passes(fns, params, inputs, grid, pixels, chunk, mesh,
                            should_stop, passes, coarse_grid)
  return {k: v.reshape((height, width) + v.shape[1:]) for k, v in out.items()}


def _render_in_passes(fns: ChunkFns, params, inputs, grid, pixels, chunk,
                      mesh, should_stop, passes,
                      coarse_grid) -> dict[str, np.ndarray]:
  """`render_frame` with a grid: culling and early termination."""
  run = lambda fn, arrays, on=grid: _map_chunks(
      fn, (params, inputs, on), arrays, chunk, mesh, should_stop, tails=True)
  total = pixels.shape[0]
  background = np.asarray(jax.device_get(inputs.background), np.float32)
  background = background[pixels[:, 1], pixels[:, 0]] / 255.0
  rgb = np.zeros((total, 3), np.float32)
  depth = np.zeros((total,), np.float32)
  trans = np.ones((total,), np.float32)
  candidates = np.arange(total)
  if coarse_grid is not None:
    candidates = np.flatnonzero(run(fns.crosses, [pixels], coarse_grid)['hit'])
  hit = candidates[:0]
  if candidates.size:
    found = run(fns.hits, [pixels[candidates]])
    keep = np.flatnonzero(found['hit'])
    hit = candidates[keep]
  if hit.size:
    t = (found['t'][keep] if 't' in found else
         run(fns.depths, [pixels[hit]])['t'])  # [A, S]
    far = t[:, -1:]
    use_background = fns.use_background
    # With a background the last sample is the background itself (alpha 1):
    # only the samples before it meet the network.
    evaluated = t[:, :-1] if use_background else t
    after = far if use_background else t[:, -1:] + rendering.FAR_INTERVAL
    t_ext = np.concatenate([evaluated, after], axis=1)
    num = evaluated.shape[1]
    size = -(-num // passes)
    # Pad to whole runs with zero-length intervals (they absorb nothing).
    pad = size * passes - num
    t_ext = np.concatenate([t_ext[:, :num], np.repeat(t_ext[:, num - 1:num],
                                                      pad, axis=1),
                            t_ext[:, num:]], axis=1)
    active = np.arange(hit.size)
    for p in range(passes):
      if not active.size:
        break
      t_run = t_ext[active, p * size:(p + 1) * size + 1]
      rays = hit[active]
      res = run(fns.segment, [pixels[rays], t_run, trans[rays]])
      rgb[rays] += res['rgb']
      depth[rays] += res['depth']
      trans[rays] = res['trans']
      active = active[trans[rays] > STOP_TRANSMITTANCE]
    if use_background:
      depth[hit] += trans[hit] * far[:, 0]
  if fns.use_background:
    # What is left of every ray's light is the background's, at far (rays
    # that cross no occupied cell see only it).
    missed = np.ones((total,), bool)
    missed[hit] = False
    depth[missed] = fns.far
    rgb += trans[:, None] * background
  return {'rgb': rgb, 'depth': depth, 'acc': 1.0 - trans}


@dataclasses.dataclass(frozen=True)
class Renderer:
  """A model with its parameters placed on a mesh, ready to render frames.

  Attributes:
    model: the NerfaceModel.
    params: parameters replicated over `mesh`.
    mesh: the device mesh.
    chunk: rays per jitted call (render.chunk).
    fns: from `make_chunk_fns`; shared by `with_params` copies so new
      parameters never recompile.
    grid: the occupancy grid as trained (replicated; latent fitting samples
      with it), or None.
    occupancy_threshold: render.occupancy_threshold, the grid's cut.
    render_grid: `occupancy.without_margin(grid)`, what frames are culled and
      sampled with (replicated), or None.
    coarse_grid: `occupancy.coarsened(render_grid)`, the cheap first test
      (replicated), or None.
  """
  model: models.NerfaceModel
  params: Any
  mesh: Any
  chunk: int
  fns: ChunkFns = dataclasses.field(repr=False)
  grid: Optional[occupancy.Grid] = None
  occupancy_threshold: float = 0.01
  render_grid: Optional[occupancy.Grid] = dataclasses.field(default=None,
                                                            repr=False)
  coarse_grid: Optional[occupancy.Grid] = dataclasses.field(default=None,
                                                            repr=False)

  @classmethod
  def create(cls, model: models.NerfaceModel, params: Any, mesh, chunk: int,
             grid: Optional[occupancy.Grid] = None,
             occupancy_threshold: float = 0.01) -> 'Renderer':
    """Places host (or replicated device) parameters and grid on `mesh`."""
    base = cls(model=model, params=None, mesh=mesh, chunk=chunk,
               fns=make_chunk_fns(model, mesh),
               occupancy_threshold=occupancy_threshold)
    return base.with_params(params, grid)

  def with_params(self, params: Any,
                  grid: Optional[occupancy.Grid] = None) -> 'Renderer':
    """The same compiled renderer with other parameters (and grid, when
    given; else the grid stays)."""
    if grid is None:
      return dataclasses.replace(
          self, params=parallel.replicate(params, self.mesh))
    host = jax.device_get(grid)
    tight = occupancy.without_margin(host, self.occupancy_threshold)
    coarse = occupancy.coarsened(tight)
    place = lambda g: None if g is None else parallel.replicate(g, self.mesh)
    return dataclasses.replace(
        self, params=parallel.replicate(params, self.mesh), grid=place(host),
        render_grid=place(tight), coarse_grid=place(coarse))

  def __call__(self, inputs: FrameInputs, height: int, width: int,
               chunk: Optional[int] = None,
               should_stop: Optional[Callable[[], bool]] = None
               ) -> dict[str, np.ndarray]:
    """Renders one frame: see `render_frame` (chunk: default self.chunk)."""
    return render_frame(self.fns, self.params, inputs, height, width,
                        chunk or self.chunk, self.mesh, should_stop,
                        grid=self.render_grid, coarse_grid=self.coarse_grid)
