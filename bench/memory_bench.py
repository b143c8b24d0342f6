"""Peak host and device memory of training on a 5,500-frame 512x512 dataset.

The original NeRFace person_1 has about 5,500 training frames of 512x512 and
its code needed about 70 GB of host RAM. This builds a real dataset folder of
that size whose images are hard links to a handful of synthetic-person frames
(the loader decodes every file; only the disk is spared), then measures, each
in a fresh process so that the high-water marks are its own:

  loader   `data.load` of the train split: seconds, frames/s, peak host RSS
           (also at `--loader_frames`, a few hundred frames);
  train    the training path of `experiment`: load -> `device_data` -> placed
           on the devices -> `--steps` steps of the `paper` training step
           (2048 rays); peak host RSS after each phase, and device memory
           (peak bytes in use where the device reports it; on CPU the
           device's arrays live in host memory, already inside the RSS).
           Run twice: on the 5,500-frame folder through `data.load`, and on
           the small folder's frames repeated in memory into a 64-byte
           aligned buffer (which a CPU device uses without copying it).

  python bench/memory_bench.py [--frames 5500] [--loader_frames 300]
      [--steps 2] [--rays 2048] [--workdir DIR] [--keep]

Peak RSS is the kernel's VmHWM of the process (resource.getrusage agrees).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

# Run as a script from anywhere: the package lives one folder up.
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ORIGINAL_GB = 70.0  # Host RAM the original code needed for person_1.
SOURCE_FRAMES = 10  # Distinct synthetic frames the big folder repeats.
SIZE = 512


def host_memory() -> dict[str, float]:
  """Current and peak resident set of this process, in bytes."""
  values = {}
  with open('/proc/self/status') as f:
    for line in f:
      key, _, rest = line.partition(':')
      if key in ('VmRSS', 'VmHWM'):
        values[key] = float(rest.split()[0]) * 1024
  # getrusage reports the same peak in KiB on Linux; kept as a cross-check.
  values['ru_maxrss'] = resource.getrusage(
      resource.RUSAGE_SELF).ru_maxrss * 1024.0
  return values


def device_memory() -> dict[str, float]:
  """Bytes in use / peak on the first device, and bytes of live arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  live = sum(x.nbytes for x in jax.live_arrays())
  return {'device_in_use': float(stats.get('bytes_in_use', float('nan'))),
          'device_peak': float(stats.get('peak_bytes_in_use', float('nan'))),
          'live_arrays': float(live)}


def _link(src: pathlib.Path, dst: pathlib.Path):
  """Hard-links src to dst (a copy across file systems)."""
  try:
    os.link(src, dst)
  except OSError:
    shutil.copyfile(src, dst)


def make_dataset(source: pathlib.Path, out: pathlib.Path,
                 num_frames: int) -> pathlib.Path:
  """A NeRFace folder of `num_frames` train frames linking `source`'s images.

  Args:
    source: a NeRFace dataset folder (its train split is repeated).
    out: the folder to create.
    num_frames: F.

  Returns:
    `out`, holding transforms_train.json, train/*.png (hard links, or copies
    where links fail) and bg/00050.png.
  """
  meta = json.loads((source / 'transforms_train.json').read_text())
  frames = meta['frames']
  (out / 'train').mkdir(parents=True)
  (out / 'bg').mkdir()
  _link(source / 'bg' / '00050.png', out / 'bg' / '00050.png')
  entries = []
  for f in range(num_frames):
    entry = dict(frames[f % len(frames)])
    name = f'./train/f_{f:05d}'
    _link(source / (entry['file_path'].lstrip('./') + '.png'),
         out / (name[2:] + '.png'))
    entry['file_path'] = name
    entries.append(entry)
  meta['frames'] = entries
  (out / 'transforms_train.json').write_text(json.dumps(meta))
  return out


def _gb(x: float) -> str:
  return f'{x / 1e9:.2f} GB'


def child_loader(root: str) -> dict:
  """Loads the train split; reports time and peak memory."""
  from nerface_jax import data  # pylint: disable=g-import-not-at-top
  before = host_memory()
  start = time.perf_counter()
  dataset = data.load(root, 'train')
  seconds = time.perf_counter() - start
  after = host_memory()
  return {'frames': dataset.num_frames, 'seconds': seconds,
          'images_bytes': float(dataset.images.nbytes),
          'rss_before': before['VmRSS'], 'peak': after['VmHWM'],
          'ru_maxrss': after['ru_maxrss']}


def tiled_images(source: np.ndarray, num_frames: int,
                 aligned: bool) -> np.ndarray:
  """uint8 [F, H, W, 3]: `source`'s frames repeated, 64-byte aligned or not."""
  from nerface_jax import data  # pylint: disable=g-import-not-at-top
  shape = (num_frames,) + source.shape[1:]
  images = data.aligned_empty(shape, np.uint8) if aligned else np.empty(
      shape, np.uint8)
  for f in range(num_frames):
    images[f] = source[f % len(source)]
  return images


