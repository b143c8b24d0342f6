"""Time to quality: test PSNR against wall-clock training time (demo preset).

Trains a preset (default `demo`: the built-in synthetic person at 64x64)
with the library's training step and, every `--eval_every` steps, renders the
test split (frames after the training period in time; novel poses and
expressions) with the config's `eval.latent` code and records the mean
per-frame PSNR. The clock counts training only (the first step's
compilation included, evaluation excluded); the total wall time is recorded
too. Writes a CSV and a PNG plot (drawn with Pillow).

  python bench/quality_bench.py [--preset demo] [--max_steps N]
      [--minutes M] [--eval_every 250] [--test_frames K]
      [--out bench/results] [--cpu_devices N]

`--minutes` stops training at the first evaluation after M minutes of
training time. `--cpu_devices N` splits the CPU into N JAX devices (set
before JAX starts).
"""

import argparse
import csv
import math
import os
import pathlib
import sys
import time
from typing import NamedTuple, Sequence


def _set_cpu_devices(argv: list[str]):
  """Applies --cpu_devices before JAX is imported (it is read at start)."""
  for i, arg in enumerate(argv):
    value = None
    if arg.startswith('--cpu_devices='):
      value = arg.split('=', 1)[1]
    elif arg == '--cpu_devices' and i + 1 < len(argv):
      value = argv[i + 1]
    if value:
      flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
               if 'device_count' not in f]
      os.environ['XLA_FLAGS'] = ' '.join(
          flags + [f'--xla_force_host_platform_device_count={int(value)}'])


_set_cpu_devices(sys.argv)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

# Run as a script from anywhere: the package lives one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from bench import train_bench
from configs import person
from nerface_jax import avatar as avatar_lib
from nerface_jax import evaluation
from nerface_jax import experiment
from nerface_jax import latents
from nerface_jax import parallel
from nerface_jax import renderer
from nerface_jax import train_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

FIELDS = ('step', 'train_seconds', 'wall_seconds', 'train_psnr', 'test_psnr',
          'load')


class TestEvaluator:
  """Mean PSNR of rendered test frames (uint8, as render.py scores them)."""

  def __init__(self, exp: experiment.Experiment, test, num_frames: int):
    self.config, self.test = exp.config, test
    self.exp = exp
    self.render = None  # Compiled on the first call, reused after.
    count = test.num_frames if num_frames <= 0 else min(num_frames,
                                                        test.num_frames)
    self.frames = np.linspace(0, test.num_frames - 1, count).round().astype(
        int).tolist()

  def __call__(self, params) -> float:
    host = parallel.to_host(params)
    if self.render is None:
      self.render = renderer.Renderer.create(
          self.exp.model, host, self.exp.mesh, self.config.render.chunk)
    choice = self.config.eval.latent
    # Fitting codes per frame is a render-time option; the mean code is its
    # cheap stand-in here.
    code = latents.shared_code(
        host, latents.shared_choice(choice),
        self.config.eval.latent_frame, self.config.model.latent_dim)
    scores = evaluation.score_frames(
        self.render.with_params(host), self.test, code, self.frames)
    return scores['mean']['psnr']


def _nice_step(span: float, target: int = 6) -> float:
  """A 1-2-5 tick spacing giving about `target` ticks over `span`."""
  raw = max(span, 1e-9) / target
  power = 10.0**math.floor(math.log10(raw))
  for m in (1, 2, 5, 10):
    if m * power >= raw:
      return m * power
  return 10 * power


class Curve(NamedTuple):
  """One line of `plot_curves`.

  Attributes:
    label: legend text.
    colour: RGB tuple.
    points: (x, y) pairs in plot units, in drawing order; NaN y are skipped.
    width: line width in pixels.
  """
  label: str
  colour: tuple[int, int, int]
  points: Sequence[tuple[float, float]]
  width: int = 2


