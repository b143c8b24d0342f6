"""Time to quality: a faster preset against `demo` at equal training time.

For each case (a dataset), trains the first preset (default `demo`) for its
full `train.max_steps`, then every other preset (default `fast`) with
`train.max_seconds` set to the first preset's training time, all with the
library's own loop (`train_lib.train_and_evaluate`, what train.py runs).
After the first step and at `--points` evaluation points spread evenly over
the rest of each run (in steps for the first preset, in seconds for the
others) it records the training seconds,
the test PSNR and SSIM with the config's `eval.latent` code (the mean code
unless the preset says otherwise; 'optimize' falls back to it) and the PSNR
of a few training frames with their own codes. Then it times whole-frame
renders of each trained model at 128x128 and 512x512.

  python bench/time_to_quality.py [--presets demo,fast]
      [--cases synthetic64,synthetic128,clip128] [--points 10]
      [--max_steps N] [--test_frames 10] [--train_frames 4]
      [--render_sizes 128,512] [--render_repeats 3] [--render_seconds 120]
      [--clip VIDEO]
      [--cache_dir DIR] [--workdir DIR] [--keep_workdirs]
      [--out bench/results] [--cpu_devices N] [--quick]

Cases: `synthetic64` and `synthetic128` are the built-in synthetic person
(`data.synthetic_size` 64 and 128); `clip128` is a fixture clip converted by
our preprocessor at 128x128, once, into `--cache_dir` (the library's cache
folder by default; reused when present). The presets are used as they are:
only the keys that say which data to train on (`data.dir`,
`data.synthetic_*`, `data.cache_dir`), the run length (`train.max_steps`,
`train.max_seconds`) and the eval and checkpoint cadence are set here.

The clock counts training only, the way `train.max_seconds` counts it, plus
the first step (its compilation included), which `train_and_evaluate` does
not count: that one is timed in a probe beforehand (`probe_first_step`), and
a later preset's budget is the first preset's total minus its own first step.
Each evaluation point is the end of one `train_and_evaluate` call; the next
call resumes from its checkpoint, so evaluation, saving and setup stay off
the clock (a resumed run repeats an uninterrupted one step for step). The
first step after a resume is not timed by the library either; it is counted
at the call's mean step time. The presets' own log, eval and checkpoint
cadence is replaced by one log row, val pass and checkpoint per call.

Writes into `--out`: `time_to_quality.csv` (case, preset, step,
train_seconds, test_psnr, test_ssim, train_psnr), `render_speed.csv`,
`time_to_quality_<case>.png` (PSNR against training time, every preset on
one axis) and `time_to_quality.md` (a table per case: time to the first
preset's final test PSNR, the ratio, the PSNR at its time, render speed).
`--quick` shrinks everything (16-24 pixel images, 6 steps of the first
preset, two points after the first step, renders of 32 and 64 pixels) to
smoke-test the whole script in a few minutes; its figures mean nothing.
"""

import argparse
import contextlib
import dataclasses
import datetime
import io
import math
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

# Run as a script from anywhere: the package lives one folder up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# pylint: disable=g-import-not-at-top,wrong-import-position
# quality_bench applies --cpu_devices to XLA_FLAGS on import, before JAX
# starts; it must come before anything that imports jax.
from bench import quality_bench
from absl import logging as absl_logging
import jax
import ml_collections
import numpy as np

from bench import train_bench
from nerface_jax import avatar as avatar_lib
from nerface_jax import data
from nerface_jax import evaluation
from nerface_jax import experiment
from nerface_jax import latents
from nerface_jax import parallel
from nerface_jax import presets
from nerface_jax import renderer
from nerface_jax import summary
from nerface_jax import train_lib
from nerface_jax import workdir as workdir_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / 'shared' / 'fixtures'
TRACKER = FIXTURES / 'face_landmarker.task'
# The clip of bench/ablations.py (at 64x64 there), so the two can be compared.
DEFAULT_CLIP = FIXTURES / 'videos' / 'hdtf_WDA_AlexandriaOcasioCortez_000.mp4'
CLIP_FRAMES = 200

CSV_FIELDS = ('case', 'preset', 'step', 'train_seconds', 'test_psnr',
              'test_ssim', 'train_psnr')
RENDER_FIELDS = ('case', 'preset', 'size', 'seconds_per_frame', 'rays_per_sec',
                 'repeats')