def child_train(root: str, steps: int, rays: int, frames: int = 0,
                aligned: bool = False) -> dict:
  """The training path of train_lib; memory after each phase.

  Args:
    root: dataset folder. With `frames` = 0 its train split is loaded by
      `data.load` (the library's path); otherwise its frames are repeated
      in memory into `frames` frames (`aligned`: on a 64-byte boundary).
    steps: training steps (the first compiles).
    rays: rays per step.
    frames: see `root`.
    aligned: see `root`.

  Returns:
    Frame count, image bytes and alignment, platform, step seconds and the
    memory after each phase.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from bench import train_bench  # pylint: disable=g-import-not-at-top
  from nerface_jax import data  # pylint: disable=g-import-not-at-top
  from nerface_jax import experiment  # pylint: disable=g-import-not-at-top
  phases = {'start': host_memory()}
  dataset = data.load(root, 'train')
  if frames:
    source = dataset
    dataset = dataclasses.replace(
        source, images=tiled_images(source.images, frames, aligned),
        **{k: np.resize(getattr(source, k), (frames,) + getattr(
            source, k).shape[1:]) for k in ('c2w', 'expressions', 'bboxes')})
    del source
  phases['loaded'] = host_memory()
  host_data = experiment.device_data(dataset, 0.9)
  phases['prepared'] = host_memory()
  config = train_bench.bench_config('paper', rays)
  step = train_bench.JaxStep(config, host_data)
  # Placement may copy in the background: wait for it before measuring.
  jax.block_until_ready(step.data)
  phases['placed'] = {**host_memory(), **device_memory()}
  # The first step compiles; the later ones show the steady state.
  first, times = train_bench.time_calls(step, max(steps - 1, 0))
  phases['trained'] = {**host_memory(), **device_memory()}
  times = [first] + times
  return {'frames': dataset.num_frames,
          'images_bytes': float(dataset.images.nbytes),
          'images_alignment': int(dataset.images.ctypes.data % 64),
          'platform': jax.devices()[0].platform,
          'step_seconds': times, 'phases': phases}


def run_child(args: list[str]) -> dict:
  """Runs this script as a fresh process; returns its JSON result."""
  out = subprocess.run([sys.executable, __file__, *args], check=True,
                       capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--frames', type=int, default=5500)
  parser.add_argument('--loader_frames', type=int, default=300)
  parser.add_argument('--steps', type=int, default=2)
  parser.add_argument('--rays', type=int, default=2048)
  parser.add_argument('--workdir', default=None,
                      help='where the datasets go (default: a temp folder)')
  parser.add_argument('--keep', action='store_true')
  parser.add_argument('--child', choices=('loader', 'train'), default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--root', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--tile', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--aligned', action='store_true',
                      help=argparse.SUPPRESS)
  args = parser.parse_args()

  if args.child == 'loader':
    print(json.dumps(child_loader(args.root)))
    return
  if args.child == 'train':
    print(json.dumps(child_train(args.root, args.steps, args.rays,
                                 args.tile, args.aligned)))
    return

  from bench import train_bench  # pylint: disable=g-import-not-at-top
  from nerface_jax import synthetic  # pylint: disable=g-import-not-at-top
  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='membench_'))
  work.mkdir(parents=True, exist_ok=True)
  try:
    start = time.perf_counter()
    source = synthetic.ensure(work / 'source', SIZE, SOURCE_FRAMES, 0)
    print(f'source: {SOURCE_FRAMES} synthetic frames of {SIZE}^2 '
          f'({time.perf_counter() - start:.0f} s)', flush=True)
    sizes = sorted({args.loader_frames, args.frames})
    roots = {}
    for n in sizes:
      roots[n] = work / f'person_{n}'
      if not roots[n].exists():
        make_dataset(source, roots[n], n)
    print(f'devices: {train_bench.describe_devices()}', flush=True)

    print('\n| loader: train frames | seconds | frames/s | images | peak RSS '
          '| load |')
    print('|---|---|---|---|---|---|')
    for n in sizes:
      load = train_bench.load_average()
      r = run_child(['--child', 'loader', '--root', str(roots[n])])
      print(f'| {r["frames"]} | {r["seconds"]:.1f} | '
            f'{r["frames"] / r["seconds"]:.0f} | {_gb(r["images_bytes"])} | '
            f'{_gb(r["peak"])} | {load:.2f} |', flush=True)

    # The second variant repeats the small folder's frames in memory into a
    # 64-byte aligned buffer, which the CPU device can use without a copy.
    variants = [
        ('data.load of the folder (the library path)', roots[args.frames],
         []),
        ('frames repeated in memory, 64-byte aligned', roots[sizes[0]],
         ['--tile', str(args.frames), '--aligned']),
    ]
    for title, root, extra in variants:
      load = train_bench.load_average()
      r = run_child(['--child', 'train', '--root', str(root), '--steps',
                     str(args.steps), '--rays', str(args.rays)] + extra)
      print(f'\n{title}: {r["frames"]} frames of {SIZE}^2 (images '
            f'{_gb(r["images_bytes"])}, buffer address mod 64 = '
            f'{r["images_alignment"]}), paper step of {args.rays} rays on '
            f'{r["platform"]}; steps took '
            f'{", ".join(f"{t:.1f}" for t in r["step_seconds"])} s (the '
            f'first compiles) (load {load:.2f})')
      print('| phase | RSS | peak RSS | device in use | device peak | '
            'live arrays |')
      print('|---|---|---|---|---|---|')
      for phase, m in r['phases'].items():
        dev = [_gb(m[k]) if k in m and m[k] == m[k] else '-'
               for k in ('device_in_use', 'device_peak', 'live_arrays')]
        print(f'| {phase} | {_gb(m["VmRSS"])} | {_gb(m["VmHWM"])} | '
              f'{" | ".join(dev)} |', flush=True)
      peak = r['phases']['trained']['VmHWM']
      print(f'peak host RSS {_gb(peak)} (the original: about '
            f'{ORIGINAL_GB:.0f} GB)')
  finally:
    if not args.keep and not args.workdir:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
  main()