def plot_curves(curves: Sequence[Curve], path: pathlib.Path, title: str,
                x_label: str = 'training time (minutes, evaluation excluded)',
                y_label: str = 'PSNR (dB)',
                guides: Sequence[tuple[float, tuple[int, int, int], str]] = ()):
  """Draws curves on one pair of axes as a PNG (Pillow only, no matplotlib).

  Args:
    curves: drawn in order (later ones on top); the legend lists them.
    path: the PNG to write (its folder is created).
    title: line drawn above the plot.
    x_label: text under the x axis (x starts at 0).
    y_label: text above the y axis.
    guides: (y, colour, label) horizontal dashed reference lines, labelled
      at their left end.
  """
  width, height = 760, 460
  left, right, top, bottom = 70, 24, 40, 56
  image = Image.new('RGB', (width, height), 'white')
  draw = ImageDraw.Draw(image)
  font = ImageFont.load_default()
  finite = [(x, y) for c in curves for x, y in c.points if y == y]
  ys = [y for _, y in finite] + [y for y, _, _ in guides]
  x_max = max([x for x, _ in finite] + [1e-3])
  y_lo, y_hi = math.floor(min(ys)) - 1, math.ceil(max(ys)) + 1
  to_px = lambda x, y: (
      left + (width - left - right) * x / x_max,
      height - bottom - (height - top - bottom) * (y - y_lo) / (y_hi - y_lo))

  step = _nice_step(x_max)
  tick = 0.0
  while tick <= x_max + 1e-9:
    px, _ = to_px(tick, y_lo)
    draw.line([(px, top), (px, height - bottom)], fill=(225, 225, 225))
    draw.text((px - 8, height - bottom + 6), f'{tick:g}', fill='black',
              font=font)
    tick += step
  step = _nice_step(y_hi - y_lo)
  tick = math.ceil(y_lo / step) * step
  while tick <= y_hi + 1e-9:
    _, py = to_px(0, tick)
    draw.line([(left, py), (width - right, py)], fill=(225, 225, 225))
    draw.text((left - 34, py - 6), f'{tick:g}', fill='black', font=font)
    tick += step
  draw.rectangle([(left, top), (width - right, height - bottom)],
                 outline='black')
  draw.text((width // 2 - 3 * len(x_label), height - 24), x_label,
            fill='black', font=font)
  draw.text((8, top - 24), y_label, fill='black', font=font)
  draw.text((left, 10), title, fill='black', font=font)

  for y, colour, label in guides:
    # Pillow draws no dashed lines: 6-pixel dashes with 4-pixel gaps.
    _, py = to_px(0, y)
    for x0 in range(left, width - right, 10):
      draw.line([(x0, py), (min(x0 + 6, width - right), py)], fill=colour)
    draw.text((left + 4, py - 12), label, fill=colour, font=font)
  for curve in curves:
    points = [to_px(x, y) for x, y in curve.points if y == y]
    if len(points) > 1:
      draw.line(points, fill=curve.colour, width=curve.width)
    radius = curve.width + 1
    for px, py in points:
      draw.ellipse([(px - radius, py - radius), (px + radius, py + radius)],
                   fill=curve.colour)
  # Bottom right: rising PSNR curves leave that corner empty.
  text_width = max([int(draw.textlength(c.label, font=font)) for c in curves]
                   + [0])
  legend_x = width - right - text_width - 40
  legend_y = height - bottom - 8 - 16 * len(curves)
  for i, curve in enumerate(curves):
    y = legend_y + 16 * i
    draw.line([(legend_x, y + 6), (legend_x + 24, y + 6)], fill=curve.colour,
              width=3)
    draw.text((legend_x + 30, y), curve.label, fill='black', font=font)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path)


def plot(rows: list[dict], path: pathlib.Path, title: str):
  """Draws test (and train-batch) PSNR against training minutes as a PNG.

  Args:
    rows: dicts with 'train_seconds', 'test_psnr', 'train_psnr'.
    path: the PNG to write.
    title: line drawn above the plot.
  """
  series = (('test_psnr', (20, 90, 200), 'test PSNR (mean over frames)'),
            ('train_psnr', (150, 150, 150), 'train batch PSNR (fine)'))
  # The train curve first, so the test curve is drawn on top.
  plot_curves([Curve(label, colour,
                     [(r['train_seconds'] / 60, r[key]) for r in rows])
               for key, colour, label in reversed(series)], path, title)


