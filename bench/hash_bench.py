"""The hash encoding's cost: the `fast` grid, and expression-blended tables.

Times, on the devices JAX sees, the forward and forward+backward (gradient
w.r.t. the tables) of `hashgrid.encode` for a training step's worth of
sample points (`--rays` x samples of the `fast` preset), and the two ways
of driving a grid with expression-blended tables (NeRFBlendShape, the
issue's variant (b)) for K coefficients:

  mix-then-lookup  `blend_tables` (mean + sum_k c_k delta_k) then one
                   `encode`: one lookup per sample, but one coefficient
                   vector per batch, i.e. every ray of a step from one frame;
  lookup-then-mix  every one of the K + 1 tables looked up and the features
                   mixed per ray: any batch, K + 1 lookups per sample.

It also prints the parameter memory of each layout for K = 76 (the released
data) and 52 (our preprocessor).

  python bench/hash_bench.py [--rays 512] [--coefficients 76] [--repeats 3]
"""

import argparse
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from nerface_jax import hashgrid  # pylint: disable=g-import-not-at-top
from nerface_jax import presets  # pylint: disable=g-import-not-at-top


def best_ms(fn, *args, repeats: int) -> float:
  """Best of `repeats` calls after a warm-up (compilation excluded), in ms."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def grid_of(config) -> hashgrid.GridSpec:
  m = config.model
  return hashgrid.GridSpec.create(m.hash_levels, m.hash_base_resolution,
                                  m.hash_max_resolution, m.hash_log2_size)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rays', type=int, default=512)
  parser.add_argument('--coefficients', type=int, default=76)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  config = presets.get_config('fast')
  grid = grid_of(config)
  features = config.model.hash_features
  samples = config.render.num_coarse + config.render.num_fine
  num_points = args.rays * samples
  k = args.coefficients
  print(f'devices: {jax.devices()}; load {os.getloadavg()[0]:.2f}')
  print(f'fast grid: {grid.num_levels} levels x {features} features, '
        f'{grid.num_rows:,} rows ({grid.num_rows * features * 4 / 1e6:.2f} '
        f'MB); {num_points:,} points ({args.rays} rays x {samples} samples)')

  key = jax.random.PRNGKey(0)
  points = jax.random.uniform(key, (num_points, 3))
  table = hashgrid.init_tables(key, grid.num_levels, features, grid.sizes)
  encode = jax.jit(lambda p, t: hashgrid.encode(p, t, grid))
  # The cotangent comes through a dense layer, as in the field: with a loss
  # on the encoding itself XLA fuses the forward into the backward's
  # scatter and times something no model runs.
  readout = jax.random.normal(key, (grid.output_dim(features),
                                    config.model.hash_width)) * 0.1
  grad = jax.jit(jax.grad(lambda t, p: jnp.sum(jnp.tanh(
      hashgrid.encode(p, t, grid) @ readout))))
  fwd = best_ms(encode, points, table, repeats=args.repeats)
  both = best_ms(grad, table, points, repeats=args.repeats)
  print(f'static grid (variant a): forward {fwd:.1f} ms, forward+backward '
        f'{both:.1f} ms per step')

  deltas = jax.random.uniform(key, (k,) + table.shape, jnp.float32,
                              -1e-4, 1e-4)
  coeffs = jax.random.uniform(key, (k,))
  mix_then_lookup = jax.jit(jax.grad(
      lambda d, t, p, c: jnp.sum(hashgrid.encode(
          p, hashgrid.blend_tables(t, d, c, 0.0, 1.0), grid) ** 2)))
  ms = best_ms(mix_then_lookup, deltas, table, points, coeffs,
               repeats=args.repeats)
  print(f'blended, mix then lookup (K = {k}, one frame per batch): '
        f'forward+backward {ms:.1f} ms per step')

  # Lookup then mix, timed on a slice of the points and scaled: K + 1
  # lookups of the whole step would take minutes on a CPU.
  part = max(num_points // 16, 1)
  per_ray_coeffs = jax.random.uniform(key, (part, k))

  def lookup_then_mix(d, t, p, c):
    mean = hashgrid.encode(p, t, grid)
    each = jax.lax.map(lambda dk: hashgrid.encode(p, dk, grid), d)
    return jnp.sum((mean + jnp.einsum('pk,kpf->pf', c, each)) ** 2)

  ms_part = best_ms(jax.jit(jax.grad(lookup_then_mix)), deltas, table,
                    points[:part], per_ray_coeffs, repeats=1)
  print(f'blended, lookup then mix (K = {k}, any batch): forward+backward '
        f'{ms_part * num_points / part:.0f} ms per step (timed on '
        f'{part:,} points)')

  ngp = hashgrid.GridSpec.create(16, 16, 2048, 19)
  for grid_name, g, c in (('fast', grid, features), ('Instant-NGP', ngp, 2)):
    one = g.num_rows * c * 4
    for coefficients in (76, 52):
      tables = coefficients + 1
      print(f'memory, {grid_name} grid, K = {coefficients}: {tables} tables '
            f'= {tables * one / 1e9:.3f} GB of parameters, '
            f'{4 * tables * one / 1e9:.2f} GB with Adam moments and the '
            f'gradient (static grid: {one / 1e6:.1f} MB)')


if __name__ == '__main__':
  main()
