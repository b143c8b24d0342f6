"""Seconds per rendered frame of the `paper` model at 512x512 and 256x256.

Renders whole frames with the library's renderer (`renderer.render_frame`
over `make_chunk_fns`: chunks of `render.chunk` rays sharded over every
device, 64 coarse + 64 fine samples, deterministic) and reports seconds per
frame, rays/s and achieved GFLOP/s of the forward passes (layer shapes: the
coarse network on 64 samples and the fine one on 128 per ray).

  python bench/render_bench.py [--sizes 512,256] [--repeats 1]
      [--dtype float32] [--workdir W] [--max_chunks N]

Without `--workdir` the model is freshly initialised (rendering cost does not
depend on the weights: there is no early ray termination); with it, the
trained avatar of a training workdir is loaded (`avatar.load`).
`--max_chunks N` times only the first N chunks of a frame and scales the
time by the frame's chunk count; the output says so. Compilation is done on
one chunk before timing.
"""

import argparse
import pathlib
import sys
import time

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np

# Run as a script from anywhere: the package lives one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import model_bench  # pylint: disable=g-import-not-at-top
from bench import train_bench  # pylint: disable=g-import-not-at-top
from configs import person  # pylint: disable=g-import-not-at-top
from nerface_jax import camera  # pylint: disable=g-import-not-at-top
from nerface_jax import models  # pylint: disable=g-import-not-at-top
from nerface_jax import parallel  # pylint: disable=g-import-not-at-top
from nerface_jax import avatar as avatar_lib  # pylint: disable=g-import-not-at-top
from nerface_jax import renderer  # pylint: disable=g-import-not-at-top
from nerface_jax import synthetic  # pylint: disable=g-import-not-at-top


def frame_inputs(size: int, expr_dim: int, latent_dim: int,
                 seed: int = 0) -> renderer.FrameInputs:
  """A synthetic person's pose and intrinsics at `size`, random background."""
  traj = synthetic.trajectory(1, seed)
  rng = np.random.default_rng(seed)
  expression = np.zeros((expr_dim,), np.float32)
  n = min(expr_dim, traj.expressions.shape[1])
  expression[:n] = traj.expressions[0, :n]
  return renderer.FrameInputs(
      c2w=traj.c2w[0].astype(np.float32),
      intrinsics=synthetic.default_intrinsics(size).astype(np.float32),
      expression=expression,
      latent=np.zeros((latent_dim,), np.float32),
      background=rng.integers(0, 256, (size, size, 3), np.uint8))