# Curve colours by preset order (first preset blue, then orange, green, ...).
COLOURS = ((20, 90, 200), (230, 110, 20), (40, 160, 60), (170, 40, 160))
# A step count no run reaches; a later preset stops on train.max_seconds.
UNBOUNDED_STEPS = 10**8


@dataclasses.dataclass(frozen=True)
class Case:
  """One dataset the presets are compared on.

  Attributes:
    name: the case's name in the outputs ('synthetic64', ...).
    size: image side in pixels.
    clip: the video converted by the preprocessor; None for the built-in
      synthetic person.
    frames: frames of the synthetic person or of the clip (over all splits).
  """
  name: str
  size: int
  clip: Optional[pathlib.Path]
  frames: int


def make_cases(names: Sequence[str], clip: pathlib.Path,
               quick: bool) -> list[Case]:
  """The cases named, at their sizes (tiny ones with `quick`).

  Args:
    names: among 'synthetic64', 'synthetic128', 'clip128'.
    clip: the video of 'clip128'.
    quick: smoke-test sizes: 16, 24 and 24 pixels, 20-30 frames.
  """
  table = {'synthetic64': (64, None, 200), 'synthetic128': (128, None, 200),
           'clip128': (128, clip, CLIP_FRAMES)}
  quick_table = {'synthetic64': (16, None, 20), 'synthetic128': (24, None, 20),
                 'clip128': (24, clip, 30)}
  cases = []
  for name in names:
    if name not in table:
      raise SystemExit(f'--cases: unknown case {name!r}; choose from '
                       f'{", ".join(table)}.')
    size, video, frames = (quick_table if quick else table)[name]
    cases.append(Case(name, size, video, frames))
  return cases


def convert_clip(case: Case, cache_dir: pathlib.Path) -> pathlib.Path:
  """The case's clip as a NeRFace dataset folder, converted on first use.

  Runs our preprocessor (`nerface_jax.preprocess`, MediaPipe tracking and
  the automatic background) at `case.size` on the first `case.frames`
  frames. The preprocessor itself does nothing when the folder already
  holds the same dataset.

  Args:
    case: a case with a clip.
    cache_dir: where converted clips are kept.

  Returns:
    `<cache_dir>/clip_<video stem>_s<size>_f<frames>`.
  """
  # Imported here: the preprocessor needs MediaPipe and OpenCV, which only
  # this case uses.
  from nerface_jax import preprocess  # pylint: disable=g-import-not-at-top
  out = cache_dir / f'clip_{case.clip.stem}_s{case.size}_f{case.frames}'
  if (out / 'transforms_test.json').is_file():
    return out
  if out.exists():
    # A conversion killed half-way: the preprocessor wants the folder absent
    # or holding the finished dataset.
    shutil.rmtree(out)
  print(f'[{case.name}] converting {case.clip.name} -> {out} '
        f'({case.size}x{case.size}, {case.frames} frames)', flush=True)
  start = time.perf_counter()
  preprocess.preprocess(case.clip, out, preprocess.Options(
      size=case.size, tracker_model=str(TRACKER), max_frames=case.frames,
      debug_frames=0), log=lambda line: None)
  print(f'[{case.name}] converted in {time.perf_counter() - start:.0f} s',
        flush=True)
  return out


def case_config(preset: str, case: Case, dataset_dir: Optional[pathlib.Path],
                cache_dir: pathlib.Path) -> ml_collections.ConfigDict:
  """`preset`'s config with only the keys that say which data to train on.

  Every preset of a case trains on the same frames: the built-in person's
  size, frame count and seed are set here for all of them, not taken from
  the preset.
  """
  config = presets.get_config(preset)
  config.data.cache_dir = str(cache_dir)
  if dataset_dir is not None:
    config.data.dir = str(dataset_dir)
  else:
    config.data.synthetic_size = case.size
    config.data.synthetic_frames = case.frames
    config.data.synthetic_seed = 0
  return config


