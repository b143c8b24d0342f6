"""Training-step throughput: rays/s, achieved FLOP/s, and the PyTorch step.

Times the real data-parallel training step (`train_lib.make_train_step`:
device-side ray sampling, coarse and fine networks, quadrature, losses,
gradients, the all-reduce and the Adam update) of a preset, in float32 and in
bfloat16 compute, on every device JAX sees, next to a jitted square matmul
in the same dtype (the device's dense-matmul rate, measured in the same run)
and, on CPU, next to the original's step in PyTorch eager
(`bench/torch_reference.py`) timed in the same process.

  python bench/train_bench.py [--preset paper] [--rays 2048] [--repeats 3]
      [--dtypes float32,bfloat16] [--no-torch]

FLOPs come from the layer shapes (`model_bench.mlp_flops`): the coarse
network on num_coarse samples per ray, the fine network on num_coarse +
num_fine, forward+backward counted as 3x the forward. The per-ray terms
(conditioning, view direction) are counted once per ray as our model computes
them; the PyTorch reference is credited with the same useful FLOPs although
it concatenates the condition to every sample (about 10% more work).
Sampling, encoding, quadrature and the optimizer are not counted.

The training images are random pixels over real synthetic-person poses
(cost does not depend on pixel values). Every time is the best of
`--repeats` after a warm-up step; the 1-minute load average is printed next
to each figure because the development machine is shared.
"""

import argparse
import glob
import gzip
import json
import os
import pathlib
import platform
import re
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

# Run as a script from anywhere: the package lives one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import model_bench  # pylint: disable=g-import-not-at-top
from configs import person  # pylint: disable=g-import-not-at-top
from nerface_jax import models  # pylint: disable=g-import-not-at-top
from nerface_jax import parallel  # pylint: disable=g-import-not-at-top
from nerface_jax import sampler  # pylint: disable=g-import-not-at-top
from nerface_jax import scene  # pylint: disable=g-import-not-at-top
from nerface_jax import synthetic  # pylint: disable=g-import-not-at-top
from nerface_jax import train_lib  # pylint: disable=g-import-not-at-top
from nerface_jax import train_state  # pylint: disable=g-import-not-at-top

EXPR_DIM = synthetic.EXPR_DIM  # 76, as in the released NeRFace data.


def load_average() -> float:
  """The machine's 1-minute load average (other users' work included)."""
  return os.getloadavg()[0]


def describe_devices() -> str:
  """One line naming the devices, jax version and host."""
  d = jax.devices()[0]
  return (f'{jax.device_count()} x {d.platform} {d.device_kind} (jax '
          f'{jax.__version__}, {os.cpu_count()} cpus, '
          f'{platform.processor() or platform.machine()})')


def default_matmul_size() -> int:
  """Side of the reference matmul: large enough to saturate the device."""
  return 2048 if jax.devices()[0].platform == 'cpu' else 8192


def step_flops(config, expr_dim: int, num_rays: int) -> dict[str, float]:
  """FLOPs of one training step from the layer shapes.

  Args:
    config: the experiment config (model and render sections).
    expr_dim: E.
    num_rays: R, the global batch.

  Returns:
    {'coarse_fwd', 'fine_fwd', 'train': 3 * forward of both,
     'train_concat': the same for a per-sample concatenation}.
  """
  m, r = config.model, config.render
  cond_dim = (expr_dim if m.use_expression else 0) + (
      m.latent_dim if m.use_latent else 0)
  coarse, coarse_plain = model_bench.mlp_flops(m, cond_dim, num_rays,
                                               r.num_coarse)
  fine, fine_plain = model_bench.mlp_flops(m, cond_dim, num_rays,
                                           r.num_coarse + r.num_fine)
  return {'coarse_fwd': coarse, 'fine_fwd': fine,
          'train': 3 * (coarse + fine),
          'train_concat': 3 * (coarse_plain + fine_plain)}