def write_csv(rows: list[dict], path: pathlib.Path, fields=FIELDS):
  """Writes dict rows as CSV with the columns `fields` (floats with 4
  decimals)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: (f'{row[k]:.4f}' if isinstance(row[k], float) else
                           row[k]) for k in fields})


def score_checkpoint(workdir: str, split: str):
  """Prints the scores of a trained checkpoint on a split, as render.py and
  the training log compute them (`evaluation.score_frames`)."""
  avatar = avatar_lib.load(workdir)
  dataset = avatar_lib.load_dataset(avatar, split)
  codes, used = avatar.split_codes(
      dataset, None, avatar_lib.is_training_data(avatar, dataset, split))
  scores = evaluation.score_frames(avatar.renderer, dataset, codes)
  print(f'{workdir} step {avatar.step}, {split} ({dataset.num_frames} '
        f'frames, latent {used}): PSNR {scores["mean"]["psnr"]:.4f} dB, SSIM '
        f'{scores["mean"]["ssim"]:.4f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', default='demo', choices=person.PRESETS)
  parser.add_argument('--max_steps', type=int, default=None)
  parser.add_argument('--minutes', type=float, default=0.0,
                      help='stop after this much training time (0: never)')
  parser.add_argument('--eval_every', type=int, default=250)
  parser.add_argument('--test_frames', type=int, default=0,
                      help='test frames rendered per evaluation (0: all)')
  parser.add_argument('--cache_dir', default=None,
                      help='where the built-in person is generated')
  parser.add_argument('--out', default=str(
      pathlib.Path(__file__).resolve().parent / 'results'))
  parser.add_argument('--cpu_devices', type=int, default=None,
                      help='split the CPU into N devices (before JAX starts)')
  parser.add_argument('--workdir', default=None,
                      help='only score this trained workdir\'s checkpoint '
                      '(no training)')
  parser.add_argument('--split', default='test',
                      help='with --workdir: the split to score')
  args = parser.parse_args()
  if args.workdir:
    score_checkpoint(args.workdir, args.split)
    return

  config = person.get_config(args.preset)
  if args.max_steps:
    config.train.max_steps = args.max_steps
  if args.cache_dir:
    config.data.cache_dir = args.cache_dir
  out = pathlib.Path(args.out)
  name = f'time_to_quality_{args.preset}'
  wall_start = time.perf_counter()
  exp = experiment.setup(config)
  train, test = exp.train, exp.splits['test']
  state = exp.initial_state()
  train_data = parallel.replicate(
      experiment.device_data(train, config.data.bbox_weight), exp.mesh)
  step_fn = train_lib.make_train_step(config, exp.model, exp.tx, exp.mesh)
  evaluate = TestEvaluator(exp, test, args.test_frames)
  print(f'devices: {train_bench.describe_devices()}')
  print(f'{args.preset}: {train.num_frames} train frames of {train.width}x'
        f'{train.height}, {len(evaluate.frames)} test frames, '
        f'{config.train.batch_rays} rays/step, up to {config.train.max_steps} '
        'steps', flush=True)

  rows = []
  train_seconds = 0.0

  def record(step: int, train_psnr: float):
    load = train_bench.load_average()
    psnr = evaluate(state.params)
    rows.append({'step': step, 'train_seconds': train_seconds,
                 'wall_seconds': time.perf_counter() - wall_start,
                 'train_psnr': train_psnr, 'test_psnr': psnr, 'load': load})
    print(f'step {step:6d}  {train_seconds / 60:6.2f} min  train '
          f'{train_psnr:6.2f} dB  test {psnr:6.2f} dB  (load {load:.2f})',
          flush=True)
    write_csv(rows, out / f'{name}.csv')

  record(0, float('nan'))
  for step in range(1, config.train.max_steps + 1):
    start = time.perf_counter()
    state, stats = step_fn(state, train_data)
    # Waiting on every step makes the clock exact; the cost is one dispatch
    # latency per step.
    jax.block_until_ready(stats)
    train_seconds += time.perf_counter() - start
    last = step == config.train.max_steps
    if step % args.eval_every == 0 or last:
      record(step, float(parallel.to_host(stats)['psnr']))
      if last or (args.minutes and train_seconds >= 60 * args.minutes):
        break

  title = (f'{args.preset} preset: {train.num_frames} frames of '
           f'{train.width}x{train.height}, {config.train.batch_rays} rays/step,'
           f' {jax.device_count()} x {jax.devices()[0].platform}; best test '
           f'{max(r["test_psnr"] for r in rows):.2f} dB')
  plot(rows, out / f'{name}.png', title)
  print(f'wrote {out / f"{name}.csv"} and {out / f"{name}.png"}')


if __name__ == '__main__':
  main()
