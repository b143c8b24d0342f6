"""Tests of the data-parallel training step and the training loop."""

import pathlib
import sys

import chex
import jax
from jax.sharding import Mesh
import numpy as np
import optax
import pytest

from nerface_jax import config_lib
from nerface_jax import models
from nerface_jax import parallel
from nerface_jax import sampler
from nerface_jax import train_lib
from nerface_jax import train_state

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'configs'))
import person  # pylint: disable=g-import-not-at-top,wrong-import-position

F, H, W, E = 4, 8, 8, 6


def _tiny_config(**overrides):
  config = person.get_config('tiny')
  for key, value in overrides.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def _host_data():
  rng = np.random.default_rng(0)
  c2w = np.tile(np.eye(4, dtype=np.float32), (F, 1, 1))
  c2w[:, 2, 3] = 0.5
  return sampler.prepare(
      images=rng.integers(0, 256, (F, H, W, 3), dtype=np.uint8), c2w=c2w,
      expressions=rng.normal(size=(F, E)).astype(np.float32),
      bboxes=np.tile(np.float32([0.2, 0.8, 0.2, 0.8]), (F, 1)),
      background=rng.integers(0, 256, (H, W, 3), dtype=np.uint8),
      intrinsics=np.float32([-10, 10, 0.5, 0.5]), bbox_weight=0.9)


def _run_steps(config, num_steps, tx=None, devices=None):
  """Runs `num_steps` mapped steps; returns the host state and the stats."""
  mesh = (parallel.make_mesh() if devices is None else
          Mesh(np.asarray(jax.devices()[:devices]), (parallel.AXIS,)))
  # Comparisons across device counts mean nothing on fewer devices.
  assert mesh.devices.size == (devices or jax.device_count()) > 0
  model = models.construct_model(config, F, E)
  tx = tx or train_state.make_optimizer(config)
  state = train_state.create_train_state(config, model, E, tx)
  mode = config.parallel.mode
  place = parallel.stack_local if mode == 'pmap' else (
      lambda t: parallel.replicate(t, mesh))
  state, data = place(state), place(_host_data())
  step = train_lib.make_train_step(config, model, tx, mesh)
  all_stats = []
  for _ in range(num_steps):
    state, stats = step(state, data)
    all_stats.append(stats)
  host = lambda t: jax.device_get(parallel.unstack(t) if mode == 'pmap' else t)
  return host(state), [host(s) for s in all_stats]