def probe_first_step(config: ml_collections.ConfigDict) -> float:
  """Seconds of a fresh run's first training step, compilation included.

  `train_and_evaluate` starts its clock after the first step, so the step
  is timed here: the same set-up and step function as the library's loop
  (`experiment.setup`, `train_lib.make_train_step`), one call on a fresh
  state. With the persistent compilation cache on (see `main`), the run
  that follows loads this compilation instead of repeating it.

  Args:
    config: the run's config.

  Returns:
    float seconds; NaN when the probe could not be run (then the first
    step is left off the clock and the tables say so).
  """
  try:
    exp = experiment.setup(config)
    state = exp.initial_state()
    train_data = experiment.device_data(exp.train, config.data.bbox_weight)
    if config.parallel.mode == 'pmap':
      state = parallel.stack_local(parallel.to_host(state))
      train_data = parallel.stack_local(train_data)
    else:
      train_data = parallel.replicate(train_data, exp.mesh)
    step_fn = train_lib.make_train_step(config, exp.model, exp.tx, exp.mesh)
    start = time.perf_counter()
    state, stats = step_fn(state, train_data)
    jax.block_until_ready(stats)
    return time.perf_counter() - start
  except Exception as e:  # pylint: disable=broad-except
    # The training loop may do more than this probe knows of; the bench
    # still runs, with the first step off the clock.
    print(f'  first-step probe failed ({type(e).__name__}: {e}); the first '
          'step is not counted', flush=True)
    return float('nan')


def segment_seconds(rows: Sequence[dict[str, Any]],
                    start: int) -> tuple[float, int, int]:
  """What one `train_and_evaluate` call timed, from its metrics.jsonl rows.

  The library logs, at every log row, `steps_per_sec` over the steps since
  the previous row (or since the end of the call's first step, which it
  does not time), measured with evaluation and saving left out; so
  (step - previous) / steps_per_sec summed over the call's rows is exactly
  what it counts against `train.max_seconds`.

  Args:
    rows: every row of the workdir's metrics.jsonl.
    start: the step the call resumed from (0 for a fresh run).

  Returns:
    (seconds, steps they cover, last step reached); the call's first step
    is in neither.
  """
  mine = sorted((r for r in rows if r['step'] > start), key=lambda r: r['step'])
  if not mine:
    raise RuntimeError(f'no metrics rows after step {start}: the run did not '
                       'train.')
  previous, seconds = start + 1, 0.0
  for row in mine:
    if row['step'] > previous and row['steps_per_sec'] > 0:
      seconds += (row['step'] - previous) / row['steps_per_sec']
    previous = row['step']
  return seconds, mine[-1]['step'] - start - 1, mine[-1]['step']


class Scorer:
  """Test and train-frame scores of a run's latest checkpoint.

  The datasets are read once per run through the avatar (so they are what
  render.py would score), and frames are spread over each split.
  """

  def __init__(self, test_frames: int, train_frames: int):
    self.test_frames, self.train_frames = test_frames, train_frames
    self.test = self.train = None
    self.test_index = self.train_index = None

  @staticmethod
  def _spread(num: int, count: int) -> list[int]:
    count = num if count <= 0 else min(count, num)
    return np.linspace(0, num - 1, count).round().astype(int).tolist()

  def __call__(self, avatar: avatar_lib.Avatar) -> dict[str, float]:
    """{'test_psnr', 'test_ssim', 'train_psnr'} of `avatar` (mean over the
    chosen frames; uint8 predictions, as `evaluation.score_frames`)."""
    if self.test is None:
      self.test = avatar_lib.load_dataset(avatar, 'test')
      self.train = avatar_lib.load_dataset(avatar, 'train')
      self.test_index = self._spread(self.test.num_frames, self.test_frames)
      self.train_index = self._spread(self.train.num_frames,
                                      self.train_frames)
    # shared_code maps 'optimize' to the mean code: fitting codes at every
    # point would cost more than the training between points.
    test = evaluation.score_frames(avatar.renderer, self.test,
                                   avatar.shared_code(), self.test_index)
    choice = latents.shared_choice(avatar.config.eval.latent)
    codes, _ = avatar.split_codes(self.train, choice, trained=True)
    train = evaluation.score_frames(avatar.renderer, self.train, codes,
                                    self.train_index)
    return {'test_psnr': test['mean']['psnr'],
            'test_ssim': test['mean']['ssim'],
            'train_psnr': train['mean']['psnr']}


@dataclasses.dataclass
class Run:
  """One preset trained on one case.

  Attributes:
    case: the case's name.
    preset: the preset's name.
    rows: evaluation points, dicts of CSV_FIELDS.
    first_step: seconds of the first step (compilation included), NaN if
      not measured.
    batch_rays: rays per step.
    budget: the `train.max_seconds` it ran under (None for the first preset).
    render: {size: seconds per frame}.
    load: 1-minute load average at the start and the end.
    frames: (train, test) frames of the run's data.
    scored: (train, test) frames scored at every point.
    latent: the code of test frames ('mean', 'zero' or 'fixed').
  """
  case: str
  preset: str
  rows: list[dict[str, Any]]
  first_step: float
  batch_rays: int
  budget: Optional[float] = None
  render: dict[int, float] = dataclasses.field(default_factory=dict)
  load: tuple[float, float] = (0.0, 0.0)
  frames: tuple[int, int] = (0, 0)
  scored: tuple[int, int] = (0, 0)
  latent: str = 'mean'

  @property
  def seconds(self) -> float:
    return self.rows[-1]['train_seconds'] if self.rows else float('nan')


