"""Training: the train state, the data-parallel step, and the training loop.

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
import chex
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from nerface_jax import checkpoint
from nerface_jax import data
from nerface_jax import losses
from nerface_jax import models
from nerface_jax import parallel
from nerface_jax import render_lib
from nerface_jax import sampler
from nerface_jax import summary


@struct.dataclass
class TrainState:
  """Everything a step changes (and a checkpoint holds).

  Attributes:
    step: int32 [] steps taken.
    params: model parameters (the gamma table included).
    opt_state: optax state.
    rng: uint32 [2] base key; a step's randomness is fold_in(rng, step).
  """
  step: chex.Array
  params: Any
  opt_state: Any
  rng: chex.Array


class TrainingError(RuntimeError):
  """Training cannot go on; the message says why and what was kept."""


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """lr * decay_rate ** (step / decay_steps), the original's decay."""
  return optax.exponential_decay(
      config.train.lr, transition_steps=config.train.lr_decay_steps,
      decay_rate=config.train.lr_decay_rate)


def make_optimizer(config: ml_collections.ConfigDict):
  return optax.adam(learning_rate_schedule(config))


def create_train_state(config: ml_collections.ConfigDict,
                       model: models.NerfaceModel, expr_dim: int,
                       tx: optax.GradientTransformation) -> TrainState:
  """A fresh state from `train.seed` (host-side, not yet placed)."""
  init_key, train_key = jax.random.split(jax.random.PRNGKey(config.train.seed))
  params = models.init_params(model, init_key, expr_dim)
  return TrainState(step=jnp.int32(0), params=params,
                    opt_state=tx.init(params), rng=train_key)


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
  """compute_losses' keyword arguments of the gamma regularisation."""
  t = config.train
  if not 0.0 <= t.latent_dropout < 1.0:
    raise ValueError(
        f'train.latent_dropout must be in [0, 1), got {t.latent_dropout}.')
  if t.latent_noise < 0.0:
    raise ValueError(f'train.latent_noise must be >= 0, got {t.latent_noise}.')
  if t.latent_prior not in losses.PRIORS:
    raise ValueError(f'train.latent_prior must be one of {losses.PRIORS}, got '
                     f'{t.latent_prior!r}.')
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

  def body(state: TrainState, device_data: sampler.DeviceData):
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


def load_data(config: ml_collections.ConfigDict) -> dict[str, data.Dataset]:
  """Loads train/val/test of the configured dataset (or the built-in person)."""
  root = data.dataset_dir(config.data)
  splits = data.load_splits(
      root, downscale=config.data.downscale,
      background=config.data.background == 'image')
  splits['train'] = splits['train'].prefix(config.data.train_fraction)
  expr_dim = config.model.expr_dim
  if expr_dim is not None and expr_dim != splits['train'].expr_dim:
    raise data.DatasetError(
        f'{root}: expressions have {splits["train"].expr_dim} values but '
        f'config.model.expr_dim is {expr_dim}.')
  return splits


def data_facts(train: data.Dataset) -> dict[str, Any]:
  """What a checkpoint must know of its training data to be rebuilt."""
  return {'data_dir': str(train.path), 'num_train_frames': train.num_frames,
          'expr_dim': train.expr_dim, 'height': train.height,
          'width': train.width,
          'intrinsics': [float(v) for v in train.intrinsics],
          **models.expression_stats(train.expressions)}


def device_data(dataset: data.Dataset, bbox_weight: float):
  """The sampling tables of a training split (host numpy)."""
  return sampler.prepare(dataset.images, dataset.c2w, dataset.expressions,
                         dataset.bboxes, dataset.background,
                         dataset.intrinsics, bbox_weight)


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _restore(ckpt: checkpoint.Checkpoints, target: TrainState,
             config: ml_collections.ConfigDict) -> TrainState:
  """Restores the latest checkpoint, explaining a config mismatch."""
  try:
    return ckpt.restore(target)
  except (ValueError, KeyError) as e:
    saved = _flatten(ckpt.restore_config())
    current = _flatten(_config_dict(config))
    differing = sorted(k for k in saved.keys() | current.keys()
                       if saved.get(k) != current.get(k))
    raise TrainingError(
        f'{ckpt.directory}: the latest checkpoint (step {ckpt.latest_step()}) '
        f'does not fit this config ({e}). Keys that differ from the saved '
        f'config: {", ".join(differing) or "none"}. Use another --workdir or '
        'the saved settings.') from None