def warm_up(fns, params, inputs, chunk: int, mesh, grid=None, coarse=None):
  """Compiles the chunk renderer for this frame size (one chunk, untimed;
  with an occupancy grid one whole frame, which compiles every pass)."""
  if grid is not None:
    size = inputs.background.shape[0]
    renderer.render_frame(fns, params, inputs, size, size, chunk, mesh,
                          grid=grid, coarse_grid=coarse)
    return
  devices = mesh.devices.size
  chunk = -(-chunk // devices) * devices
  size = inputs.background.shape[0]
  pixels = np.asarray(camera.pixel_grid(size, size), np.int32).reshape(-1, 2)
  pixels = np.resize(pixels, (chunk, 2))
  piece = jax.device_put(pixels, NamedSharding(mesh, P(parallel.AXIS)))
  jax.block_until_ready(
      fns.full(params, parallel.replicate(inputs, mesh), None, piece))


def time_partial(fns, params, inputs, size: int, chunk: int, mesh,
                 max_chunks: int) -> tuple[float, int]:
  """(seconds of the first `max_chunks` chunks of a frame, chunks per frame)."""
  devices = mesh.devices.size
  chunk = -(-min(chunk, size * size) // devices) * devices
  total_chunks = -(-size * size // chunk)
  pixels = np.asarray(camera.pixel_grid(size, size), np.int32).reshape(-1, 2)
  sharded = NamedSharding(mesh, P(parallel.AXIS))
  placed = parallel.replicate(inputs, mesh)
  start = time.perf_counter()
  for k in range(min(max_chunks, total_chunks)):
    piece = np.resize(pixels[k * chunk:(k + 1) * chunk], (chunk, 2))
    out = fns.full(params, placed, None, jax.device_put(piece, sharded))
    jax.device_get(out)
  return time.perf_counter() - start, total_chunks


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='512,256')
  parser.add_argument('--repeats', type=int, default=1)
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--chunk', type=int, default=None,
                      help='rays per call (default: the config)')
  parser.add_argument('--workdir', default=None,
                      help='render a trained avatar of this workdir')
  parser.add_argument('--max_chunks', type=int, default=0,
                      help='time only this many chunks and extrapolate')
  parser.add_argument('--matmul', action=argparse.BooleanOptionalAction,
                      default=True, help='measure the matmul rate too')
  args = parser.parse_args()

  mesh = parallel.make_mesh()
  if args.workdir:
    avatar = avatar_lib.load(args.workdir, mesh=mesh)
    config, model, params = avatar.config, avatar.model, avatar.renderer.params
    fns, expr_dim = avatar.renderer.fns, avatar.expr_dim
    grid = avatar.renderer.render_grid
    coarse = avatar.renderer.coarse_grid
    source = f'trained avatar {args.workdir} (step {avatar.step})'
  else:
    config = person.get_config('paper')
    config.model.compute_dtype = args.dtype
    expr_dim = train_bench.EXPR_DIM
    model = models.construct_model(config, 1, expr_dim)
    params = parallel.replicate(
        models.init_params(model, jax.random.PRNGKey(0), expr_dim), mesh)
    fns, grid, coarse = renderer.make_chunk_fns(model, mesh), None, None
    source = 'paper model, fresh weights'
  chunk = args.chunk or config.render.chunk
  r = config.render
  print(f'devices: {train_bench.describe_devices()}')
  print(f'{source}, {config.model.compute_dtype}, {r.num_coarse}+'
        f'{r.num_fine} samples, chunk {chunk} rays')
  peak = None
  if args.matmul:
    peak = model_bench.matmul_gflops(
        train_bench.default_matmul_size(),
        jnp.dtype(config.model.compute_dtype), 3) * 1e9
    print(f'{config.model.compute_dtype} matmul: {peak / 1e9:.1f} GFLOP/s')

  cond_dim = expr_dim + config.model.latent_dim
  print('\n| frame | s/frame | rays/s | GFLOP/s | timed | load |')
  print('|---|---|---|---|---|---|')
  for size in (int(s) for s in args.sizes.split(',')):
    inputs = frame_inputs(size, expr_dim, config.model.latent_dim)
    warm_up(fns, params, inputs, min(chunk, size * size), mesh, grid, coarse)
    rays = size * size
    flops = (model_bench.mlp_flops(config.model, cond_dim, rays,
                                   r.num_coarse)[0] +
             model_bench.mlp_flops(config.model, cond_dim, rays,
                                   r.num_coarse + r.num_fine)[0])
    load = train_bench.load_average()
    if args.max_chunks:
      if grid is not None:
        raise SystemExit('--max_chunks times the plain chunk renderer; an '
                         'avatar with an occupancy grid renders in passes.')
      part, total = time_partial(fns, params, inputs, size, chunk,
                                 mesh, args.max_chunks)
      done = min(args.max_chunks, total)
      seconds = part * total / done
      how = f'{done} of {total} chunks, scaled'
    else:
      times = []
      for _ in range(args.repeats):
        start = time.perf_counter()
        out = renderer.render_frame(fns, params, inputs, size, size, chunk,
                                    mesh, grid=grid, coarse_grid=coarse)
        times.append(time.perf_counter() - start)
        assert np.all(np.isfinite(out['rgb']))
      seconds = min(times)
      how = f'whole frame, best of {args.repeats}'
    share = f' ({100 * flops / seconds / peak:.0f}% of matmul)' if peak else ''
    print(f'| {size}x{size} | {seconds:.2f} | {rays / seconds:,.0f} | '
          f'{flops / seconds / 1e9:.1f}{share} | {how} | {load:.2f} |',
          flush=True)


if __name__ == '__main__':
  main()
