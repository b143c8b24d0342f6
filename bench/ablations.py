"""The paper's ablations, and attempts to close the unseen-frame gap.

Trains one avatar per row and scores it on the test split (the frames after
the training period: novel poses and expressions), with each way of choosing
gamma for frames that have no trained code:

  zero      the zero code;
  mean      the mean training code;
  fixed     training frame `eval.latent_frame`'s code (the original's choice);
  optimize  a code fitted per test frame on its own pixels, networks frozen
            (uses the test pixels: an upper bound, not an honest score).

Rows (`--runs`):
  full       the default recipe (`configs/person.py`);
  no_bg      no background image (`data.background=none`; paper Table 1);
  no_dyn     no per-frame code (`model.use_latent=False`; paper Table 1);
  no_expr    no expression (`model.use_expression=False`);
  frames_25, frames_50   the first 25% / 50% of the training frames in time
             (`data.train_fraction`; `full` is 100%);
and, with `--attempts`, variants of the full model meant to make the
expression carry what it can explain (`ATTEMPTS` below), trained on the
built-in person (`--attempt_datasets`). `--seed` repeats rows with another
`train.seed`.

For every row it also reports train-frame PSNR (training frames rendered with
their own codes: whether a change costs fidelity where gamma is known) and,
on the built-in person, the controllability check: the jaw coefficient is
swept over [0, 1] at a frontal training pose and each render is compared
with the synthetic generator's image for the same pose and expression (under
the training frames' mean lighting) inside the mouth region, the pixels the
jaw moves in the generator.

  python bench/ablations.py [--datasets builtin,aoc] [--runs full,no_bg,...]
      [--attempts] [--steps 1000] [--rays 512] [--sizes demo|paper]
      [--optimize_steps 50] [--optimize_rays 128] [--set KEY=VALUE]
      [--attempt_datasets builtin] [--seed N] [--out bench/results]
      [--workdir DIR]

Writes `ablations.csv`, `ablations.md` and `ablations.json` under `--out`
(rows are appended as they finish, so an interrupted run keeps its rows, and
a rerun skips rows already in the json unless `--fresh`). `aoc` is the
HDTF clip of the shared fixtures, converted by `preprocess.py` at 64x64 on
first use (needs requirements-preprocess.txt); `--datasets` also takes a
dataset folder.
"""

import argparse
import csv
import json
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Optional

# Run as a script from anywhere: the package lives one folder up.
REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
import numpy as np

from bench import train_bench
from configs import person
from nerface_jax import avatar as avatar_lib
from nerface_jax import data
from nerface_jax import edits
from nerface_jax import scene
from nerface_jax import evaluation
from nerface_jax import images
from nerface_jax import losses
from nerface_jax import metrics
from nerface_jax import renderer
from nerface_jax import synthetic
from nerface_jax import train_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

FIXTURES = REPO.parent / 'shared' / 'fixtures' / 'videos'
CLIPS = {'aoc': FIXTURES / 'hdtf_WDA_AlexandriaOcasioCortez_000.mp4'}
TRACKER = FIXTURES.parent / 'face_landmarker.task'
CLIP_SIZE = 64
CLIP_FRAMES = 200

RUNS = {
    'full': {},
    'no_bg': {'data.background': 'none'},
    'no_dyn': {'model.use_latent': False},
    'no_expr': {'model.use_expression': False},
    'frames_25': {'data.train_fraction': 0.25},
    'frames_50': {'data.train_fraction': 0.5},
}
# Each tries to make the network lean on the expression rather than on the
# per-frame code; see bench/README.md for what each one is for.
ATTEMPTS = {
    'prior_x10': {'train.latent_reg': 0.05},
    'prior_squared': {'train.latent_prior': 'squared', 'train.latent_reg': 1.0},
    'dropout_0.5': {'train.latent_dropout': 0.5},
    'noise_0.02': {'train.latent_noise': 0.02},
    'expr_scale_1': {'model.expr_scale': 1.0},
    'expr_standardize': {'model.expr_norm': 'standardize'},
}
CHOICES = ('zero', 'mean', 'fixed', 'optimize')
JAW_VALUES = (0.0, 0.25, 0.5, 0.75, 1.0)
TRAIN_FRAMES_SCORED = 8


