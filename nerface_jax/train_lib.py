"""Training: the data-parallel step and the training loop.

`make_train_step` builds ONE per-device body (draw this device's share of the
rays on the device, render, losses, gradients, `lax.pmean` over 'data',
optax update) and maps it over every device with `jax.shard_map` under
`jax.jit` or with `jax.pmap` (`parallel.mode`). The random stream of a step is
a function of (seed, step, device), never of host state, so a resumed run
repeats an uninterrupted one step for step.
"""

import dataclasses
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nerface_jax import checkpoint
from nerface_jax import config_lib
from nerface_jax import data
from nerface_jax import errors
from nerface_jax import evaluation
from nerface_jax import experiment
from nerface_jax import images
from nerface_jax import latents
from nerface_jax import losses
from nerface_jax import models
from nerface_jax import occupancy
from nerface_jax import parallel
from nerface_jax import renderer
from nerface_jax import sampler
from nerface_jax import summary
from nerface_jax import train_state
from nerface_jax import workdir as workdir_lib

TrainingError = errors.TrainingError


# fold_in stream of the code perturbation, apart from the model's four keys.
_CODE_STREAM = 4


def perturb_codes(codes: jax.Array, key: jax.Array, dropout: float,
                  noise: float) -> jax.Array:
  """Training-time corruption of the per-ray codes (gamma dropout and noise).

  A code the network cannot rely on pushes what the expression can explain
  into the expression pathway; at test time the zero (or mean) code then
  stands for "no frame-specific information".

  Args:
    codes: float32 [R, L] gamma of each ray's frame.
    key: PRNG key [2], or one key per ray [R, 2] (then the draw of every ray
      is its own, independent of how the batch is split over devices).
    dropout: probability that a ray's code is replaced by zeros.
    noise: std of Gaussian noise added to every code before the dropout.

  Returns:
    float32 [R, L].
  """
  num = codes.shape[0]
  if jnp.ndim(key) == 1:
    keys = jax.random.split(jax.random.fold_in(key, _CODE_STREAM), num)
  else:
    keys = jax.vmap(lambda k: jax.random.fold_in(k, _CODE_STREAM))(key)

  def one(k, code):
    drop_key, noise_key = jax.random.split(k)
    code = code + noise * jax.random.normal(noise_key, code.shape, code.dtype)
    keep = jax.random.bernoulli(drop_key, 1.0 - dropout)
    return jnp.where(keep, code, jnp.zeros_like(code))

  return jax.vmap(one)(keys, codes)


def latent_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """compute_losses' keyword arguments of the gamma regularisation (the
  values are checked by `config_lib.validate`)."""
  t = config.train
  return {'prior': t.latent_prior, 'dropout': float(t.latent_dropout),
          'noise': float(t.latent_noise)}


def compute_losses(params: Any, model: models.NerfaceModel, batch, key,
                   latent_reg: float, *, prior: str = 'norm',
                   dropout: float = 0.0, noise: float = 0.0, grid=None):
  """The training loss of a batch and its parts.

  Args:
    params: model parameters.
    model: the NerfaceModel.
    batch: types.Batch of R rays with targets.
    key: PRNG key of jitter and density noise ([2], or [R, 2] per ray).
    latent_reg: weight of the gamma prior.
    prior: 'norm' or 'squared' (`losses.latent_prior`).
    dropout: probability of zeroing a ray's code (`perturb_codes`).
    noise: std of noise on the codes (`perturb_codes`).
    grid: the occupancy grid guiding the coarse samples, or None.

  Returns:
    (loss float32 [], stats dict of float32 [] values).
  """
  prior_value = None
  if 'latent' in params:
    codes = params['latent']['gamma'][batch.frame]
    prior_value = losses.latent_prior(codes, prior)
    if dropout or noise:
      # The prior sees the clean codes; only the renderer sees the corrupted.
      batch = batch.replace(latent=perturb_codes(codes, key, dropout, noise))
  coarse, fine = model.apply({'params': params}, batch, key, grid)
  stats = losses.level_mses(coarse, fine, batch.rgb)
  loss = sum(stats.values())
  if prior_value is not None:
    loss = loss + latent_reg * prior_value
    stats['latent_prior'] = prior_value
  stats['loss'] = loss
  return loss, stats