def synthetic_host_data(num_frames: int, size: int,
                        bbox_weight: float = 0.9,
                        seed: int = 0) -> sampler.DeviceData:
  """Sampling tables of a training set with the synthetic person's poses.

  Args:
    num_frames: F.
    size: image side H = W.
    bbox_weight: per-pixel weight inside the face box.
    seed: seeds poses, expressions and pixels.

  Returns:
    DeviceData of numpy arrays: random uint8 images [F, size, size, 3], the
    synthetic trajectory's c2w [F, 4, 4] and expressions [F, 76], its face
    boxes, a random background and the synthetic intrinsics.
  """
  rng = np.random.default_rng(seed)
  traj = synthetic.trajectory(num_frames, seed)
  intrinsics = synthetic.default_intrinsics(size)
  bboxes = np.stack([synthetic.bbox(c, e, size, intrinsics)
                     for c, e in zip(traj.c2w, traj.expressions)])
  images = rng.integers(0, 256, (num_frames, size, size, 3), np.uint8)
  background = rng.integers(0, 256, (size, size, 3), np.uint8)
  return sampler.prepare(images, traj.c2w, traj.expressions, bboxes,
                         background, intrinsics, bbox_weight)


def bench_config(preset: str, rays: Optional[int] = None,
                 dtype: str = 'float32', mode: str = 'shard_map'):
  """The preset's config with the batch, compute dtype and mapping set."""
  config = person.get_config(preset)
  if rays:
    config.train.batch_rays = rays
  config.model.compute_dtype = dtype
  config.parallel.mode = mode
  return config


class JaxStep:
  """The library's training step with its state and data placed on devices.

  Attributes:
    config: the config it was built from.
    mesh: the device mesh.
    step: the compiled step.
    state: the current TrainState (donated and replaced by every call).
    data: the placed DeviceData.
  """

  def __init__(self, config, host_data: sampler.DeviceData, mesh=None):
    self.config = config
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    expr_dim = host_data.expressions.shape[1]
    num_frames = host_data.images.shape[0]
    # The head box of these cameras, for the hash field and occupancy grid.
    box = scene.head_box(np.asarray(host_data.c2w),
                         np.asarray(host_data.intrinsics), host_data.height,
                         host_data.width, config.data.near, config.data.far)
    self.model = models.construct_model(config, num_frames, expr_dim, box=box)
    tx = train_state.make_optimizer(config)
    state = train_state.create_train_state(config, self.model, expr_dim, tx)
    if config.parallel.mode == 'pmap':
      self.state = parallel.stack_local(state)
      self.data = parallel.stack_local(host_data)
    else:
      self.state = parallel.replicate(state, self.mesh)
      self.data = parallel.replicate(host_data, self.mesh)
    self.step = train_lib.make_train_step(config, self.model, tx, self.mesh)

  def __call__(self):
    """One step, waited for; returns its stats (device arrays)."""
    self.state, stats = self.step(self.state, self.data)
    jax.block_until_ready((self.state, stats))
    return stats


def time_calls(fn, repeats: int) -> tuple[float, list[float]]:
  """(seconds of the first call, seconds of each of `repeats` later calls).

  The first call includes compilation and is never counted as throughput.
  """
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, times


# XLA operation names -> what the work is (first match wins).
_CATEGORIES = (
    ('matmul (YNNPACK)', ('ynn', 'xnn')),
    ('matmul (Eigen dot)', ('dot', 'gemm', 'onednn', 'cublas', 'matmul')),
    ('concatenate', ('concatenate',)),
    ('copy/transpose', ('copy', 'transpose')),
    ('relu fwd/bwd (maximum, select)', ('select', 'maximum')),
    ('dtype convert', ('convert',)),
    ('reduce', ('reduce',)),
    ('sort', ('sort',)),
    ('gather/scatter', ('gather', 'scatter', 'dynamic')),
    ('all-reduce', ('all-reduce', 'all_reduce')),
)
_HLO_METADATA = re.compile(r'^\s*(?:ROOT )?%(\S+) = .*op_name="([^"]*)"')


def categorize(name: str) -> str:
  """The kind of work of an XLA operation, from its (fusion) name."""
  lower = name.lower()
  for category, keys in _CATEGORIES:
    if any(k in lower for k in keys):
      return category
  return 'other elementwise'