def train_run(config: ml_collections.ConfigDict, workdir: pathlib.Path,
              case: Case, preset: str, points: int, scorer: Scorer,
              on_row, budget: Optional[float] = None) -> Run:
  """Trains `config` in segments of resumed calls, scoring after each.

  Args:
    config: the run's config (data keys set); changed here: run length,
      eval and checkpoint cadence.
    workdir: the training workdir (must not exist yet).
    case: the case.
    preset: the preset's name.
    points: evaluation points after the first step's.
    scorer: scores a checkpoint.
    on_row: called with each new row (to write the CSV as it goes).
    budget: None trains `train.max_steps` steps, the first alone, then
      `points` even parts; else the run trains for `budget` seconds on the
      bench clock (first step included): the first step, then `points`
      calls with `train.max_seconds` set to an equal share of what is left.

  Returns:
    The Run.
  """
  load_start = train_bench.load_average()
  total_steps = config.train.max_steps
  first_step = probe_first_step(config)
  first = 0.0 if math.isnan(first_step) else first_step
  # (max_steps, max_seconds) of each call. The first call is the first step
  # alone: a point at the probe's time, so that a curve starting above a
  # target still has a point below it to interpolate from.
  if budget is None:
    ends = sorted(set(round(total_steps * (k + 1) / points)
                      for k in range(points)) - {0, 1})
    segments = [(1, None)] + [(end, None) for end in ends]
  else:
    # The limits of these calls are set as they come (below).
    segments = [(1, None)] + [(UNBOUNDED_STEPS, None)] * points
  # Only the end of a call logs, renders val (evaluation is ours) and saves
  # (the next call resumes from it); no previews, nothing in between. One
  # log row per call still times the whole call (`segment_seconds`).
  config.train.log_every = UNBOUNDED_STEPS
  config.train.eval_every = UNBOUNDED_STEPS
  config.train.checkpoint_every = UNBOUNDED_STEPS
  config.eval.preview_frames = 0
  run = Run(case=case.name, preset=preset, rows=[], first_step=first_step,
            batch_rays=config.train.batch_rays, budget=budget,
            latent=latents.shared_choice(config.eval.latent))
  print(f'[{case.name}] {preset}: first step {first_step:.1f} s (compile '
        'included); ' + (f'{total_steps} steps' if budget is None else
                         f'{budget:.1f} s of training') +
        f' in {len(segments)} segments', flush=True)
  log = summary.MetricsLog(workdir / 'metrics.jsonl')
  clock, step, step_seconds = first, 0, float('nan')
  for n, (max_steps, max_seconds) in enumerate(segments):
    if budget is not None and n:
      # What is left of the budget, spread over the calls left. Each call
      # overshoots its limit by up to a step, and its untimed first step is
      # counted here (below): spreading the remainder corrects both, and
      # one step is kept back for the first. At least a step's worth: the
      # library refuses a limit of 0.
      kept = 0.0 if math.isnan(step_seconds) else step_seconds
      max_seconds = max((budget - clock) / (len(segments) - n) - kept, 1e-3)
    config.train.max_steps = max_steps
    config.train.max_seconds = max_seconds
    wall = time.perf_counter()
    # train.py's summary ("Trained steps ... Next: render.py") would repeat
    # at every segment; its one progress line per call (stderr) stays.
    captured = io.StringIO()
    try:
      with contextlib.redirect_stdout(captured):
        train_lib.train_and_evaluate(config, str(workdir))
    except BaseException:
      print(captured.getvalue(), end='', flush=True)
      raise
    seconds, timed, reached = segment_seconds(log.rows(), step)
    if timed:
      step_seconds = seconds / timed
    if step:
      # A resumed call's first step is timed by no one: count it at the
      # call's mean step time (the previous call's for a one-step call).
      seconds += step_seconds
    clock += seconds
    train_wall = time.perf_counter() - wall
    wall = time.perf_counter()
    avatar = avatar_lib.load(workdir)
    if avatar.step != reached:
      raise RuntimeError(f'{workdir}: the latest checkpoint is step '
                         f'{avatar.step}, the log ends at {reached}.')
    scores = scorer(avatar)
    step = reached
    row = {'case': case.name, 'preset': preset, 'step': step,
           'train_seconds': clock, **scores}
    run.rows.append(row)
    on_row(row)
    print(f'[{case.name}] {preset} step {step:6d}  {clock:7.1f} s training  '
          f'test {scores["test_psnr"]:6.2f} dB (SSIM '
          f'{scores["test_ssim"]:.3f})  train frames '
          f'{scores["train_psnr"]:6.2f} dB  (segment {train_wall:.0f} s wall, '
          f'scoring {time.perf_counter() - wall:.0f} s, load '
          f'{train_bench.load_average():.2f})', flush=True)
  run.load = (load_start, train_bench.load_average())
  run.frames = (scorer.train.num_frames, scorer.test.num_frames)
  run.scored = (len(scorer.train_index), len(scorer.test_index))
  return run