def make_train_step(config: ml_collections.ConfigDict,
                    model: models.NerfaceModel,
                    tx: optax.GradientTransformation, mesh):
  """The data-parallel training step.

  Args:
    config: reads train.batch_rays, train.latent_* and parallel.mode.
    model: the NerfaceModel.
    tx: the optimizer.
    mesh: the device mesh (one axis 'data').

  Returns:
    step(state, device_data) -> (state, stats), the state donated. With
    'shard_map' the arguments are replicated global arrays; with 'pmap' they
    are stacked per local device (`parallel.stack_local`).
  """
  num_devices = mesh.devices.size
  if config.train.batch_rays % num_devices:
    raise ValueError(
        f'train.batch_rays = {config.train.batch_rays} must be a multiple of '
        f'the number of devices ({num_devices}).')
  batch_rays = config.train.batch_rays
  rays_per_device = batch_rays // num_devices
  latent_reg = config.train.latent_reg
  options = latent_options(config)

  def body(state: train_state.TrainState, device_data: sampler.DeviceData):
    # Every device draws the same global batch of (frame, pixel) pairs and
    # per-ray keys from (seed, step), then keeps its own slice: the numbers
    # are the same on 1, 4 or 4,096 devices, under shard_map and pmap, and
    # after a resume. Drawing indices for the whole batch costs next to
    # nothing; only the device's own rays are gathered and rendered.
    key = jax.random.fold_in(state.rng, state.step)
    sample_key, model_key = jax.random.split(key)
    frame, pixels = sampler.sample_pixels(sample_key, device_data, batch_rays)
    ray_keys = jax.random.split(model_key, batch_rays)
    start = jax.lax.axis_index(parallel.AXIS) * rays_per_device
    mine = lambda x: jax.lax.dynamic_slice_in_dim(x, start, rays_per_device)
    batch = sampler.gather_batch(device_data, mine(frame), mine(pixels))
    grad_fn = jax.value_and_grad(compute_losses, has_aux=True)
    (_, stats), grads = grad_fn(state.params, model, batch, mine(ray_keys),
                                latent_reg, grid=state.occupancy, **options)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    stats = jax.lax.pmean(stats, parallel.AXIS)
    stats['psnr'] = losses.psnr(stats['mse_fine'])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grid = state.occupancy
    if grid is not None:
      grid = jax.lax.cond(
          state.step % config.train.occupancy_every == 0,
          lambda g: refresh(g, params, jax.random.fold_in(key, 1),
                            device_data),
          lambda g: g, grid)
      stats['occupied'] = jnp.mean(grid.occupied.astype(jnp.float32))
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state, occupancy=grid), stats

  refresh = make_occupancy_refresh(config, model)
  return parallel.map_step(body, config.parallel.mode, mesh)


