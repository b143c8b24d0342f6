"""Throughput of the paper-size NeRFace MLP against this machine's matmul peak.

Times a jitted forward+backward of the `paper` ConditionedMLP (the coarse
network alone: E = 76 expression values and a 32-d gamma, so 171 inputs per
sample) on 1024 rays x 64 samples, in float32 and in bfloat16 compute, and a
jitted square matmul in both dtypes as the reference rate. Runs on whatever
device JAX sees.

  python bench/model_bench.py [--rays 1024] [--samples 64] [--repeats 5]

FLOPs are counted from the layer shapes (2 * in * out per Dense and point for
the forward pass, three times that for forward+backward), with the
conditioning and view-direction terms counted once per ray as the model
computes them. Elementwise work (encoding, activations) is not counted.
"""

import argparse
import pathlib
import sys
import time

import jax
import jax.numpy as jnp

# Run as a script from anywhere: the package lives one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from configs import person  # pylint: disable=g-import-not-at-top
from nerface_jax import encoding  # pylint: disable=g-import-not-at-top
from nerface_jax import models  # pylint: disable=g-import-not-at-top

EXPR_DIM = 76


def best_time(fn, *args, repeats):
  """Best wall time in seconds of `fn(*args)` after one warm-up call."""
  jax.block_until_ready(fn(*args))  # Compiles; never timed.
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_gflops(n, dtype, repeats):
  """Achieved GFLOP/s of a jitted [n, n] @ [n, n] matmul in `dtype`."""
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
  b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
  seconds = best_time(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return 2.0 * n**3 / seconds / 1e9


def mlp_flops(m, cond_dim, num_rays, num_samples):
  """Forward FLOPs of one ConditionedMLP call: (split kernels, plain concat).

  Args:
    m: config.model of the preset.
    cond_dim: C, the per-ray conditioning width.
    num_rays: R.
    num_samples: S.

  Returns:
    (flops as the model computes them, flops of a per-sample concatenation).
  """
  dx = encoding.encoded_dim(3, m.xyz_freqs)
  dd = encoding.encoded_dim(3, m.dir_freqs, include_input=False)
  w, cw = m.trunk_width, m.color_width
  per_point = 0  # Per-sample rows of every kernel.
  per_ray = 0  # Rows applied once per ray (conditioning, direction).
  for i in range(m.trunk_depth):
    if i == 0:
      per_point += dx * w
      per_ray += cond_dim * w
    elif i == m.skip_layer:
      per_point += (dx + w) * w
      per_ray += cond_dim * w
    else:
      per_point += w * w
  per_point += w * w + w * 1  # Feature and density head.
  per_point += w * cw
  if m.use_viewdirs:
    per_ray += dd * cw
  per_point += (m.color_depth - 1) * cw * cw + cw * 3
  points = num_rays * num_samples
  split = 2 * (per_point * points + per_ray * num_rays)
  plain = 2 * (per_point + per_ray) * points
  return split, plain


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rays', type=int, default=1024)
  parser.add_argument('--samples', type=int, default=64)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--matmul_size', type=int, default=2048)
  args = parser.parse_args()

  m = person.get_config('paper').model
  cond_dim = EXPR_DIM + m.latent_dim
  num_rays, num_samples = args.rays, args.samples
  points = num_rays * num_samples
  device = jax.devices()[0]
  print(f'device: {device.platform} {device.device_kind} '
        f'(jax {jax.__version__}, {jax.device_count()} device(s))')

  split, plain = mlp_flops(m, cond_dim, num_rays, num_samples)
  print(f'paper MLP, C = {cond_dim}, {num_rays} rays x {num_samples} samples '
        f'= {points} points')
  print(f'forward: {split / points:.0f} FLOP/point with per-ray conditioning '
        f'({plain / points:.0f} as a plain concatenation, '
        f'{100 * (1 - split / plain):.1f}% saved); forward+backward counted '
        f'as 3x')

  for name in ('float32', 'bfloat16'):
    dtype = jnp.dtype(name)
    gflops = matmul_gflops(args.matmul_size, dtype, args.repeats)
    print(f'{name:9s} {args.matmul_size}^2 matmul: {gflops:8.1f} GFLOP/s')

  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  positions = jax.random.uniform(keys[0], (num_rays, num_samples, 3),
                                 jnp.float32, -0.5, 0.5)
  condition = jax.random.normal(keys[1], (num_rays, cond_dim), jnp.float32)
  viewdirs = jax.random.normal(keys[2], (num_rays, 3), jnp.float32)
  viewdirs /= jnp.linalg.norm(viewdirs, axis=-1, keepdims=True)

  for name in ('float32', 'bfloat16'):
    mlp = models.ConditionedMLP(
        trunk_depth=m.trunk_depth, trunk_width=m.trunk_width,
        skip_layer=m.skip_layer, color_width=m.color_width,
        color_depth=m.color_depth, xyz_freqs=m.xyz_freqs,
        dir_freqs=m.dir_freqs, use_viewdirs=m.use_viewdirs,
        compute_dtype=jnp.dtype(name))
    params = jax.jit(mlp.init)(keys[3], positions, condition, viewdirs)

    def loss(p, c, mlp=mlp):
      rgb, raw = mlp.apply(p, positions, c, viewdirs)
      return jnp.sum(rgb) + jnp.sum(raw)

    # Gradients for the parameters and the condition, as gamma gets in
    # training.
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    seconds = best_time(step, params, condition, repeats=args.repeats)
    print(f'{name:9s} forward+backward: {seconds * 1e3:8.1f} ms, '
          f'{points / seconds:10,.0f} points/s, '
          f'{3 * split / seconds / 1e9:8.1f} GFLOP/s')


if __name__ == '__main__':
  main()
