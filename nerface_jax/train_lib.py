"""Training: the data-parallel step and the training loop.

`make_train_step` builds ONE per-device body (draw this device's share of the
rays on the device, render, losses, gradients, `lax.pmean` over 'data',
optax update) and maps it over every device with `jax.shard_map` under
`jax.jit` or with `jax.pmap` (`parallel.mode`). The random stream of a step is
a function of (seed, step, device), never of host state, so a resumed run
repeats an uninterrupted one step for step.
"""

import json
import math
import pathlib
import sys
import time
from typing import Any, Optional

from absl import logging
import jax
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
from nerface_jax import parallel
from nerface_jax import renderer
from nerface_jax import sampler
from nerface_jax import summary
from nerface_jax import train_state

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
                   dropout: float = 0.0, noise: float = 0.0):
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
  coarse, fine = model.apply({'params': params}, batch, key)
  mse_coarse = losses.mse(coarse.rgb, batch.rgb)
  mse_fine = losses.mse(fine.rgb, batch.rgb)
  loss = mse_coarse + mse_fine
  stats = {'mse_coarse': mse_coarse, 'mse_fine': mse_fine}
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
                                latent_reg, **options)
    grads = jax.lax.pmean(grads, parallel.AXIS)
    stats = jax.lax.pmean(stats, parallel.AXIS)
    stats['psnr'] = losses.psnr(stats['mse_fine'])
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state), stats

  return parallel.map_step(body, config.parallel.mode, mesh)



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

  def __call__(self, params, step: int, writer, is_main: bool) -> dict:
    if not self.frames:
      return {}
    choice = self.config.eval.latent
    # Fitting codes per frame is a render-time job; training previews use
    # the mean code.
    host_params = parallel.to_host(params)
    code = latents.shared_code(
        host_params, 'mean' if choice == 'optimize' else choice,
        self.config.eval.latent_frame, self.config.model.latent_dim)
    codes = np.tile(code, (self.val.num_frames, 1))

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

    scores = evaluation.score_frames(self.render.with_params(host_params),
                                     self.val, codes, self.frames, preview)
    return {'val_psnr': scores['mean']['psnr']}


def _host(tree, mode: str):
  return parallel.to_host(parallel.unstack(tree) if mode == 'pmap' else tree)


@jax.jit
def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x))
                              for x in jax.tree.leaves(tree)]))


def _check_resume(workdir: pathlib.Path, config_json: dict[str, Any],
                  facts: Optional[dict[str, Any]] = None) -> Optional[int]:
  """Refuses a resume whose config or data differ from the checkpoint's.

  Args:
    workdir: the training workdir.
    config_json: the current config as a dict.
    facts: the current training data's facts; None checks the config only.

  Returns:
    The step that will be resumed, or None for a fresh run.

  Raises:
    TrainingError: naming every key that differs.
  """
  if not (workdir / checkpoint.SUBDIR).is_dir():
    return None
  with checkpoint.Checkpoints(workdir, read_only=True) as ckpt:
    step = ckpt.latest_step()
    if step is None:
      return None
    saved = config_lib.upgrade(ckpt.restore_config(step))
    conflicts = config_lib.resume_conflicts(saved, config_json)
    what = 'config'
    if not conflicts and facts is not None:
      conflicts = config_lib.meta_conflicts(ckpt.restore_meta(step), facts)
      what = 'training data'
  if conflicts:
    raise TrainingError(
        f'{workdir}: the checkpoint at step {step} was trained with another '
        f'{what} ({"; ".join(conflicts)}). Use another --workdir, or the '
        'saved settings to resume.')
  return step