def make_occupancy_refresh(config: ml_collections.ConfigDict,
                           model: models.NerfaceModel):
  """One refresh of the occupancy grid from the field being trained.

  Returns:
    refresh(grid, params, key, device_data) -> grid: the densities of both
    levels at jittered cell centres, for the expression and code of one
    random training frame; the grid's decayed running max over refreshes
    makes the occupied set the union over the frames seen (a mouth that
    opens in some frames stays occupied in all). Every device computes the
    same refresh from replicated inputs, so the grid is the same on 1 or N
    devices.
  """
  t = config.train
  # occupancy.update counts refreshes; the config counts steps.
  warmup = -(-t.occupancy_warmup // t.occupancy_every)
  threshold = config.render.occupancy_threshold

  def refresh(grid, params, key, device_data: sampler.DeviceData):
    point_key, frame_key = jax.random.split(key)
    points = occupancy.cell_centres(grid, point_key)
    frame = jax.random.randint(frame_key, (), 0,
                               device_data.expressions.shape[0])
    sigma = model.apply({'params': params}, points,
                        device_data.expressions[frame], frame,
                        method=models.NerfaceModel.densities)
    # sigma * cell side: how much of the light one cell absorbs.
    side = jnp.max(grid.box_max - grid.box_min) / grid.resolution
    return occupancy.update(grid, sigma * side, threshold=threshold,
                            warmup_steps=warmup, dilate=1)

  return refresh



def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


class _Evaluator:
  """Scores val frames during training (val PSNR) and writes previews.

  The scores come from `evaluation.score_frames`, as in `render.py`, so a
  val PSNR in the logs is the one render.py reports for that frame.
  """

  def __init__(self, config, render: renderer.Renderer,
               val: Optional[data.Dataset], workdir: pathlib.Path):
    self.config = config
    self.render = render
    self.val = val
    self.previews = workdir / 'previews'
    count = min(config.eval.preview_frames, val.num_frames) if val else 0
    # Spread over the split so previews show different poses.
    self.frames = (np.linspace(0, val.num_frames - 1, count).round().astype(
        int).tolist() if count else [])

  def __call__(self, params, step: int, writer, is_main: bool,
               grid=None) -> dict:
    if not self.frames:
      return {}
    choice = self.config.eval.latent
    # Fitting codes per frame is a render-time job; training previews use
    # the mean code.
    host_params = parallel.to_host(params)
    code = latents.shared_code(
        host_params, latents.shared_choice(choice),
        self.config.eval.latent_frame, self.config.model.latent_dim)

    def preview(index, name, result, prediction, row):
      del row
      if not is_main:
        return
      panel = np.concatenate([images.upscale(x) for x in (
          prediction, self.val.images[index],
          images.depth_image(result['depth'], self.config.data.near,
                             self.config.data.far))], axis=1)
      images.save_png(self.previews / f'step_{step:07d}_{name}.png', panel)
      writer.image(step, f'val/{name}', panel)

    if grid is not None:
      grid = parallel.to_host(grid)
    scores = evaluation.score_frames(self.render.with_params(host_params, grid),
                                     self.val, code, self.frames, preview)
    row = {'val_psnr': scores['mean']['psnr']}
    if scores['mean'].get('lpips') is not None:
      row['val_lpips'] = scores['mean']['lpips']
    return row


def _host(tree, mode: str):
  return parallel.to_host(parallel.unstack(tree) if mode == 'pmap' else tree)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))


# Parameters of a healthy run stay within a few units (Adam moves each by
# about lr per step); a diverged one (a far too large learning rate) jumps by
# orders of magnitude in one step, often while its loss is still finite.
DIVERGED_PARAMETER = 1e6


@jax.jit
def _healthy(params, opt_state) -> jax.Array:
  """Finite parameters and optimiser state, no parameter beyond
  DIVERGED_PARAMETER: what may be evaluated and saved."""
  largest = jnp.max(jnp.asarray([jnp.max(jnp.abs(x))
                                 for x in jax.tree.leaves(params)]))
  return _all_finite((params, opt_state)) & (largest < DIVERGED_PARAMETER)


@dataclasses.dataclass
class _Resume:
  """The checkpoint a run continues from, and what its choice found."""
  step: Optional[int]
  saved_config: Optional[dict[str, Any]] = None
  saved_meta: Optional[dict[str, Any]] = None
  damaged: list[tuple[int, str]] = dataclasses.field(default_factory=list)
  superseded: list[int] = dataclasses.field(default_factory=list)


def _note(message: str):
  """A line for the user (stderr), also in the log file."""
  logging.info('%s', message)
  print(message, file=sys.stderr, flush=True)