def run_config(sizes: str, dataset: str, overrides: dict[str, Any],
               args: argparse.Namespace):
  """The config of one row: preset `sizes`, the dataset, the overrides."""
  config = person.get_config(sizes)
  if dataset != 'builtin':
    config.data.dir = str(dataset_folder(dataset, args.workdir))
  if args.steps:
    config.train.max_steps = args.steps
    config.train.lr_decay_steps = args.steps
  if args.rays:
    config.train.batch_rays = args.rays
  steps = config.train.max_steps
  # One val evaluation and one checkpoint, at the end: rows time training.
  config.train.eval_every = steps
  config.train.checkpoint_every = steps
  config.train.log_every = max(1, steps // 10)
  config.train.keep_checkpoints = 1
  config.eval.optimize_steps = args.optimize_steps
  config.eval.optimize_rays = args.optimize_rays
  config.eval.optimize_batch = 10
  config.train.seed = args.seed
  for key, value in [*args.set, *overrides.items()]:
    section, name = key.split('.')
    config[section][name] = value
  return config


def dataset_folder(dataset: str, workdir: pathlib.Path) -> pathlib.Path:
  """A dataset folder: a path as given, or a fixture clip converted once."""
  if dataset not in CLIPS:
    path = pathlib.Path(dataset).expanduser()
    if not (path / 'transforms_train.json').is_file():
      raise SystemExit(f'{path}: not a NeRFace dataset folder (no '
                       'transforms_train.json) and not one of '
                       f'{["builtin", *CLIPS]}.')
    return path
  out = workdir / f'{dataset}{CLIP_SIZE}'
  if (out / 'transforms_test.json').is_file():
    return out
  if out.exists():
    shutil.rmtree(out)  # An interrupted conversion; the preprocessor wants it
    # absent or empty.
  print(f'converting {CLIPS[dataset]} -> {out} ({CLIP_SIZE}px)', flush=True)
  subprocess.run(
      [sys.executable, str(REPO / 'preprocess.py'),
       f'--video={CLIPS[dataset]}', f'--out={out}', f'--size={CLIP_SIZE}',
       f'--max_frames={CLIP_FRAMES}', '--debug_frames=0',
       f'--tracker_model={TRACKER}'], check=True)
  return out


def render_scores(avatar: avatar_lib.Avatar, dataset: data.Dataset,
                  codes: np.ndarray, frames: Optional[np.ndarray] = None
                  ) -> dict[str, float]:
  """Mean image metrics (full frame and bbox) of `frames` with `codes`
  (`evaluation.score_frames`, the scores of render.py)."""
  return evaluation.score_frames(avatar.renderer, dataset, codes,
                                 frames)['mean']


def test_scores(avatar: avatar_lib.Avatar, test: data.Dataset
                ) -> dict[str, dict[str, float]]:
  """{choice: mean metrics} on the test split for every gamma choice."""
  scores = {}
  for choice in CHOICES:
    if 'latent' not in avatar.host_params and scores:
      # Without codes every choice renders the same images.
      scores[choice] = scores['zero']
      continue
    codes, _ = avatar.split_codes(test, choice, trained=False)
    scores[choice] = render_scores(avatar, test, codes)
    print(f'    test, {choice:8s}: PSNR {scores[choice]["psnr"]:.2f} dB',
          flush=True)
  return scores


def train_frame_psnr(avatar: avatar_lib.Avatar, train: data.Dataset) -> float:
  """Mean PSNR of a few training frames rendered with their own codes."""
  used = avatar.num_train_frames
  frames = np.unique(np.linspace(0, used - 1, TRAIN_FRAMES_SCORED).astype(int))
  codes, _ = avatar.split_codes(train, 'zero', trained=True)
  return render_scores(avatar, train, codes, frames)['psnr']


def mouth_region(c2w: np.ndarray, expression: np.ndarray, size: int,
                 intrinsics: np.ndarray, appearance: np.ndarray) -> np.ndarray:
  """bool [H, W]: pixels the jaw changes in the generator, grown by 2 px."""
  images = []
  for jaw in (JAW_VALUES[0], JAW_VALUES[-1]):
    e = expression.copy()
    e[synthetic.JAW] = jaw
    images.append(synthetic.render(c2w, e, size, intrinsics,
                                   appearance)[0].astype(np.int16))
  moved = np.abs(images[0] - images[1]).max(axis=-1) > 8
  grown = moved.copy()
  for dy in range(-2, 3):
    for dx in range(-2, 3):
      grown |= np.roll(np.roll(moved, dy, 0), dx, 1)
  return grown


def jaw_control(avatar: avatar_lib.Avatar, train: data.Dataset,
                config) -> dict[str, float]:
  """Mouth-region PSNR of a jaw sweep against the synthetic generator.

  The pose is the most frontal training frame's; the other coefficients are
  its own; gamma is the mean code (what reenactment uses); the generator
  lights the head with the mean lighting of the training frames, the best a
  model without the per-frame code can know.

  Returns:
    {'mouth_psnr': mean over the sweep, 'mouth_psnr_open': at jaw = 1,
     'mouth_pixels': size of the region}.
  """
  size = train.height
  trajectory = synthetic.trajectory(config.data.synthetic_frames,
                                    config.data.synthetic_seed)
  train_ids = synthetic.splits(config.data.synthetic_frames,
                               config.data.synthetic_seed)['train']
  used = train_ids[:avatar.num_train_frames]
  appearance = trajectory.appearance[used].mean(axis=0)
  centre = scene.head_centre(train.c2w)
  index = edits.frontal_index(train.c2w, centre)
  c2w = train.c2w[index].astype(np.float64)
  intrinsics = train.intrinsics.astype(np.float64)
  base = train.expressions[index].astype(np.float64)
  region = mouth_region(c2w, base, size, intrinsics, appearance)
  latent = avatar.shared_code('mean')
  psnrs = []
  for jaw in JAW_VALUES:
    e = base.copy()
    e[synthetic.JAW] = jaw
    truth = synthetic.render(c2w, e, size, intrinsics, appearance)[0]
    inputs = renderer.dataset_inputs(train, index, latent).replace(
        expression=e.astype(np.float32))
    prediction = images.to_uint8(avatar.render(inputs)['rgb'])
    err = (prediction[region].astype(np.float64) -
           truth[region].astype(np.float64)) / 255
    psnrs.append(float(losses.psnr(np.mean(err ** 2))))
  return {'mouth_psnr': float(np.mean(psnrs)),
          'mouth_psnr_open': float(psnrs[-1]),
          'mouth_pixels': int(region.sum())}


def lighting_bound(config) -> dict[str, float]:
  """Test PSNR of the generator itself when the test lighting is unknown.

  The built-in person's lighting drifts per frame and nothing but the image
  shows it, so no code chosen without the test pixels can know it. Rendering
  the test frames with their true pose and expression but a constant light
  shows what a perfect model of everything else would score: under the
  training frames' mean light (what the mean code stands for) and under the
  neutral light.

  Returns:
    {'train_mean_light': mean PSNR, 'neutral_light': mean PSNR}.
  """
  frames, seed = config.data.synthetic_frames, config.data.synthetic_seed
  size = config.data.synthetic_size
  trajectory = synthetic.trajectory(frames, seed)
  ids = synthetic.splits(frames, seed)
  lights = {'train_mean_light': trajectory.appearance[ids['train']].mean(0),
            'neutral_light': np.zeros(synthetic.APPEARANCE_DIM)}
  scores = {name: [] for name in lights}
  for f in ids['test']:
    truth = synthetic.render(trajectory.c2w[f], trajectory.expressions[f],
                             size, appearance=trajectory.appearance[f])[0]
    for name, light in lights.items():
      image = synthetic.render(trajectory.c2w[f], trajectory.expressions[f],
                               size, appearance=light)[0]
      scores[name].append(metrics.image_metrics(image, truth)['psnr'])
  return {name: float(np.mean(v)) for name, v in scores.items()}


def run_row(name: str, dataset: str, overrides: dict[str, Any],
            args: argparse.Namespace) -> dict[str, Any]:
  """Trains and scores one row; returns its record."""
  config = run_config(args.sizes, dataset, overrides, args)
  if args.seed:
    name = f'{name}_seed{args.seed}'
  workdir = args.workdir / 'runs' / f'{pathlib.Path(dataset).name}_{name}'
  if workdir.exists():
    shutil.rmtree(workdir)  # A row always trains from scratch.
  print(f'== {dataset} / {name}: {overrides or "default recipe"}, '
        f'{config.train.max_steps} steps of {config.train.batch_rays} rays',
        flush=True)
  load = train_bench.load_average()
  start = time.perf_counter()
  last = train_lib.train_and_evaluate(config, str(workdir))
  train_seconds = time.perf_counter() - start
  avatar = avatar_lib.load(workdir)
  test = avatar_lib.load_dataset(avatar, 'test')
  train = avatar_lib.load_dataset(avatar, 'train')
  scores = test_scores(avatar, test)
  record = {
      'dataset': pathlib.Path(dataset).name, 'run': name,
      'overrides': overrides, 'steps': config.train.max_steps,
      'rays': config.train.batch_rays,
      'train_frames': avatar.num_train_frames,
      'train_seconds': train_seconds, 'load': load,
      'val_psnr': last.get('val_psnr'),
      'train_psnr': train_frame_psnr(avatar, train), 'test': scores}
  if dataset == 'builtin':
    record['jaw'] = jaw_control(avatar, train, config)
  record['wall_seconds'] = time.perf_counter() - start
  print(f'    train frames {record["train_psnr"]:.2f} dB, '
        f'{train_seconds:.0f} s training, {record["wall_seconds"]:.0f} s in '
        'all', flush=True)
  return record


# --- Output --------------------------------------------------------------------

COLUMNS = [('psnr', 2), ('psnr_bbox', 2), ('ssim', 3), ('ssim_bbox', 3),
           ('l1', 4), ('l1_bbox', 4), ('lpips', 3), ('lpips_bbox', 3)]


def flat_row(record: dict[str, Any]) -> dict[str, Any]:
  """One CSV row: every test metric of every choice in its own column."""
  row = {k: record[k] for k in ('dataset', 'run', 'steps', 'rays',
                                'train_frames', 'train_seconds',
                                'wall_seconds', 'val_psnr', 'train_psnr')}
  row['overrides'] = ' '.join(f'{k}={v}' for k, v in record['overrides'].items())
  for choice in CHOICES:
    for key, _ in COLUMNS:
      row[f'{choice}_{key}'] = record['test'][choice].get(key)
  jaw = record.get('jaw', {})
  row['jaw_mouth_psnr'] = jaw.get('mouth_psnr')
  row['jaw_mouth_psnr_open'] = jaw.get('mouth_psnr_open')
  return row


def _fmt(value, digits: int) -> str:
  return '' if value is None else f'{value:.{digits}f}'


def markdown(records: list[dict[str, Any]]) -> str:
  """The table of the README: PSNR / SSIM / L1 per gamma choice."""
  lines = [
      '| data | run | train frames | steps | train min | train-frame PSNR | '
      + ' | '.join(f'{c} PSNR (bbox)' for c in CHOICES)
      + ' | mean SSIM (bbox) | mean L1 (bbox) | jaw mouth PSNR |',
      '|' + '---|' * (6 + len(CHOICES) + 3)]
  for r in records:
    t = r['test']
    cells = [r['dataset'], r['run'], str(r['train_frames']), str(r['steps']),
             f'{r["train_seconds"] / 60:.1f}', _fmt(r['train_psnr'], 2)]
    cells += [f'{_fmt(t[c]["psnr"], 2)} ({_fmt(t[c]["psnr_bbox"], 2)})'
              for c in CHOICES]
    cells.append(f'{_fmt(t["mean"]["ssim"], 3)} '
                 f'({_fmt(t["mean"]["ssim_bbox"], 3)})')
    cells.append(f'{_fmt(t["mean"]["l1"], 4)} ({_fmt(t["mean"]["l1_bbox"], 4)})')
    cells.append(_fmt(r.get('jaw', {}).get('mouth_psnr'), 2))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_outputs(records: list[dict[str, Any]], out: pathlib.Path):
  out.mkdir(parents=True, exist_ok=True)
  (out / 'ablations.json').write_text(json.dumps(records, indent=1))
  rows = [flat_row(r) for r in records]
  with open(out / 'ablations.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  (out / 'ablations.md').write_text(markdown(records))


def _setting(text: str) -> tuple[str, Any]:
  """'section.key=value' -> (key, value), the value parsed as JSON if it
  parses (numbers, true/false), else kept as a string."""
  key, sep, value = text.partition('=')
  if not sep or key.count('.') != 1:
    raise argparse.ArgumentTypeError(
        f'--set takes section.key=value, got {text!r}.')
  try:
    return key, json.loads(value)
  except json.JSONDecodeError:
    return key, value


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--datasets', default='builtin,aoc',
                      help='builtin, aoc, or dataset folders (comma-separated)')
  parser.add_argument('--runs', default=','.join(RUNS))
  parser.add_argument('--attempts', action='store_true',
                      help='also train the ATTEMPTS rows (built-in person)')
  parser.add_argument('--only_attempts', default=None,
                      help='comma-separated subset of ATTEMPTS to train')
  parser.add_argument('--attempt_datasets', default='builtin',
                      help='datasets the ATTEMPTS rows train on')
  parser.add_argument('--set', type=_setting, action='append', default=[],
                      help='KEY=VALUE config override under every row, e.g. '
                      'model.expr_scale=0.3333333333333333 (repeatable)')
  parser.add_argument('--seed', type=int, default=0,
                      help='train.seed of every row (rows get a _seedN suffix)')
  parser.add_argument('--sizes', default='demo', choices=('demo', 'paper'),
                      help='preset of model and sampling sizes (paper: GPU)')
  parser.add_argument('--steps', type=int, default=1000,
                      help='training steps per row (0: the preset\'s)')
  parser.add_argument('--rays', type=int, default=512,
                      help='rays per step (0: the preset\'s)')
  parser.add_argument('--optimize_steps', type=int, default=50,
                      help='Adam steps of the per-frame code fit')
  parser.add_argument('--optimize_rays', type=int, default=128,
                      help='rays per frame per step of the code fit')
  parser.add_argument('--out', type=pathlib.Path,
                      default=REPO / 'bench' / 'results')
  parser.add_argument('--workdir', type=pathlib.Path,
                      default=pathlib.Path.home() / '.cache' / 'nerface_jax' /
                      'ablations')
  parser.add_argument('--fresh', action='store_true',
                      help='retrain rows already recorded in ablations.json')
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  args.workdir.mkdir(parents=True, exist_ok=True)

  plan = [(d, r, RUNS[r]) for d in args.datasets.split(',')
          for r in args.runs.split(',') if r]
  attempts = (args.only_attempts.split(',') if args.only_attempts else
              list(ATTEMPTS) if args.attempts else [])
  plan += [(d, a, ATTEMPTS[a]) for d in args.attempt_datasets.split(',')
           for a in attempts]
  saved = args.out / 'ablations.json'
  records = [] if args.fresh or not saved.is_file() else json.loads(
      saved.read_text())
  done = {(r['dataset'], r['run']) for r in records}
  suffix = f'_seed{args.seed}' if args.seed else ''
  print(f'devices: {train_bench.describe_devices()}; {len(plan)} rows',
        flush=True)
  total = time.perf_counter()
  for dataset, name, overrides in plan:
    if (pathlib.Path(dataset).name, name + suffix) in done:
      print(f'== {dataset} / {name}: recorded, skipped (--fresh retrains)')
      continue
    records.append(run_row(name, dataset, overrides, args))
    write_outputs(records, args.out)
  if 'builtin' in args.datasets.split(','):
    bound = lighting_bound(run_config(args.sizes, 'builtin', {}, args))
    (args.out / 'ablations_bound.json').write_text(json.dumps(bound, indent=1))
    print('generator on the test frames with a constant light: '
          + ', '.join(f'{k} {v:.2f} dB' for k, v in bound.items()))
  print(f'{len(plan)} rows in {(time.perf_counter() - total) / 60:.1f} min; '
        f'wrote {args.out}/ablations.{{md,csv,json}}')
  print(markdown(records))


if __name__ == '__main__':
  main()
