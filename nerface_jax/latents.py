"""Which latent code (gamma) a rendered frame gets, and test-time fitting.

Training frames have their own row of the gamma table. Every other frame
(val, test, a reenactment driver, training frames past `data.train_fraction`)
gets a code by `eval.latent`: 'mean' (the mean training code), 'fixed' (one
training frame's code, the original's choice), 'zero', or 'optimize' (a code
fitted to that frame's pixels with the networks frozen).
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from nerface_jax import data
from nerface_jax import losses
from nerface_jax import models
from nerface_jax import occupancy
from nerface_jax import sampler

# The codes of one shared choice; 'optimize' is per frame.
SHARED = ('fixed', 'zero', 'mean')
# What metrics.json reports for frames that used their own trained codes.
TRAINED = 'trained'


def gamma(params: Any) -> Optional[np.ndarray]:
  """float32 [F, L] the trained codes, or None for a model without any."""
  if 'latent' not in params:
    return None
  return np.asarray(params['latent']['gamma'], np.float32)


def shared_choice(choice: str) -> str:
  """The shared code that stands in for `choice` where codes cannot be
  fitted per frame (training previews, reenactment): 'optimize' -> 'mean'."""
  return 'mean' if choice == 'optimize' else choice


def shared_code(params: Any, choice: str, latent_frame: int = 0,
                latent_dim: int = 0) -> np.ndarray:
  """The one code used for frames without a trained code.

  Args:
    params: model parameters ({'latent': {'gamma': [F, L]}} when the model
      has codes).
    choice: 'fixed' (row `latent_frame`, the original's choice), 'zero' or
      'mean'.
    latent_frame: the training frame used by 'fixed'.
    latent_dim: L, for models without codes (returns zeros [L]).

  Returns:
    float32 [L].
  """
  if choice not in SHARED:
    raise ValueError(f'a shared latent code is one of {SHARED}, got '
                     f'{choice!r}.')
  table = gamma(params)
  if table is None:
    return np.zeros((latent_dim,), np.float32)
  if choice == 'zero':
    return np.zeros(table.shape[1:], np.float32)
  if choice == 'mean':
    return table.mean(axis=0)
  if not 0 <= latent_frame < table.shape[0]:
    raise ValueError(f'eval.latent_frame = {latent_frame} but there are '
                     f'{table.shape[0]} training frames.')
  return table[latent_frame]


def make_latent_fitter(config: ml_collections.ConfigDict,
                       model: models.NerfaceModel, params: Any,
                       grid: Optional[occupancy.Grid] = None
                       ) -> Callable[..., Any]:
  """A jitted fit of gamma for a batch of frames, networks frozen.

  Every step draws `eval.optimize_rays` bbox-weighted rays from each frame
  and takes an Adam step on the codes only; frames are independent, so one
  batch fits K codes at once. The rays are sampled as in training: guided by
  the avatar's occupancy grid when it has one.

  Returns:
    fit(device_data, frames int32 [K], init float32 [K, L], key) ->
    (codes float32 [K, L], losses float32 [steps]).
  """
  rays = config.eval.optimize_rays
  if grid is not None:  # Host arrays would be indexed by tracers.
    grid = jax.tree_util.tree_map(jnp.asarray, grid)
  tx = optax.adam(config.eval.optimize_lr)
  reg = config.train.latent_reg
  prior = config.train.latent_prior

  def fit(device_data, frames, init, key):
    num = frames.shape[0]
    local = jnp.repeat(jnp.arange(num), rays)
    frame = frames[local]

    def loss_fn(codes, batch, model_key):
      batch = batch.replace(latent=codes[local])
      coarse, fine = model.apply({'params': params}, batch, model_key, grid)
      mse = sum(losses.level_mses(coarse, fine, batch.rgb).values())
      return mse + reg * losses.latent_prior(codes, prior)

    def step(carry, step_key):
      codes, opt_state = carry
      pixel_key, model_key = jax.random.split(step_key)
      pixels = sampler.pixels_in_frames(pixel_key, device_data, frame)
      batch = sampler.gather_batch(device_data, frame, pixels)
      loss, grad = jax.value_and_grad(loss_fn)(codes, batch, model_key)
      updates, opt_state = tx.update(grad, opt_state, codes)
      return (optax.apply_updates(codes, updates), opt_state), loss

    keys = jax.random.split(key, config.eval.optimize_steps)
    (codes, _), trace = jax.lax.scan(step, (init, tx.init(init)), keys)
    return codes, trace

  return jax.jit(fit)


def optimize_latents(config: ml_collections.ConfigDict,
                     model: models.NerfaceModel, params: Any,
                     dataset: data.Dataset,
                     frames: Optional[np.ndarray] = None,
                     progress: Optional[Callable[[int, int], None]] = None,
                     grid: Optional[occupancy.Grid] = None) -> np.ndarray:
  """Fits gamma to frames of `dataset` (to their pixels), networks frozen.

  Args:
    config: reads eval.optimize_*, train.latent_reg, train.latent_prior,
      data.bbox_weight, train.seed.
    model: the NerfaceModel.
    params: host parameters.
    dataset: the frames' images, cameras and expressions.
    frames: int [K] indices to fit (default: all).
    progress: called with (frames done, total).
    grid: the avatar's occupancy grid (host arrays), or None.

  Returns:
    float32 [K, L] codes, fitted starting from the mean training code.
  """
  frames = (np.arange(dataset.num_frames) if frames is None else
            np.asarray(frames, np.int64))
  if gamma(params) is None or not len(frames):
    dim = config.model.latent_dim if gamma(params) is None else gamma(
        params).shape[1]
    return np.zeros((len(frames), dim), np.float32)
  device_data = jax.device_put(sampler.from_dataset(dataset,
                                                     config.data.bbox_weight))
  fit = make_latent_fitter(config, model, params, grid)
  batch = config.eval.optimize_batch
  start_code = shared_code(params, 'mean')
  codes = []
  for first in range(0, len(frames), batch):
    chosen = frames[first:first + batch]
    # Pad the last batch to the same size: one compilation for all.
    padded = np.concatenate(
        [chosen, np.full(batch - len(chosen), chosen[-1])]).astype(np.int32)
    init = np.tile(start_code, (batch, 1))
    # Keyed by the batch's first frame: a split fits the same way every
    # time.
    key = jax.random.fold_in(jax.random.PRNGKey(config.train.seed),
                             int(chosen[0]))
    fitted, _ = fit(device_data, padded, init, key)
    codes.append(np.asarray(fitted)[:len(chosen)])
    if progress:
      progress(first + len(chosen), len(frames))
  return np.concatenate(codes)


def split_codes(config: ml_collections.ConfigDict, model: models.NerfaceModel,
                params: Any, dataset: data.Dataset, choice: str,
                trained_rows: int = 0,
                progress: Optional[Callable[[int, int], None]] = None,
                grid: Optional[occupancy.Grid] = None
                ) -> tuple[np.ndarray, str]:
  """One code per frame of `dataset`.

  Args:
    config: the avatar's config.
    model: the NerfaceModel.
    params: host parameters.
    dataset: the frames to render.
    choice: 'fixed', 'zero', 'mean' or 'optimize', for frames without a
      trained code.
    trained_rows: how many leading frames of `dataset` are the avatar's own
      training frames (their gamma rows); 0 for any other data. With
      `data.train_fraction < 1` the training split has more frames than
      the table has rows, and the rest are treated as unseen.
    progress: for 'optimize', called with (frames done, total).
    grid: for 'optimize', the avatar's occupancy grid (host), or None.

  Returns:
    (float32 [F, L] codes, what was used: 'trained', `choice`, or
    'trained+<choice>' when only some frames had trained codes).
  """
  table = gamma(params)
  num = dataset.num_frames
  own = 0 if table is None else min(trained_rows, num, table.shape[0])
  rest = np.arange(own, num)
  if choice == 'optimize':
    others = optimize_latents(config, model, params, dataset, rest, progress,
                              grid)
  else:
    code = shared_code(params, choice, config.eval.latent_frame,
                       config.model.latent_dim)
    others = np.tile(code, (len(rest), 1))
  parts = ([table[:own]] if own else []) + [others]
  codes = np.concatenate(parts).astype(np.float32)
  if not len(rest):
    return codes, TRAINED
  return codes, (f'{TRAINED}+{choice}' if own else choice)