def time_renders(avatar: avatar_lib.Avatar, dataset: data.Dataset,
                 sizes: Sequence[int], repeats: int,
                 max_seconds: float) -> dict[int, tuple[float, int]]:
  """Median seconds per whole rendered frame at each size.

  The camera of the dataset's frame 0, scaled: fx and fy are in pixels and
  grow with the image, cx and cy are fractions and stay. The background is
  black (what it holds costs nothing). One warm-up render per size first
  (a whole frame, through the same `Avatar.render` call as the timed ones),
  so compilation is not timed.

  Args:
    avatar: the trained model.
    dataset: a split of its data (frame 0's pose and expression).
    sizes: square image sides in pixels.
    repeats: timed renders per size, at most.
    max_seconds: no further timed render of a size once its timed renders
      took this long (at least one is made): a slow model at 512x512 may
      take minutes a frame on a CPU.

  Returns:
    {size: (median seconds, timed renders)}.
  """
  code = avatar.shared_code()
  times = {}
  for size in sizes:
    intrinsics = np.array(dataset.intrinsics, np.float32)
    intrinsics[0] *= size / dataset.width
    intrinsics[1] *= size / dataset.height
    inputs = renderer.frame_inputs(dataset.c2w[0], intrinsics,
                                   dataset.expressions[0], code, None, size,
                                   size)
    avatar.render(inputs, size, size)  # Compiles for this frame size.
    samples = []
    while len(samples) < max(repeats, 1) and sum(samples) < max_seconds:
      start = time.perf_counter()
      avatar.render(inputs, size, size)  # Returns host arrays: finished.
      samples.append(time.perf_counter() - start)
    times[size] = (statistics.median(samples), len(samples))
  return times


def time_at(rows: Sequence[dict[str, Any]],
            target: float) -> tuple[Optional[float], bool]:
  """The training seconds at which test PSNR first reaches `target`.

  Linear between the evaluation points around the first crossing.

  Args:
    rows: a run's points in time order ('train_seconds', 'test_psnr').
    target: dB.

  Returns:
    (seconds, exact): seconds is None if no point reaches the target; exact
    is False when the first point already does (the time is then an upper
    bound: the curve before it is not measured).
  """
  for i, row in enumerate(rows):
    if row['test_psnr'] >= target:
      if i == 0:
        return row['train_seconds'], False
      t0, y0 = rows[i - 1]['train_seconds'], rows[i - 1]['test_psnr']
      t1, y1 = row['train_seconds'], row['test_psnr']
      return t0 + (target - y0) / (y1 - y0) * (t1 - t0), True
  return None, True


def psnr_at(rows: Sequence[dict[str, Any]], seconds: float
            ) -> tuple[float, bool]:
  """Test PSNR at `seconds` of training, linear between points.

  Returns:
    (dB, exact): exact is False when `seconds` lies outside the run's
    points (then the nearest end point's value is given).
  """
  times = [r['train_seconds'] for r in rows]
  values = [r['test_psnr'] for r in rows]
  if seconds < times[0] or seconds > times[-1]:
    return (values[0] if seconds < times[0] else values[-1]), False
  return float(np.interp(seconds, times, values)), True


def _seconds(value: Optional[float]) -> str:
  if value is None or value != value:
    return 'n/a'
  return f'{value:.1f} s' if value < 120 else f'{value / 60:.2f} min'