def _choose_checkpoint(workdir: pathlib.Path,
                       step: Optional[int] = None) -> _Resume:
  """The newest intact checkpoint (or `step`), read-only.

  Newer checkpoints that fail verification or whose config cannot be read
  are listed as damaged; with `step`, the newer ones as superseded.

  Raises:
    TrainingError: `step` is not a checkpoint of the workdir, or is damaged.
  """
  if not (workdir / checkpoint.SUBDIR).is_dir():
    if step is not None:
      raise TrainingError(f'{workdir}: --step={step}, but there are no '
                          'checkpoints.')
    return _Resume(step=None)
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if step is not None and step not in steps:
      raise TrainingError(f'{workdir}: --step={step} is not a checkpoint; '
                          f'available: {steps}.')
    candidates = sorted([step] if step is not None else steps, reverse=True)
    resume = _Resume(step=None,
                     superseded=[s for s in steps if step is not None and
                                 s > step])
    for candidate in candidates:
      reason = ckpt.verify(candidate)
      if reason is None:
        try:
          saved = config_lib.upgrade(ckpt.restore_config(candidate))
          meta = ckpt.restore_meta(candidate)
        except Exception as e:  # pylint: disable=broad-except
          reason = f'its config cannot be read ({checkpoint.unreadable(e)})'
      if reason is None:
        resume.step, resume.saved_config, resume.saved_meta = (
            candidate, saved, meta)
        return resume
      if step is not None:
        raise TrainingError(f'{workdir}: checkpoint {candidate} is damaged: '
                            f'{reason}.')
      resume.damaged.append((candidate, reason))
  return resume


def _check_resume(workdir: pathlib.Path, resume: _Resume,
                  config_json: dict[str, Any],
                  facts: Optional[dict[str, Any]] = None,
                  allow: tuple[str, ...] = ()):
  """Refuses a resume whose config or data differ from the checkpoint's.

  Args:
    workdir: the training workdir.
    resume: from `_choose_checkpoint`.
    config_json: the current config as a dict.
    facts: the current training data's facts; None checks the config only.
    allow: config keys allowed to differ besides the safe ones.

  Raises:
    TrainingError: naming every key that differs.
  """
  if resume.step is None:
    return
  conflicts = config_lib.resume_conflicts(resume.saved_config, config_json,
                                          allow=allow)
  what = 'config'
  if not conflicts and facts is not None:
    conflicts = config_lib.meta_conflicts(resume.saved_meta, facts)
    what = 'training data'
  if conflicts:
    raise TrainingError(
        f'{workdir}: the checkpoint at step {resume.step} was trained with '
        f'another {what} ({"; ".join(conflicts)}). Use another --workdir, or '
        'the saved settings to resume.')


def _restore(ckpt: checkpoint.Checkpoints, resume: _Resume,
             fresh: train_state.TrainState) -> train_state.TrainState:
  """Restores the chosen checkpoint, moving damaged ones aside first.

  A checkpoint that fails to load (or loads non-finite values) is moved
  aside too, and the next older intact one is tried.
  """
  for step, reason in resume.damaged:
    moved = ckpt.set_aside(step)
    _note(f'Checkpoint {step} is damaged ({reason}); moved to {moved}.')
  for step in resume.superseded:
    moved = ckpt.set_aside(step, 'superseded')
    _note(f'Checkpoint {step} is newer than --step; moved to {moved}.')
  if resume.step is None:
    return fresh
  candidates = [s for s in reversed(ckpt.all_steps()) if s <= resume.step]
  for step in candidates:
    reason = ckpt.verify(step)
    if reason is None:
      try:
        state = ckpt.restore(fresh, step)
      except (ValueError, KeyError, TypeError) as e:
        if 'shape' in str(e).lower() or isinstance(e, (KeyError, TypeError)):
          raise TrainingError(
              f'{ckpt.directory}: the checkpoint at step {step} does not '
              f'fit this model ({checkpoint.unreadable(e)}).') from None
        reason = f'it cannot be read ({checkpoint.unreadable(e)})'
      except Exception as e:  # pylint: disable=broad-except
        reason = f'it cannot be read ({checkpoint.unreadable(e)})'
      else:
        if bool(_healthy(state.params, state.opt_state)):
          if step != candidates[0] or resume.damaged:
            _note(f'Resuming from checkpoint {step}, the newest intact one.')
          return state
        reason = 'it holds non-finite or diverged values'
    moved = ckpt.set_aside(step)
    _note(f'Checkpoint {step} is damaged ({reason}); moved to {moved}.')
  _note(f'No intact checkpoint is left in {ckpt.directory}; starting afresh.')
  return fresh