def test_shard_map_and_pmap_give_the_same_parameters():
  """The two mappings of one body agree within 1e-5 after several steps.

  Plain SGD isolates the mapping: Adam's first steps are nearly
  lr * sign(g), so float rounding of near-zero gradients (the all-reduce
  order differs between the two programs) becomes lr-sized noise. With Adam
  the losses still agree within 1e-5.
  """
  steps = 3
  runs = {mode: _run_steps(_tiny_config(**{'parallel.mode': mode}), steps,
                           tx=optax.sgd(0.5))
          for mode in parallel.MODES}
  (a, stats_a), (b, stats_b) = runs['shard_map'], runs['pmap']
  assert int(a.step) == int(b.step) == steps
  chex.assert_trees_all_close(a.params, b.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(stats_a, stats_b, atol=1e-5, rtol=1e-5)
  # The steps really changed the parameters.
  first, _ = _run_steps(_tiny_config(), 1, tx=optax.sgd(0.5))
  assert not np.allclose(jax.tree.leaves(first.params)[0],
                         jax.tree.leaves(a.params)[0])
  _, adam_a = _run_steps(_tiny_config(**{'parallel.mode': 'shard_map'}), steps)
  _, adam_b = _run_steps(_tiny_config(**{'parallel.mode': 'pmap'}), steps)
  chex.assert_trees_all_close(adam_a, adam_b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('overrides', [
    {}, {'train.latent_dropout': 0.5, 'train.latent_noise': 0.1}])
def test_one_device_and_four_devices_give_the_same_parameters(overrides):
  """The global batch and its per-ray randomness (gamma dropout and noise
  included) do not depend on how many devices share it, so neither do the
  parameters."""
  config = _tiny_config(**overrides)
  one, stats_one = _run_steps(config, 3, tx=optax.sgd(0.5), devices=1)
  four, stats_four = _run_steps(config, 3, tx=optax.sgd(0.5), devices=4)
  chex.assert_trees_all_close(one.params, four.params, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(stats_one, stats_four, atol=1e-5, rtol=1e-5)


def test_step_is_the_gradient_of_the_global_batch():
  """A 4-device step equals one SGD step on the whole batch, computed by hand
  from the same (frame, pixel) draws and per-ray keys."""
  config = _tiny_config()
  model = models.construct_model(config, F, E)
  state = train_state.create_train_state(config, model, E, optax.sgd(0.5))
  data = _host_data()
  key = jax.random.fold_in(state.rng, 0)
  sample_key, model_key = jax.random.split(key)
  rays = config.train.batch_rays
  frame, pixels = sampler.sample_pixels(sample_key, data, rays)
  batch = sampler.gather_batch(data, frame, pixels)
  ray_keys = jax.random.split(model_key, rays)
  grad = jax.grad(lambda p: train_lib.compute_losses(
      p, model, batch, ray_keys, config.train.latent_reg)[0])(state.params)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, state.params, grad)
  got, _ = _run_steps(config, 1, tx=optax.sgd(0.5))
  chex.assert_trees_all_close(got.params, expected, atol=1e-5, rtol=1e-4)


def test_step_compiles_once():
  config = _tiny_config()
  mesh = parallel.make_mesh()
  model = models.construct_model(config, F, E)
  tx = train_state.make_optimizer(config)
  state = parallel.replicate(
      train_state.create_train_state(config, model, E, tx), mesh)
  data = parallel.replicate(_host_data(), mesh)
  traced = []
  original = train_lib.compute_losses

  def counting(*args, **kwargs):
    traced.append(1)
    return original(*args, **kwargs)

  train_lib.compute_losses = counting
  try:
    step = train_lib.make_train_step(config, model, tx, mesh)
    for _ in range(3):
      state, _ = step(state, data)
  finally:
    train_lib.compute_losses = original
  assert len(traced) == 1


def test_batch_must_divide_over_devices():
  config = _tiny_config(**{'train.batch_rays': 30})
  model = models.construct_model(config, F, E)
  with pytest.raises(ValueError, match='multiple of the number of devices'):
    train_lib.make_train_step(config, model, train_state.make_optimizer(config),
                              parallel.make_mesh())


def test_learning_rate_decays_like_the_original():
  config = person.get_config('paper')
  schedule = train_state.learning_rate_schedule(config)
  for step in (0, 1000, 250_000, 400_000):
    assert float(schedule(step)) == pytest.approx(
        5e-4 * 0.1 ** (step / 250_000), rel=1e-5)


def test_perturb_codes_drops_whole_codes_at_the_rate_and_adds_noise():
  rays, dim = 20_000, 4
  codes = np.full((rays, dim), 5.0, np.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), rays)
  out = np.asarray(train_lib.perturb_codes(codes, keys, 0.3, 0.2))
  dropped = np.all(out == 0.0, axis=1)
  # A code is dropped whole or kept whole (no element is 0 by chance).
  assert not np.any((out == 0.0) & ~dropped[:, None])
  sigma = np.sqrt(0.3 * 0.7 / rays)
  assert abs(dropped.mean() - 0.3) < 5 * sigma
  kept = out[~dropped] - 5.0
  assert abs(kept.mean()) < 0.01 and abs(kept.std() - 0.2) < 0.01
  # Nothing to do: the codes come back unchanged.
  chex.assert_trees_all_close(
      train_lib.perturb_codes(codes, keys, 0.0, 0.0), codes)


def test_perturb_codes_of_a_ray_depend_only_on_its_key():
  """Slices of the batch get the same draws as the whole: the property that
  keeps a data-parallel step independent of the device count."""
  rng = np.random.default_rng(0)
  codes = rng.normal(size=(64, 3)).astype(np.float32)
  keys = jax.random.split(jax.random.PRNGKey(1), 64)
  whole = train_lib.perturb_codes(codes, keys, 0.5, 0.1)
  part = train_lib.perturb_codes(codes[16:48], keys[16:48], 0.5, 0.1)
  chex.assert_trees_all_close(whole[16:48], part)
  # One key for the whole batch works too and still varies over rays.
  shared = np.asarray(train_lib.perturb_codes(codes, keys[0], 0.0, 0.1))
  assert np.unique(np.round(shared - codes, 6)).size > 64


def test_dropout_and_noise_change_the_loss_but_not_the_prior():
  config = _tiny_config()
  model = models.construct_model(config, F, E)
  state = train_state.create_train_state(config, model, E, optax.sgd(0.5))
  params = state.params
  params['latent']['gamma'] = jax.random.normal(
      jax.random.PRNGKey(3), params['latent']['gamma'].shape)
  data = _host_data()
  frame, pixels = sampler.sample_pixels(jax.random.PRNGKey(4), data, 32)
  batch = sampler.gather_batch(data, frame, pixels)
  keys = jax.random.split(jax.random.PRNGKey(5), 32)
  plain = train_lib.compute_losses(params, model, batch, keys, 0.1)[1]
  same = train_lib.compute_losses(params, model, batch, keys, 0.1,
                                  dropout=0.0, noise=0.0)[1]
  chex.assert_trees_all_close(plain, same)
  noisy = train_lib.compute_losses(params, model, batch, keys, 0.1,
                                   dropout=0.5, noise=0.5)[1]
  chex.assert_trees_all_close(noisy['latent_prior'], plain['latent_prior'])
  assert abs(float(noisy['mse_fine']) - float(plain['mse_fine'])) > 1e-6
  squared = train_lib.compute_losses(params, model, batch, keys, 0.1,
                                     prior='squared')[1]
  codes = np.asarray(params['latent']['gamma'])[np.asarray(frame)]
  chex.assert_trees_all_close(squared['latent_prior'],
                              np.mean(np.sum(codes ** 2, axis=1)), rtol=1e-5)


@pytest.mark.parametrize('key,value', [
    ('train.latent_dropout', 1.0), ('train.latent_dropout', -0.1),
    ('train.latent_noise', -1.0), ('train.latent_prior', 'l1')])
def test_bad_latent_options_are_refused_before_training(key, value, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=key.replace('.', r'\.')):
    train_lib.train_and_evaluate(_tiny_config(**{key: value}),
                                 str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()