def case_markdown(case: Case, runs: Sequence[Run],
                  sizes: Sequence[int]) -> list[str]:
  """The markdown section of one case: quality table and render speed.

  Args:
    case: the case.
    runs: its runs, the first preset's first (it sets the target).
    sizes: the render sizes timed.

  Returns:
    Lines of markdown.
  """
  base = runs[0]
  target = base.rows[-1]['test_psnr']
  source = (f'{case.clip.name} converted by the preprocessor' if case.clip
            else 'the built-in synthetic person')
  lines = [f'## {case.name}', '',
           f'{source}: {base.frames[0]} train and {base.frames[1]} test frames '
           f'of {case.size}x{case.size}; scored at every point: '
           f'{base.scored[1]} test frames spread over the split and '
           f'{base.scored[0]} training frames. Target: {base.preset}\'s final '
           f'test PSNR, {target:.2f} dB after {_seconds(base.seconds)}.', '',
           '| preset | steps | rays/step | first step (compile) | training '
           'time | final test PSNR | final test SSIM | final train-frame PSNR '
           f'| reaches {target:.2f} dB at | ratio to {base.preset}\'s time | '
           f'test PSNR at {base.preset}\'s time | load |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for run in runs:
    last = run.rows[-1]
    reach, exact_reach = time_at(run.rows, target)
    if reach is None:
      reach_cells = ['not reached', '-']
    else:
      reach_cells = [('' if exact_reach else '<= ') + _seconds(reach),
                     f'{reach / base.seconds:.2f}']
    at, exact = psnr_at(run.rows, base.seconds)
    at_cell = f'{at:.2f}' + ('' if exact else
                             f' (at {_seconds(run.seconds)})')
    cells = [run.preset, str(last['step']), str(run.batch_rays),
             _seconds(run.first_step), _seconds(run.seconds),
             f'{last["test_psnr"]:.2f}', f'{last["test_ssim"]:.3f}',
             f'{last["train_psnr"]:.2f}', *reach_cells, at_cell,
             f'{run.load[0]:.2f}-{run.load[1]:.2f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  if sizes:
    lines += ['', 'Seconds per rendered frame (the model trained on this '
              'case; median after a warm-up render):', '',
              '| preset | ' + ' | '.join(f'{s}x{s}' for s in sizes) + ' |',
              '|---|' + '---|' * len(sizes)]
    for run in runs:
      lines.append(f'| {run.preset} | ' + ' | '.join(
          f'{run.render[s]:.3f}' if s in run.render else 'n/a'
          for s in sizes) + ' |')
  lines += ['', f'![{case.name}](time_to_quality_{case.name}.png)', '']
  return lines


def plot_case(case: Case, runs: Sequence[Run], path: pathlib.Path):
  """PSNR against training time for every preset of a case, as a PNG."""
  minutes = max(run.seconds for run in runs) >= 120
  scale, unit = (60.0, 'minutes') if minutes else (1.0, 'seconds')
  curves = []
  for i, run in enumerate(runs):
    colour = COLOURS[i % len(COLOURS)]
    # The train-frame curve paler and thinner, under its test curve.
    pale = tuple(int(c + (255 - c) * 0.55) for c in colour)
    curves.append(quality_bench.Curve(
        f'{run.preset}: train frames (own codes)', pale,
        [(r['train_seconds'] / scale, r['train_psnr']) for r in run.rows], 1))
    curves.append(quality_bench.Curve(
        f'{run.preset}: test ({run.latent} code)', colour,
        [(r['train_seconds'] / scale, r['test_psnr']) for r in run.rows]))
  target = runs[0].rows[-1]['test_psnr']
  title = (f'{case.name}: {case.size}x{case.size}, {jax.device_count()} x '
           f'{jax.devices()[0].platform}; ' + ', '.join(
               f'{r.preset} {r.rows[-1]["step"]} steps' for r in runs))
  quality_bench.plot_curves(
      curves, path, title,
      x_label=f'training time ({unit}, first step included, evaluation '
      'excluded)',
      guides=[(target, (120, 120, 120),
               f'{runs[0].preset} final test {target:.2f} dB')])


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the command line asks for, resolved (`--quick` applied).

  Attributes:
    presets: preset names; the first sets the time budget.
    points: evaluation points per run after the first step.
    max_steps: steps of the first preset (None: its own train.max_steps).
    test_frames: test frames scored per point (0: all).
    train_frames: training frames scored per point.
    render_sizes: square frame sides timed.
    render_repeats: timed renders per size, at most.
    render_seconds: time cap of the timed renders of one size.
    quick: smoke-test mode.
  """
  presets: tuple[str, ...]
  points: int
  max_steps: Optional[int]
  test_frames: int
  train_frames: int
  render_sizes: tuple[int, ...]
  render_repeats: int
  render_seconds: float
  quick: bool


def bench_case(case: Case, settings: Settings, cache_dir: pathlib.Path,
               root: pathlib.Path, keep_workdirs: bool, on_row,
               on_render) -> list[Run]:
  """Trains, scores and times every preset on one case.

  Args:
    case: the case.
    settings: see Settings.
    cache_dir: where the clip is converted and the built-in person written.
    root: folder of the training workdirs (`<case>_<preset>`).
    keep_workdirs: leave each trained workdir in place.
    on_row: called with every evaluation row (CSV_FIELDS).
    on_render: called with every render-speed row (RENDER_FIELDS).

  Returns:
    One Run per preset, in settings.presets order.
  """
  dataset_dir = convert_clip(case, cache_dir) if case.clip else None
  runs = []
  for n, preset in enumerate(settings.presets):
    config = case_config(preset, case, dataset_dir, cache_dir)
    if n == 0 and settings.max_steps:
      config.train.max_steps = settings.max_steps
    workdir = root / f'{case.name}_{preset}'
    if workdir.exists():
      # A fresh run every time (no resuming), but only over a training
      # workdir: anything else in the way is the user's.
      if not (workdir / workdir_lib.MARKER).is_file():
        raise SystemExit(f'{workdir}: exists and is not a training workdir; '
                         'choose another --workdir.')
      shutil.rmtree(workdir)
    run = train_run(config, workdir, case, preset, settings.points,
                    Scorer(settings.test_frames, settings.train_frames),
                    on_row, budget=None if n == 0 else runs[0].seconds)
    avatar = avatar_lib.load(workdir)
    timed = time_renders(avatar, avatar_lib.load_dataset(avatar, 'test'),
                         settings.render_sizes, settings.render_repeats,
                         settings.render_seconds)
    for size, (seconds, count) in timed.items():
      run.render[size] = seconds
      on_render({'case': case.name, 'preset': preset, 'size': size,
                 'seconds_per_frame': seconds,
                 'rays_per_sec': size * size / seconds, 'repeats': count})
      print(f'[{case.name}] {preset} renders {size}x{size} in {seconds:.3f} s '
            f'({size * size / seconds:,.0f} rays/s, median of {count})',
            flush=True)
    runs.append(run)
    if not keep_workdirs:
      shutil.rmtree(workdir)
  return runs


def write_markdown(path: pathlib.Path, sections: Sequence[str],
                   settings: Settings, wall: float):
  """time_to_quality.md: how it was made, then one section per case.

  Args:
    path: the file to write.
    sections: markdown lines of the finished cases (`case_markdown`).
    settings: see Settings.
    wall: seconds since the start.
  """
  preset_names, points = settings.presets, settings.points
  first = preset_names[0]
  header = [
      '# Time to quality', '',
      f'`python bench/time_to_quality.py {" ".join(sys.argv[1:])}`, '
      f'{datetime.datetime.now():%Y-%m-%d %H:%M}, '
      f'{train_bench.describe_devices()}; {wall / 60:.1f} min of wall time.'
      + (' Quick mode: tiny sizes and steps, the figures mean nothing.'
         if settings.quick else ''), '',
      f'`{first}` trains for its `train.max_steps`; '
      + (', '.join(f'`{p}`' for p in preset_names[1:]) or 'no other preset')
      + f' for the same training time (`train.max_seconds`). Evaluation '
      f'points: after the first step, then {points} more per run. Training '
      'time counts the first step with its compilation and leaves out '
      'evaluation and saving. Test PSNR and '
      'SSIM: test frames (after the training period in time) with the '
      'config\'s `eval.latent` code; train-frame PSNR: training frames with '
      f'their own codes. The time to `{first}`\'s final test PSNR is '
      'interpolated linearly between evaluation points ("<=": the first '
      'point, after one step, already reaches it).', '']
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text('\n'.join(header + list(sections)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--presets', default='demo,fast',
                      help='comma-separated; the first sets the time budget')
  parser.add_argument('--cases', default='synthetic64,synthetic128,clip128')
  parser.add_argument('--points', type=int, default=10,
                      help='evaluation points per run after the first step')
  parser.add_argument('--max_steps', type=int, default=None,
                      help='steps of the first preset (default: its own)')
  parser.add_argument('--test_frames', type=int, default=10,
                      help='test frames scored per point, spread over the '
                      'split (0: all)')
  parser.add_argument('--train_frames', type=int, default=4,
                      help='training frames scored per point')
  parser.add_argument('--render_sizes', default='128,512',
                      help='frame sides timed (empty: no render timing)')
  parser.add_argument('--render_repeats', type=int, default=3,
                      help='timed renders per size (median), at most')
  parser.add_argument('--render_seconds', type=float, default=120.0,
                      help='no more timed renders of a size after this long')
  parser.add_argument('--clip', default=str(DEFAULT_CLIP),
                      help='the video of the clip128 case')
  parser.add_argument('--cache_dir', default=None,
                      help='converted clip and built-in person (default: '
                      'the library cache: $NERFACE_JAX_CACHE, else '
                      '~/.cache/nerface_jax)')
  parser.add_argument('--workdir', default=None,
                      help='training workdirs go here (default: a temporary '
                      'folder, removed at the end)')
  parser.add_argument('--keep_workdirs', action='store_true')
  parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
  parser.add_argument('--cpu_devices', type=int, default=None,
                      help='split the CPU into N devices (before JAX starts)')
  parser.add_argument('--quick', action='store_true',
                      help='smoke test: tiny images, 6 steps, 2 points, '
                      'renders of 32 and 64 pixels')
  args = parser.parse_args()
  # Orbax warns at every read-only checkpoint open (each evaluation point).
  absl_logging.set_verbosity(absl_logging.ERROR)

  names = tuple(p for p in args.presets.split(',') if p)
  unknown = [p for p in names if p not in presets.PRESETS]
  if unknown or not names:
    raise SystemExit(f'--presets: unknown {unknown}; available: '
                     f'{", ".join(presets.PRESETS)}.')
  settings = Settings(
      presets=names, points=args.points, max_steps=args.max_steps,
      test_frames=args.test_frames, train_frames=args.train_frames,
      render_sizes=tuple(int(s) for s in args.render_sizes.split(',') if s),
      render_repeats=args.render_repeats, render_seconds=args.render_seconds,
      quick=args.quick)
  if args.quick:
    settings = dataclasses.replace(
        settings, points=2, max_steps=args.max_steps or 6, render_repeats=1,
        render_sizes=(32, 64))
  cases = make_cases([c for c in args.cases.split(',') if c],
                     pathlib.Path(args.clip), args.quick)
  cache_dir = data.cache_dir(args.cache_dir)
  out = pathlib.Path(args.out)
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix='ttq_'))
  # A fresh persistent compilation cache: the first-step probe's compilation
  # is loaded by the training call after it, and every checkpoint's renderer
  # (a new jit) loads the first one's. Fresh for each invocation so that the
  # probe always pays for its compilation.
  compile_cache = pathlib.Path(tempfile.mkdtemp(prefix='ttq_jit_'))
  jax.config.update('jax_compilation_cache_dir', str(compile_cache))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

  started = time.perf_counter()
  print(f'devices: {train_bench.describe_devices()}')
  print(f'presets {", ".join(names)}; cases '
        f'{", ".join(c.name for c in cases)}; {settings.points} points per '
        f'run after the first step; workdirs in {root}', flush=True)
  rows, render_rows, sections = [], [], []
  csv_path, render_path = out / 'time_to_quality.csv', out / 'render_speed.csv'

  def on_row(row):
    # Rewritten at every point: a long run killed half-way keeps its curve.
    rows.append(row)
    quality_bench.write_csv(rows, csv_path, CSV_FIELDS)

  def on_render(row):
    render_rows.append(row)
    quality_bench.write_csv(render_rows, render_path, RENDER_FIELDS)

  try:
    for case in cases:
      runs = bench_case(case, settings, cache_dir, root, args.keep_workdirs,
                        on_row, on_render)
      plot_case(case, runs, out / f'time_to_quality_{case.name}.png')
      sections += case_markdown(case, runs, settings.render_sizes)
      write_markdown(out / 'time_to_quality.md', sections, settings,
                     time.perf_counter() - started)
  finally:
    shutil.rmtree(compile_cache, ignore_errors=True)
    if not args.workdir and not args.keep_workdirs:
      shutil.rmtree(root, ignore_errors=True)
  print(f'wrote {csv_path}, {render_path}, {out / "time_to_quality.md"} and '
        f'{len(cases)} PNGs in {(time.perf_counter() - started) / 60:.1f} min',
        flush=True)


if __name__ == '__main__':
  main()