def _write_error(path: pathlib.Path, error: BaseException,
                 last_saved: Optional[int] = None) -> TrainingError:
  """A one-line error for a failed write: the path, why, the free space."""
  where = path if path.exists() else path.parent
  try:
    free = f'{shutil.disk_usage(where).free / 2**20:,.0f} MiB free there'
  except OSError:
    free = 'free space unknown'
  kept = (f' The last good checkpoint is step {last_saved}.'
          if last_saved is not None else '')
  return TrainingError(f'{path}: cannot write ({checkpoint.unreadable(error)};'
                       f' {free}).{kept}')


def _kept(last_saved: Optional[int], directory: pathlib.Path) -> str:
  if last_saved is None:
    return 'No checkpoint was saved yet.'
  return f'The last good checkpoint is step {last_saved} in {directory}.'


def _out_of_time(seconds: float, limit: float, step: int,
                 log_every: int) -> bool:
  """Whether `train.max_seconds` is reached, agreed by every process.

  In a multi-host job every host must stop at the same step (the step, the
  evaluation and the save are collective), so process 0 decides, at log
  steps only, and tells the others.
  """
  if jax.process_count() == 1:
    return seconds >= limit
  if step % log_every:
    return False
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(seconds >= limit)))


def _lower_lr_hint(workdir: pathlib.Path, last_saved: Optional[int]) -> str:
  if last_saved is None:
    return ' Start again with a lower --config.train.lr.'
  return (f' To go on from step {last_saved} with a lower learning rate: '
          f'python train.py ... --workdir={workdir} --step={last_saved} '
          '--allow_change=train.lr --config.train.lr=LOWER.')


def _next_lines(workdir: pathlib.Path) -> list[str]:
  """Where the results are and the commands to run next."""
  return [f'Checkpoints: {workdir / checkpoint.SUBDIR}; logs: '
          f'tensorboard --logdir {workdir}',
          'Next:',
          f'  python render.py --workdir={workdir} --out={workdir}/test'
          '            # score the test split',
          f'  python render.py --workdir={workdir} --out={workdir}/orbit '
          '--mode=orbit  # novel views',
          f'  python view.py --workdir={workdir}'
          '                        # drive it in the browser']