def phase_of(op_name: str) -> str:
  """forward / backward / other, from an instruction's op_name metadata."""
  if not op_name:
    return 'unattributed (no op_name in the HLO)'
  if 'transpose(jvp(' in op_name:
    return 'backward (network and quadrature)'
  if 'jvp(' in op_name:
    return 'forward (network, sampling, quadrature)'
  return 'other (ray sampling, optimizer, all-reduce)'


def hlo_op_names(hlo_text: str) -> dict[str, str]:
  """Instruction name -> op_name metadata of a compiled module's text."""
  names = {}
  for line in hlo_text.splitlines():
    match = _HLO_METADATA.match(line)
    if match:
      names[match.group(1)] = match.group(2)
  return names


def _exclusive_times(intervals: list[tuple[float, float, str]]):
  """Splits wall time among the operations running at each instant.

  Args:
    intervals: (start, end, name) of every operation, in microseconds.

  Returns:
    ({name: milliseconds}, idle milliseconds with no operation running,
    span milliseconds). Overlapping operations share their common time
    equally, so the shares add up to the span.
  """
  # Zero-length operations take no time (and would end before they start).
  intervals = [(a, b, n) for a, b, n in intervals if b > a]
  events = sorted([(a, 1, n) for a, b, n in intervals] +
                  [(b, -1, n) for a, b, n in intervals])
  shares, active, idle = {}, {}, 0.0
  last = events[0][0]
  for t, kind, name in events:
    if t > last:
      if active:
        for n in active:
          shares[n] = shares.get(n, 0.0) + (t - last) / len(active) / 1e3
      else:
        idle += (t - last) / 1e3
    last = t
    if kind > 0:
      active[name] = active.get(name, 0) + 1
    else:
      active[name] -= 1
      if not active[name]:
        del active[name]
  return shares, idle, (events[-1][0] - events[0][0]) / 1e3


def profile_step(fn, logdir: str):
  """Traces one call of `fn` with jax.profiler: where its wall time goes.

  Args:
    fn: a zero-argument callable that waits for its result.
    logdir: where the trace goes (its perfetto json is parsed).

  Returns:
    (wall ms of the call, {operation: exclusive ms}, idle ms inside the
    span of operations). Operations that finish asynchronously (Eigen
    dots) are measured to their 'end:' event.
  """
  jax.profiler.start_trace(logdir, create_perfetto_trace=True)
  start = time.perf_counter()
  fn()
  wall = 1e3 * (time.perf_counter() - start)
  jax.profiler.stop_trace()
  path = sorted(glob.glob(f'{logdir}/**/perfetto_trace.json.gz',
                          recursive=True), key=os.path.getmtime)[-1]
  with gzip.open(path) as f:
    trace = json.load(f)
  events = [e for e in (trace['traceEvents'] if isinstance(trace, dict)
                        else trace) if e.get('ph') == 'X']
  ends = {e['name'][5:]: e for e in events if e['name'].startswith('end: ')}
  intervals = []
  for e in events:
    name = e['name']
    # Python frames start with '$'; runtime and thread-pool bookkeeping
    # encloses or annotates the operations themselves.
    if (name.startswith(('$', 'end: ')) or 'threadpool' in name.lower() or
        any(k in name for k in ('Thunk', 'PjRt', 'Execute', 'Wait ',
                                'Garbage', 'Await'))):
      continue
    stop = e['ts'] + e.get('dur', 0)
    if name in ends:
      stop = max(stop, ends[name]['ts'] + ends[name].get('dur', 0))
    intervals.append((e['ts'], stop, name))
  shares, idle, _ = _exclusive_times(intervals)
  return wall, shares, idle


def print_profile(label: str, wall: float, shares: dict[str, float],
                  idle: float, op_names: dict[str, str], top: int = 10):
  """Prints the wall time of a step by kind of work, by phase, and by op."""
  total = sum(shares.values()) + idle
  print(f'profile {label}: wall {wall:.0f} ms; by kind of operation '
        '(concurrent operations share their time):')
  groups = [('kind', categorize), ('phase', lambda n: phase_of(
      op_names.get(n, '')))]
  for title, key in groups:
    by = {}
    for name, ms in shares.items():
      by[key(name)] = by.get(key(name), 0.0) + ms
    if title == 'phase':
      print('  by phase:')
    for k, ms in sorted(by.items(), key=lambda kv: -kv[1]):
      print(f'    {k:42s} {ms:9.0f} ms {100 * ms / total:5.1f}%')
  print(f'    {"no XLA operation running":42s} {idle:9.0f} ms '
        f'{100 * idle / total:5.1f}%')
  print(f'  top {top} operations:')
  for name, ms in sorted(shares.items(), key=lambda kv: -kv[1])[:top]:
    print(f'    {ms:9.0f} ms  {name:28s} {op_names.get(name, "")[:90]}')