class _Evaluator:
  """Renders val frames during training: PSNR, preview PNGs, TB images."""

  def __init__(self, config, model, mesh, val: Optional[data.Dataset],
               workdir: pathlib.Path):
    self.config = config
    self.mesh = mesh
    self.val = val
    self.previews = workdir / 'previews'
    self.render_chunk = render_lib.make_render_chunk(model, mesh)
    count = min(config.eval.preview_frames, val.num_frames) if val else 0
    # Spread over the split so previews show different poses.
    self.frames = (np.linspace(0, val.num_frames - 1, count).round().astype(
        int).tolist() if count else [])

  def __call__(self, params, step: int, writer, is_main: bool) -> dict:
    if not self.frames:
      return {}
    choice = self.config.eval.latent
    if choice == 'optimize':
      # Fitting codes per frame is a render-time job; training previews use
      # the mean code.
      choice = 'mean'
    host_params = parallel.to_host(params)
    latent = render_lib.eval_latent(host_params, choice,
                                    self.config.eval.latent_frame,
                                    self.config.model.latent_dim)
    params = parallel.replicate(host_params, self.mesh)
    psnrs = []
    for index in self.frames:
      inputs = render_lib.frame_inputs(self.val, index, latent)
      out = render_lib.render_frame(
          self.render_chunk, params, inputs, self.val.height, self.val.width,
          self.config.render.chunk, self.mesh)
      truth = self.val.images[index].astype(np.float32) / 255.0
      psnrs.append(float(losses.psnr(np.mean((out['rgb'] - truth) ** 2))))
      if is_main:
        panel = np.concatenate([
            render_lib.to_uint8(out['rgb']), self.val.images[index],
            render_lib.depth_image(out['depth'], self.config.data.near,
                                   self.config.data.far)], axis=1)
        name = pathlib.PurePosixPath(self.val.file_paths[index]).name
        self.previews.mkdir(parents=True, exist_ok=True)
        Image.fromarray(panel).save(
            self.previews / f'step_{step:07d}_{name}.png')
        writer.image(step, f'val/{name}', panel)
    return {'val_psnr': float(np.mean(psnrs))}


def _host(tree, mode: str):
  return parallel.to_host(parallel.unstack(tree) if mode == 'pmap' else tree)


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains (resuming from the latest checkpoint) and evaluates on val.

  Args:
    config: the experiment config.
    workdir: folder for config.json, checkpoints/, TensorBoard events,
      metrics.jsonl and previews/.

  Returns:
    The last logged metrics row.
  """
  is_main = jax.process_index() == 0
  workdir = pathlib.Path(workdir).expanduser()
  workdir.mkdir(parents=True, exist_ok=True)
  config_json = _config_dict(config)
  if is_main:
    (workdir / 'config.json').write_text(json.dumps(config_json, indent=2))

  splits = load_data(config)
  train = splits['train']
  meta = data_facts(train)
  for name, split in splits.items():
    logging.info('%s: %d frames of %dx%d, %d expression values (%s)', name,
                 split.num_frames, split.width, split.height, split.expr_dim,
                 split.path)

  mode = config.parallel.mode
  mesh = parallel.make_mesh()
  model = models.construct_model(config, train.num_frames, train.expr_dim,
                                 meta)
  tx = make_optimizer(config)
  schedule = learning_rate_schedule(config)
  # Checkpoints hold the replicated global state (the shard_map layout), so
  # runs can resume in either mode and on any number of devices.
  state = parallel.replicate(
      create_train_state(config, model, train.expr_dim, tx), mesh)
  ckpt = checkpoint.Checkpoints(workdir, keep=config.train.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state = _restore(ckpt, state, config)
    logging.info('Resumed from %s at step %d.', ckpt.directory,
                 ckpt.latest_step())
  start = int(parallel.to_host(state.step))

  if mode == 'pmap':
    state = parallel.stack_local(parallel.to_host(state))
    train_data = parallel.stack_local(
        device_data(train, config.data.bbox_weight))
  else:
    train_data = parallel.replicate(
        device_data(train, config.data.bbox_weight), mesh)
  # The devices hold the training frames now; on an accelerator this returns
  # the host copy (4.6 GB for a 5,500-frame 512x512 subject).
  del train, splits['train']
  step_fn = make_train_step(config, model, tx, mesh)
  evaluator = _Evaluator(config, model, mesh, splits.get('val'), workdir)

  writer = summary.EventWriter(workdir) if is_main else None
  metrics_log = summary.MetricsLog(workdir / 'metrics.jsonl')
  progress = summary.Progress(config.train.max_steps)
  every = lambda n, step: step % n == 0 or step == config.train.max_steps
  last_row: dict[str, float] = {}
  last_saved = ckpt.latest_step()
  timer_step, timer = start, None
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
      log_now = every(config.train.log_every, step)
      save_now = every(config.train.checkpoint_every, step)
      eval_now = every(config.train.eval_every, step)
      if not (log_now or save_now or eval_now):
        continue
      stats = {k: float(v) for k, v in _host(stats, mode).items()}
      if not math.isfinite(stats['loss']):
        raise TrainingError(
            f'The loss became {stats["loss"]} at step {step}. Nothing after '
            f'the last good checkpoint was saved (step {last_saved} in '
            f'{ckpt.directory}). Try a lower --config.train.lr.')
      steps_per_sec = (step - timer_step) / max(
          time.perf_counter() - timer, 1e-9)
      # The update of step s (1-based) used the rate of schedule(s - 1).
      row = {'step': step, 'lr': float(schedule(step - 1)),
             'rays_per_sec': steps_per_sec * config.train.batch_rays,
             'steps_per_sec': steps_per_sec, **stats}
      if eval_now:
        row.update(evaluator(
            parallel.unstack(state.params) if mode == 'pmap' else
            state.params, step, writer, is_main))
      if save_now:
        ckpt.save(step, parallel.replicate(_host(state, mode), mesh)
                  if mode == 'pmap' else state, config_json, meta)
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
  finally:
    progress.close()
    ckpt.close()
    if writer is not None:
      writer.close()
  return last_row


def main(config: ml_collections.ConfigDict, workdir: str) -> Optional[dict]:
  """`train.py`'s body: clear one-line errors for bad data or divergence."""
  try:
    return train_and_evaluate(config, workdir)
  except (data.DatasetError, TrainingError) as e:
    logging.error('%s', e)
    sys.exit(f'Error: {e}')