def _summary_lines(workdir: pathlib.Path, row: dict[str, Any],
                   seconds: float, first_step: int) -> list[str]:
  """What to tell the user when training ends."""
  lines = [f'Trained steps {first_step + 1}-{row["step"]} in '
           f'{seconds / 60:.1f} min: train PSNR {row["psnr"]:.2f} dB'
           + (f', val PSNR {row["val_psnr"]:.2f} dB' if 'val_psnr' in row
              else '') + '.',
           f'Checkpoints: {workdir / checkpoint.SUBDIR}; logs: '
           f'tensorboard --logdir {workdir}',
           'Next:',
           f'  python render.py --workdir={workdir} --out={workdir}/test'
           '            # score the test split',
           f'  python render.py --workdir={workdir} --out={workdir}/orbit '
           '--mode=orbit  # novel views']
  return lines


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       mesh=None) -> dict[str, float]:
  """Trains (resuming from the latest checkpoint) and evaluates on val.

  Nothing is written until the config is valid and, on a resume, the saved
  config and data facts match the current ones.

  Args:
    config: the experiment config.
    workdir: folder for config.json, checkpoints/, TensorBoard events,
      metrics.jsonl and previews/.
    mesh: the device mesh (default: every device of every process). A run
      may resume on another mesh and repeats the same steps.

  Returns:
    The last logged metrics row.
  """
  config_lib.validate(config)
  is_main = jax.process_index() == 0
  workdir = pathlib.Path(workdir).expanduser()
  if workdir.exists() and not workdir.is_dir():
    raise TrainingError(f'{workdir}: --workdir exists and is not a folder.')
  config_json = _config_dict(config)
  # The config first: a refused resume costs no data loading.
  _check_resume(workdir, config_json)
  exp = experiment.setup(config, mesh)
  facts = exp.facts
  resume_step = _check_resume(workdir, config_json, facts)
  for name, split in exp.splits.items():
    logging.info('%s: %d frames of %dx%d, %d expression values (%s)', name,
                 split.num_frames, split.width, split.height, split.expr_dim,
                 split.path)
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    (workdir / 'config.json').write_text(json.dumps(config_json, indent=2))

  mode = config.parallel.mode
  mesh, model, tx = exp.mesh, exp.model, exp.tx
  schedule = train_state.learning_rate_schedule(config)
  # Checkpoints hold the replicated global state (the shard_map layout), so
  # runs can resume in either mode and on any number of devices.
  state = exp.initial_state()
  ckpt = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  if resume_step is not None:
    try:
      state = ckpt.restore(state, resume_step)
    except (ValueError, KeyError) as e:
      ckpt.close()
      raise TrainingError(
          f'{ckpt.directory}: the checkpoint at step {resume_step} does not '
          f'fit this model ({e}).') from None
    logging.info('Resumed from %s at step %d.', ckpt.directory, resume_step)
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
      config, renderer.Renderer.create(model, _host(state.params, mode), mesh,
                                       config.render.chunk),
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
  last_saved = resume_step
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
      out_of_time = bool(max_seconds) and (
          trained_seconds + time.perf_counter() - timer >= max_seconds)
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
            f'The loss became {stats["loss"]} at step {step}. Nothing after '
            f'the last good checkpoint was saved (step {last_saved} in '
            f'{ckpt.directory}). Try a lower --config.train.lr.')
      elapsed = time.perf_counter() - timer
      trained_seconds += elapsed
      steps_per_sec = (step - timer_step) / max(elapsed, 1e-9)
      # The update of step s (1-based) used the rate of schedule(s - 1).
      row = {'step': step, 'lr': float(schedule(step - 1)),
             'rays_per_sec': steps_per_sec * config.train.batch_rays,
             'steps_per_sec': steps_per_sec, **stats}
      if eval_now:
        row.update(evaluator(
            parallel.unstack(state.params) if mode == 'pmap' else
            state.params, step, writer, is_main))
      if save_now:
        saved_state = (parallel.replicate(_host(state, mode), mesh)
                       if mode == 'pmap' else state)
        # The loss above was computed before this step's update: the
        # updated state itself must be finite to become a checkpoint.
        if not bool(_all_finite((saved_state.params, saved_state.opt_state))):
          raise TrainingError(
              f'The parameters became non-finite at step {step}; it was not '
              f'saved. The last good checkpoint is step {last_saved} in '
              f'{ckpt.directory}. Try a lower --config.train.lr.')
        ckpt.save(step, saved_state, config_json, facts)
        last_saved = step
      if is_main:
        metrics_log.write(row)
        writer.scalars(step, {k: v for k, v in row.items() if k != 'step'})
        writer.flush()
        progress.update(step, row['loss'], row['psnr'], row['rays_per_sec'],
                        steps_per_sec)
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
  return last_row


def main(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict]:
  """`train.py`'s body: clear one-line errors for bad config, data or
  divergence."""
  try:
    return train_and_evaluate(config, workdir)
  except (config_lib.ConfigError, data.DatasetError, errors.UserError) as e:
    logging.error('%s', e)
    sys.exit(f'Error: {e}')