def check_torch_network(config, expr_dim: int, num_rays: int = 64,
                        num_samples: int = 8) -> float:
  """Max |difference| between our MLP and the PyTorch one on equal weights.

  Guards the claim that the reference runs the same network: the JAX
  ConditionedMLP's parameters are copied into the PyTorch NerfaceMLP and both
  evaluate the same random samples.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from bench import torch_reference  # pylint: disable=g-import-not-at-top
  m = config.model
  cond_dim = expr_dim + m.latent_dim
  mlp = models.ConditionedMLP(
      trunk_depth=m.trunk_depth, trunk_width=m.trunk_width,
      skip_layer=m.skip_layer, color_width=m.color_width,
      color_depth=m.color_depth, xyz_freqs=m.xyz_freqs, dir_freqs=m.dir_freqs,
      use_viewdirs=m.use_viewdirs)
  rng = np.random.default_rng(0)
  positions = rng.uniform(-0.3, 0.3, (num_rays, num_samples, 3)).astype(
      np.float32)
  condition = rng.normal(size=(num_rays, cond_dim)).astype(np.float32)
  viewdirs = rng.normal(size=(num_rays, 3)).astype(np.float32)
  viewdirs /= np.linalg.norm(viewdirs, axis=-1, keepdims=True)
  params = jax.jit(mlp.init)(jax.random.PRNGKey(1), positions, condition,
                             viewdirs)['params']
  rgb, raw = jax.jit(mlp.apply)({'params': params}, positions, condition,
                                viewdirs)
  net = torch_reference.NerfaceMLP(m, cond_dim)
  torch_reference.load_jax_params(net, params)
  pos = torch.from_numpy(positions.reshape(-1, 3))
  x = torch.cat([torch_reference.positional_encoding(pos, m.xyz_freqs, True),
                 torch.from_numpy(np.repeat(condition, num_samples, 0))], -1)
  d = torch_reference.positional_encoding(
      torch.from_numpy(np.repeat(viewdirs, num_samples, 0)), m.dir_freqs,
      False)
  with torch.no_grad():
    t_rgb, t_raw = net(x, d)
  return max(
      float(np.abs(np.asarray(rgb).reshape(-1, 3) - t_rgb.numpy()).max()),
      float(np.abs(np.asarray(raw).reshape(-1) - t_raw.numpy()).max()))


def torch_step_times(config, host_data: sampler.DeviceData, num_rays: int,
                     repeats: int) -> list[float]:
  """Seconds of `repeats` PyTorch reference steps after a warm-up."""
  from bench import torch_reference  # pylint: disable=g-import-not-at-top
  step = torch_reference.TorchStep(
      config, host_data.images, host_data.c2w, host_data.expressions,
      host_data.boxes, host_data.background, host_data.intrinsics, num_rays)
  return torch_reference.time_step(step, repeats)


def _fmt_times(times) -> str:
  return ', '.join(f'{t:.2f}' for t in times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='paper', choices=person.PRESETS)
  parser.add_argument('--rays', type=int, default=None,
                      help='global rays per step (default: the preset)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--frames', type=int, default=64,
                      help='training frames of the in-memory data')
  parser.add_argument('--size', type=int, default=512, help='image side')
  parser.add_argument('--matmul_size', type=int, default=None)
  parser.add_argument('--mode', default='shard_map', choices=parallel.MODES)
  parser.add_argument('--profile', default=None,
                      help='trace one step per dtype into this folder and '
                      'print where the time goes')
  parser.add_argument('--torch', action=argparse.BooleanOptionalAction,
                      default=None,
                      help='time the PyTorch reference (default: on CPU)')
  args = parser.parse_args()

  dtypes = args.dtypes.split(',')
  config = bench_config(args.preset, args.rays, dtypes[0], args.mode)
  num_rays = config.train.batch_rays
  matmul_size = args.matmul_size or default_matmul_size()
  use_torch = (jax.devices()[0].platform == 'cpu' if args.torch is None
               else args.torch)
  print(f'devices: {describe_devices()}')
  r = config.render
  flops = step_flops(config, EXPR_DIM, num_rays)
  print(f'{args.preset}: {num_rays} rays/step, {r.num_coarse}+{r.num_fine} '
        f'samples, E = {EXPR_DIM}, {args.frames} frames of {args.size}^2')
  print(f'FLOP/step (layer shapes, fwd+bwd = 3x fwd): coarse fwd '
        f'{flops["coarse_fwd"] / 1e9:.1f} G, fine fwd '
        f'{flops["fine_fwd"] / 1e9:.1f} G, train step '
        f'{flops["train"] / 1e12:.3f} T (per-sample concatenation: '
        f'{flops["train_concat"] / 1e12:.3f} T)')
  host_data = synthetic_host_data(args.frames, args.size,
                                  config.data.bbox_weight)

  rows = []
  peaks = {}
  for name in dtypes:
    load = load_average()
    peaks[name] = model_bench.matmul_gflops(matmul_size, jnp.dtype(name),
                                            args.repeats) * 1e9
    print(f'{name:9s} {matmul_size}^2 jitted matmul: '
          f'{peaks[name] / 1e9:8.1f} GFLOP/s (load {load:.2f})')

  for name in dtypes:
    step = JaxStep(bench_config(args.preset, args.rays, name, args.mode),
                   host_data)
    load = load_average()
    first, times = time_calls(step, args.repeats)
    best = min(times)
    achieved = flops['train'] / best
    rows.append((f'ours {name}', best, achieved, achieved / peaks[name], load))
    print(f'ours  {name:9s}: first step {first:.1f} s (compile), steps '
          f'{_fmt_times(times)} s -> {num_rays / best:8,.0f} rays/s, '
          f'{achieved / 1e9:7.1f} GFLOP/s = '
          f'{100 * achieved / peaks[name]:.0f}% of the {name} matmul '
          f'(load {load:.2f})')
    if args.profile:
      op_names = hlo_op_names(
          step.step.lower(step.state, step.data).compile().as_text())
      print_profile(name, *profile_step(step, os.path.join(args.profile,
                                                           name)), op_names)
    del step

  if use_torch:
    import torch  # pylint: disable=g-import-not-at-top
    diff = check_torch_network(config, EXPR_DIM)
    print(f'torch {torch.__version__} ({torch.get_num_threads()} threads): '
          f'same network as ours, max |difference| {diff:.2e} on equal '
          'weights')
    load = load_average()
    times = torch_step_times(bench_config(args.preset, args.rays), host_data,
                             num_rays, args.repeats)
    best = min(times)
    achieved = flops['train'] / best
    rows.append(('torch float32', best, achieved,
                 achieved / peaks.get('float32', np.nan), load))
    print(f'torch float32  : steps {_fmt_times(times)} s -> '
          f'{num_rays / best:8,.0f} rays/s, {achieved / 1e9:7.1f} useful '
          f'GFLOP/s ({flops["train_concat"] / best / 1e9:.1f} executed) '
          f'(load {load:.2f})')

  print('\n| step | s/step | rays/s | GFLOP/s | of matmul peak | load |')
  print('|---|---|---|---|---|---|')
  for label, best, achieved, share, load in rows:
    print(f'| {label} | {best:.2f} | {num_rays / best:,.0f} | '
          f'{achieved / 1e9:.1f} | {100 * share:.0f}% | {load:.2f} |')
  by_label = {row[0]: row[1] for row in rows}
  if 'torch float32' in by_label:
    for label, best, *_ in rows:
      if label.startswith('ours'):
        print(f'{label} / torch float32 rays/s: '
              f'{by_label["torch float32"] / best:.2f}x')


if __name__ == '__main__':
  main()
