"""Data-parallel scaling on 1, 2 and 4 CPU devices, and the bytes all-reduced.

Each device count runs in its own process with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (the count is fixed when
JAX starts) and times the library's training step at a fixed GLOBAL batch.
The fake devices share the same CPU cores, so the ideal is a constant
steps/s: a drop that grows with N means a serial section or per-device
overhead, a gain means the split batch uses the cores better.

The communication volume is read from the compiled step: the operands of
its all-reduce instructions (the pmean of the gradient tree and of the
stats), next to the bytes of the gradient tree itself. A ring all-reduce of
B bytes sends 2 (N - 1) / N * B per device.

  python bench/scaling_bench.py [--devices 1,2,4] [--preset paper]
      [--rays 512] [--repeats 3] [--mode shard_map]

CPU only by design: on a real multi-device machine time `train_bench.py`.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

# Run as a script from anywhere: the package lives one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

_BYTES = {'f64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2,
          's64': 8, 'u64': 8, 'pred': 1, 's8': 1, 'u8': 1}
# An all-reduce (or its async start) and the result type in front of it.
_ALL_REDUCE = re.compile(r'=\s*(.*?)\s+all-reduce(?:-start)?\(')
_SHAPE = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')


def all_reduce_bytes(hlo_text: str) -> tuple[int, int]:
  """(number of all-reduce instructions, bytes of their results) in HLO text.

  Args:
    hlo_text: the compiled module's text (`compiled.as_text()`).

  Returns:
    A tuple-shaped all-reduce counts its every element.
  """
  count, total = 0, 0
  for line in hlo_text.splitlines():
    match = _ALL_REDUCE.search(line)
    if not match:
      continue
    count += 1
    for dtype, dims in _SHAPE.findall(match.group(1)):
      size = 1
      for d in filter(None, dims.split(',')):
        size *= int(d)
      total += size * _BYTES[dtype]
  return count, total


def child(args) -> dict:
  """Times the step on this process's devices; returns the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from bench import train_bench  # pylint: disable=g-import-not-at-top
  config = train_bench.bench_config(args.preset, args.rays, args.dtype,
                                    args.mode)
  host_data = train_bench.synthetic_host_data(args.frames, args.size,
                                              config.data.bbox_weight)
  step = train_bench.JaxStep(config, host_data)
  grad_bytes = sum(x.size * 4 for x in jax.tree.leaves(
      step.state.params))
  if args.mode == 'pmap':
    # Every leaf carries the device axis; one copy is what is reduced.
    grad_bytes //= jax.local_device_count()
  hlo = step.step.lower(step.state, step.data).compile().as_text()
  ops, reduced = all_reduce_bytes(hlo)
  load = train_bench.load_average()
  first, times = train_bench.time_calls(step, args.repeats)
  return {'devices': jax.device_count(), 'first': first, 'times': times,
          'grad_bytes': grad_bytes, 'all_reduce_ops': ops,
          'all_reduce_bytes': reduced, 'load': load}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', default='1,2,4')
  parser.add_argument('--preset', default='paper')
  parser.add_argument('--rays', type=int, default=512,
                      help='global rays per step')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--mode', default='shard_map',
                      choices=('shard_map', 'pmap'))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--frames', type=int, default=16)
  parser.add_argument('--size', type=int, default=512)
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args)))
    return

  print(f'{args.preset}, {args.rays} global rays/step, {args.dtype}, '
        f'{args.mode}, {os.cpu_count()} cpus')
  print('\n| devices | s/step | steps/s | rays/s | vs 1 device | all-reduce '
        'ops | all-reduced bytes | gradient tree | ring bytes/device | load |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  base = None
  for n in (int(d) for d in args.devices.split(',')):
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    flags = [f for f in env.get('XLA_FLAGS', '').split()
             if 'device_count' not in f]
    env['XLA_FLAGS'] = ' '.join(
        flags + [f'--xla_force_host_platform_device_count={n}'])
    argv = [sys.executable, __file__, '--child', '--preset', args.preset,
            '--rays', str(args.rays), '--dtype', args.dtype, '--mode',
            args.mode, '--repeats', str(args.repeats), '--frames',
            str(args.frames), '--size', str(args.size)]
    out = subprocess.run(argv, env=env, check=True, capture_output=True,
                         text=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    best = min(r['times'])
    base = base or best
    ring = 2 * (n - 1) / n * r['all_reduce_bytes']
    print(f'| {r["devices"]} | {best:.2f} | {1 / best:.3f} | '
          f'{args.rays / best:,.0f} | {base / best:.2f}x | '
          f'{r["all_reduce_ops"]} | {r["all_reduce_bytes"] / 1e6:.2f} MB | '
          f'{r["grad_bytes"] / 1e6:.2f} MB | {ring / 1e6:.2f} MB | '
          f'{r["load"]:.2f} |', flush=True)


if __name__ == '__main__':
  main()