def _summary_lines(workdir: pathlib.Path, row: dict[str, Any],
                   seconds: float, first_step: int) -> list[str]:
  """What to tell the user when training ends."""
  return [f'Trained steps {first_step + 1}-{row["step"]} in '
          f'{seconds / 60:.1f} min: train PSNR {row["psnr"]:.2f} dB'
          + (f', val PSNR {row["val_psnr"]:.2f} dB' if 'val_psnr' in row
             else '') + '.'] + _next_lines(workdir)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh=None, step: Optional[int] = None,
                       allow: tuple[str, ...] = ()) -> dict[str, float]:
  """Trains (resuming from the latest checkpoint) and evaluates on val.

  Nothing is written until the config is valid and, on a resume, the saved
  config and data facts match the current ones.

  Args:
    config: the experiment config.
    workdir: folder for config.json, checkpoints/, TensorBoard events,
      metrics.jsonl and previews/.
    mesh: the device mesh (default: every device of every process). A run
      may resume on another mesh and repeats the same steps.
    step: resume from this checkpoint instead of the newest intact one
      (newer ones are moved aside, not deleted).
    allow: config keys that may differ from the checkpoint's besides
      `config_lib.SAFE_ON_RESUME` (e.g. 'train.lr' after a divergence).

  Returns:
    The last logged metrics row.
  """
  config_lib.validate(config)
  is_main = jax.process_index() == 0
  workdir = pathlib.Path(workdir).expanduser()
  workdir_lib.check(workdir)
  config_json = _config_dict(config)
  # The config first: a refused resume costs no data loading.
  resume = _choose_checkpoint(workdir, step)
  _check_resume(workdir, resume, config_json, allow=allow)
  exp = experiment.setup(config, mesh)
  facts = exp.facts
  _check_resume(workdir, resume, config_json, facts, allow)
  if config.eval.latent_frame >= facts['num_train_frames']:
    raise config_lib.ConfigError(
        f'config.eval.latent_frame = {config.eval.latent_frame}: expected a '
        f'training frame index below {facts["num_train_frames"]}.')
  for name, split in exp.splits.items():
    logging.info('%s: %d frames of %dx%d, %d expression values (%s)', name,
                 split.num_frames, split.width, split.height, split.expr_dim,
                 split.path)
  lock = workdir_lib.Lock(workdir)
  if is_main:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
      note = lock.acquire()
      if note:
        _note(note)
      workdir_lib.mark(workdir)
    except OSError as e:
      lock.release()
      raise _write_error(workdir, e) from None
  try:
    return _train(config, workdir, exp, resume, config_json, is_main)
  finally:
    lock.release()


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path,
           exp: experiment.Experiment, resume: _Resume,
           config_json: dict[str, Any], is_main: bool) -> dict[str, float]:
  """The training loop of `train_and_evaluate`, once the workdir is ours."""
  facts = exp.facts
  mode = config.parallel.mode
  mesh, model, tx = exp.mesh, exp.model, exp.tx
  schedule = train_state.learning_rate_schedule(config)
  # Checkpoints hold the replicated global state (the shard_map layout), so
  # runs can resume in either mode and on any number of devices.
  ckpt = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  try:
    state = _restore(ckpt, resume, exp.initial_state())
    if is_main:
      # Only now: a refused or failed resume leaves the old one in place.
      (workdir / 'config.json').write_text(json.dumps(config_json, indent=2))
  except OSError as e:
    ckpt.close()
    raise _write_error(workdir / 'config.json', e) from None
  except BaseException:
    ckpt.close()
    raise
  start = int(parallel.to_host(state.step))

  train = exp.train
  if mode == 'pmap':
    state = parallel.stack_local(parallel.to_host(state))
    train_data = parallel.stack_local(
        experiment.device_data(train, config.data.bbox_weight))
  else:
    train_data = parallel.replicate(
        experiment.device_data(train, config.data.bbox_weight), mesh)
  # The devices hold the training frames now; on an accelerator this returns
  # the host copy (4.6 GB for a 5,500-frame 512x512 subject).
  del train, exp.splits['train']
  step_fn = make_train_step(config, model, tx, mesh)
  evaluator = _Evaluator(
      config, renderer.Renderer.create(
          model, _host(state.params, mode), mesh, config.render.chunk,
          None if state.occupancy is None else _host(state.occupancy, mode),
          config.render.occupancy_threshold),
      exp.splits.get('val'), workdir)

  writer = summary.EventWriter(workdir) if is_main else None
  metrics_log = summary.MetricsLog(workdir / 'metrics.jsonl')
  if is_main:
    # Rows logged after the checkpoint we resume from were lost with the
    # crash; they are logged again below.
    metrics_log.drop_after(start)
  progress = summary.Progress(config.train.max_steps)
  max_seconds = config.train.max_seconds
  last_row: dict[str, float] = {}
  last_saved = start or None
  timer_step, timer = start, None
  trained_seconds = 0.0
  try:
    in_flight = None
    for step in range(start + 1, config.train.max_steps + 1):
      state, stats = step_fn(state, train_data)
      # At most two steps in flight: enough to hide dispatch, and an
      # unbounded queue of collective programs can stall XLA's CPU runtime.
      if in_flight is not None:
        jax.block_until_ready(in_flight)
      in_flight = stats
      if timer is None:
        # The first step includes compilation: time from its end.
        jax.block_until_ready(stats)
        timer_step, timer = step, time.perf_counter()
      out_of_time = bool(max_seconds) and _out_of_time(
          trained_seconds + time.perf_counter() - timer, max_seconds, step,
          config.train.log_every)
      last = step == config.train.max_steps or out_of_time
      every = lambda n: step % n == 0 or last
      log_now = every(config.train.log_every)
      save_now = every(config.train.checkpoint_every)
      eval_now = every(config.train.eval_every)
      if not (log_now or save_now or eval_now):
        continue
      stats = {k: float(v) for k, v in _host(stats, mode).items()}
      if not math.isfinite(stats['loss']):
        raise TrainingError(
            f'The loss became {stats["loss"]} at step {step}; nothing of it '
            f'was saved. {_kept(last_saved, ckpt.directory)}'
            f'{_lower_lr_hint(workdir, last_saved)}')
      elapsed = time.perf_counter() - timer
      trained_seconds += elapsed
      steps_per_sec = (step - timer_step) / max(elapsed, 1e-9)
      # The update of step s (1-based) used the rate of schedule(s - 1).
      row = {'step': step, 'lr': float(schedule(step - 1)),
             'rays_per_sec': steps_per_sec * config.train.batch_rays,
             'steps_per_sec': steps_per_sec, **stats}
      # The loss above was computed before this step's update: the updated
      # state itself must be finite to be evaluated or become a checkpoint.
      if (save_now or eval_now) and not bool(
          _healthy(state.params, state.opt_state)):
        raise TrainingError(
            f'The parameters became non-finite or diverged (beyond '
            f'{DIVERGED_PARAMETER:g}) at step {step}; nothing of it was '
            f'saved. {_kept(last_saved, ckpt.directory)}'
            f'{_lower_lr_hint(workdir, last_saved)}')
      if eval_now:
        local = parallel.unstack if mode == 'pmap' else (lambda t: t)
        row.update(evaluator(local(state.params), step, writer, is_main,
                             local(state.occupancy)))
      # The row goes out before the checkpoint: a kill between the two
      # resumes from the previous checkpoint and drops the row, instead of
      # resuming past a step whose row was never written.
      if is_main:
        try:
          metrics_log.write(row)
        except OSError as e:
          raise _write_error(metrics_log.path, e, last_saved) from None
        writer.scalars(step, {k: v for k, v in row.items() if k != 'step'})
        writer.flush()
        progress.update(step, row['loss'], row['psnr'], row['rays_per_sec'],
                        steps_per_sec)
      if save_now:
        saved_state = (parallel.replicate(_host(state, mode), mesh)
                       if mode == 'pmap' else state)
        try:
          ckpt.save(step, saved_state, config_json, facts)
        except Exception as e:  # pylint: disable=broad-except
          # Disk full, read-only, quota: the previous checkpoint is intact.
          raise _write_error(ckpt.step_dir(step), e, last_saved) from e
        last_saved = step
      last_row = row
      # Evaluation and saving are not training time.
      timer_step, timer = step, time.perf_counter()
      if out_of_time:
        logging.info('train.max_seconds = %s reached at step %d.',
                     max_seconds, step)
        break
  finally:
    progress.close()
    ckpt.close()
    if writer is not None:
      writer.close()
  if is_main and last_row:
    print('\n'.join(_summary_lines(workdir, last_row, trained_seconds,
                                   start)), flush=True)
  elif is_main:
    # Running the finished command again: say so rather than nothing.
    print(f'{workdir}: already trained to step {start} (train.max_steps = '
          f'{config.train.max_steps}); nothing to do. Raise '
          '--config.train.max_steps to train on.\n' +
          '\n'.join(_next_lines(workdir)), flush=True)
  return last_row


def main(config: ml_collections.ConfigDict, workdir: str,
         step: Optional[int] = None, allow: tuple[str, ...] = ()
         ) -> Optional[dict]:
  """`train.py`'s body (errors for the user are handled by the caller)."""
  return train_and_evaluate(config, workdir, step=step, allow=allow)
