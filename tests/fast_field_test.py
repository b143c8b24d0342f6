"""The hash field, its optimiser groups, the occupancy grid in training and
rendering with culling and early termination."""

import functools
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import HASH_OVERRIDES
from conftest import tiny_config
from nerface_jax import avatar as avatar_lib
from nerface_jax import data as data_lib
from nerface_jax import latents
from nerface_jax import models
from nerface_jax import occupancy
from nerface_jax import render_modes
from nerface_jax import renderer
from nerface_jax import rendering
from nerface_jax import train_lib
from nerface_jax import train_state

NUM_FRAMES, EXPR_DIM = 5, 6
BOX = ((-0.2, -0.2, -0.2), (0.2, 0.2, 0.2))


def _hash_model(**overrides):
  config = tiny_config(**{**HASH_OVERRIDES, **overrides})
  return config, models.construct_model(config, NUM_FRAMES, EXPR_DIM, box=BOX)


def _points(num, seed=0):
  """Random points [num, 3] inside and outside BOX."""
  return jax.random.uniform(jax.random.PRNGKey(seed), (num, 3), jnp.float32,
                            -0.4, 0.4)


def test_hash_field_is_empty_outside_its_box_and_follows_the_expression():
  _, model = _hash_model()
  params = models.init_params(model, jax.random.PRNGKey(0), EXPR_DIM)
  assert 'tables' in params['coarse'] and 'tables' in params['fine']
  # Random tables and weights, so that the untrained field has density.
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [
      jax.random.normal(jax.random.PRNGKey(n), x.shape)
      for n, x in enumerate(leaves)])
  points = _points(64 * 8)
  inside = np.all(np.abs(np.asarray(points)) <= 0.2, axis=-1)
  assert 0 < inside.sum() < inside.size
  density = lambda e: np.asarray(model.apply(
      {'params': params}, points, jnp.full((EXPR_DIM,), e), jnp.int32(1),
      method=models.NerfaceModel.densities))
  zero, one = density(0.0), density(1.0)
  np.testing.assert_array_equal(zero[~inside], 0.0)
  assert np.all(zero >= 0) and np.any(zero[inside] > 0)
  # The expression enters the density MLP: it changes the density inside.
  assert np.abs(zero - one)[inside].max() > 1e-3


def test_without_a_box_the_hash_field_is_refused():
  config = tiny_config(**HASH_OVERRIDES)
  with pytest.raises(ValueError, match=r"model\.field = 'hash' needs the head "
                     r'box'):
    models.construct_model(config, NUM_FRAMES, EXPR_DIM)


def test_tables_get_their_own_rate_and_the_network_the_other():
  config, model = _hash_model(**{'train.lr': 1e-3, 'train.table_lr': 1e-1})
  params = models.init_params(model, jax.random.PRNGKey(0), EXPR_DIM)
  labels = train_state.param_labels(params)
  assert labels['coarse']['tables'] == 'tables'
  assert labels['fine']['density_0']['kernel'] == 'network'
  tx = train_state.make_optimizer(config)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is -lr * g / (|g| + eps) = -lr for g = 1.
  np.testing.assert_allclose(updates['fine']['tables'], -1e-1, rtol=1e-5)
  np.testing.assert_allclose(updates['fine']['rgb']['kernel'], -1e-3,
                             rtol=1e-5)
  # Without a table rate (or with the MLP field) there is one group.
  config.train.table_lr = None
  single = train_state.make_optimizer(config)
  updates, _ = single.update(grads, single.init(params), params)
  np.testing.assert_allclose(updates['fine']['tables'], -1e-3, rtol=1e-5)


def test_warm_up_ramps_the_rate_then_follows_the_decay():
  config = tiny_config(**{'train.lr': 1e-2, 'train.warmup_steps': 10,
                          'train.lr_decay_steps': 100,
                          'train.lr_decay_rate': 0.1})
  schedule = train_state.learning_rate_schedule(config)
  decay = lambda s: 1e-2 * 0.1 ** (s / 100)
  np.testing.assert_allclose(schedule(0), decay(0) / 10, rtol=1e-6)
  np.testing.assert_allclose(schedule(4), decay(4) / 2, rtol=1e-6)
  for s in (9, 10, 50):
    np.testing.assert_allclose(schedule(s), decay(s), rtol=1e-6)
  config.train.warmup_steps = 0
  np.testing.assert_allclose(
      train_state.learning_rate_schedule(config)(0), 1e-2, rtol=1e-6)


@pytest.mark.parametrize('background', [True, False])
def test_compositing_in_runs_equals_compositing_at_once(background):
  rng = np.random.default_rng(0)
  r, s = 7, 13
  rgb = rng.uniform(size=(r, s, 3)).astype(np.float32)
  sigma = rng.exponential(5.0, size=(r, s)).astype(np.float32)
  sigma[0] = 0.0  # An empty ray.
  t = np.sort(rng.uniform(0.2, 0.8, size=(r, s)), axis=-1).astype(np.float32)
  t[:, -1] = 0.8
  dirs = rng.normal(size=(r, 3)).astype(np.float32)
  bg = rng.uniform(size=(r, 3)).astype(np.float32)
  whole = rendering.composite(rgb, sigma, t, dirs, bg if background else None)
  # The samples the network sees, and the depth after each run's last.
  n = s - 1 if background else s
  after = t[:, -1:] if background else t[:, -1:] + rendering.FAR_INTERVAL
  t_ext = np.concatenate([t[:, :n], after], axis=1)
  trans = np.ones((r,), np.float32)
  out_rgb, out_depth = np.zeros((r, 3)), np.zeros((r,))
  for lo, hi in ((0, 4), (4, 5), (5, n)):
    part = rendering.composite_segment(rgb[:, lo:hi], sigma[:, lo:hi],
                                       t_ext[:, lo:hi + 1], dirs, trans)
    out_rgb += part[0]
    out_depth += part[1]
    trans = np.asarray(part[2])
  if background:
    out_rgb += trans[:, None] * bg
    out_depth += trans * t[:, -1]
  chex.assert_trees_all_close(out_rgb, whole.rgb, atol=1e-5)
  chex.assert_trees_all_close(out_depth, whole.depth, atol=1e-5)
  chex.assert_trees_all_close(1.0 - trans, whole.acc, atol=1e-5)


def _frame(avatar, index=0):
  dataset = avatar_lib.load_dataset(avatar, 'val')
  return dataset, renderer.dataset_inputs(dataset, index,
                                          avatar.shared_code('mean'))


def test_trained_grid_is_partly_occupied_and_covers_the_face(
    trained_hash_avatar):
  grid = trained_hash_avatar.renderer.grid
  assert grid is not None
  fraction = float(np.mean(np.asarray(grid.occupied)))
  assert 0.005 < fraction < 0.8, fraction
  render = trained_hash_avatar.renderer
  dataset, inputs = _frame(trained_hash_avatar)
  out = render(inputs, dataset.height, dataset.width)
  # Pixels the face covers (opaque) all cross occupied cells.
  assert np.mean(out['acc'] > 0.5) > 0.05
  assert np.mean(out['acc'] > 0.01) < 0.98  # Some rays were culled.


@pytest.mark.parametrize('levels', [1, 2])
def test_culling_and_early_termination_match_the_plain_render(levels, request):
  avatar = request.getfixturevalue(
      'trained_hash_avatar' if levels == 1 else 'trained_two_level_hash_avatar')
  assert avatar.model.num_fine == (0 if levels == 1 else 16)
  render = avatar.renderer
  dataset, inputs = _frame(avatar)
  h, w = dataset.height, dataset.width
  fast = render(inputs, h, w)
  # Every ray through the model with the same grid-guided samples, no
  # culling, every sample evaluated.
  pixels = np.asarray(renderer.camera.pixel_grid(h, w),
                      np.int32).reshape(-1, 2)
  # The render samples with the grid less its training margin.
  assert (np.asarray(render.render_grid.occupied).sum() <
          np.asarray(render.grid.occupied).sum())
  plain = renderer._map_chunks(  # pylint: disable=protected-access
      render.fns.full,
      (render.params, renderer.parallel.replicate(inputs, render.mesh),
       render.render_grid), [pixels], render.mesh.devices.size * 64,
      render.mesh, None)
  for key in ('rgb', 'acc'):
    diff = np.abs(fast[key].reshape(-1, *fast[key].shape[2:]) - plain[key])
    assert diff.max() < 1e-2, (key, diff.max())
  # One pass only: no early termination, the same picture.
  frame = functools.partial(renderer.render_frame, render.fns, render.params,
                            inputs, h, w, render.chunk, render.mesh,
                            grid=render.render_grid)
  assert np.abs(frame(passes=1)['rgb'] - fast['rgb']).max() < 1e-2
  # The coarse first test only culls rays the exact one would: the same
  # frame without it.
  assert render.coarse_grid is not None
  for key, value in frame(coarse_grid=None).items():
    np.testing.assert_allclose(value, fast[key], atol=1e-6)


def test_an_empty_grid_renders_exactly_the_background(trained_hash_avatar):
  render = trained_hash_avatar.renderer
  grid = jax.device_get(render.grid)
  empty = grid.replace(occupied=np.zeros_like(np.asarray(grid.occupied)))
  dataset, inputs = _frame(trained_hash_avatar)
  out = render.with_params(trained_hash_avatar.host_params, empty)(
      inputs, dataset.height, dataset.width)
  np.testing.assert_array_equal(
      out['rgb'], dataset.background.astype(np.float32) / 255.0)
  np.testing.assert_array_equal(out['acc'], 0.0)
  np.testing.assert_array_equal(out['depth'],
                                np.float32(trained_hash_avatar.model.far))


def test_hash_avatar_renders_a_face_through_render_modes(trained_hash_avatar,
                                                        tmp_path):
  report = render_modes.render_split(trained_hash_avatar, tmp_path, 'val')
  assert report['mean']['psnr'] > 22.0  # A trained face, not background.
  assert (tmp_path / report['video']).stat().st_size > 0
  assert sorted(p.name for p in (tmp_path / 'depth').glob('*.png'))


def test_refresh_keeps_cells_with_density_and_empties_the_rest(
    trained_hash_avatar):
  config, model = trained_hash_avatar.config, trained_hash_avatar.model
  refresh = train_lib.make_occupancy_refresh(config, model)
  grid = train_state.initial_grid(config, model)
  data = renderer.parallel.to_host  # Unused; keeps the import honest.
  del data
  dataset = avatar_lib.load_dataset(trained_hash_avatar, 'train')
  device_data = train_lib.sampler.from_dataset(dataset, 0.9)
  params = trained_hash_avatar.host_params
  step = jax.jit(refresh)
  for n in range(config.train.occupancy_warmup //
                 config.train.occupancy_every + 3):
    grid = step(grid, params, jax.random.PRNGKey(n), device_data)
  occupied = np.asarray(grid.occupied)
  assert 0 < occupied.mean() < 1
  # Cells whose centre has density for frame 0 are occupied (the decayed
  # max holds what any refresh saw; the centres are one of its points).
  centres = occupancy.cell_centres(grid)
  sigma = np.asarray(model.apply(
      {'params': params}, centres, jnp.asarray(dataset.expressions[0]),
      jnp.int32(0), method=models.NerfaceModel.densities))
  side = float(np.max(np.asarray(grid.box_max - grid.box_min))) / (
      grid.resolution)
  strong = sigma * side > 10 * config.render.occupancy_threshold
  assert strong.any()
  assert occupied.reshape(-1)[strong].mean() > 0.9


ONE_LEVEL = {'render.num_coarse': 12, 'render.num_fine': 0}


def _random_params(params):
  """Random weights and tables, so that an untrained field has density."""
  leaves, tree = jax.tree.flatten(params)
  return jax.tree.unflatten(tree, [
      jax.random.normal(jax.random.PRNGKey(n), x.shape) * 0.5
      for n, x in enumerate(leaves)])


def _one_level_batch(num):
  rng = np.random.default_rng(0)
  origins = np.tile([0.0, 0.0, 0.5], (num, 1)).astype(np.float32)
  directions = np.concatenate(
      [rng.uniform(-0.3, 0.3, (num, 2)), -np.ones((num, 1))],
      axis=1).astype(np.float32)
  batch = models.dummy_batch(num, EXPR_DIM)
  return batch.replace(
      rays=batch.rays.replace(origins=jnp.asarray(origins),
                              directions=jnp.asarray(directions)),
      rgb=jnp.asarray(rng.uniform(size=(num, 3)), jnp.float32),
      background=jnp.asarray(rng.uniform(size=(num, 3)), jnp.float32),
      expression=jnp.asarray(rng.normal(size=(num, EXPR_DIM)), jnp.float32),
      frame=jnp.asarray(rng.integers(0, NUM_FRAMES, num), jnp.int32))


def _some_cells(model, resolution=8):
  """A grid over the model's box with a band of occupied cells."""
  grid = occupancy.create(model.box_min, model.box_max, resolution)
  occupied = np.zeros((resolution,) * 3, bool)
  occupied[2:6, 2:6, 3:5] = True
  return grid.replace(occupied=jnp.asarray(occupied))


@pytest.mark.parametrize('with_grid', [False, True])
def test_one_level_renders_its_own_samples_with_the_fine_field(with_grid):
  _, model = _hash_model(**ONE_LEVEL)
  params = models.init_params(model, jax.random.PRNGKey(0), EXPR_DIM)
  assert set(params) == {'fine', 'latent'}  # No coarse network.
  params = _random_params(params)
  batch = _one_level_batch(16)
  grid = _some_cells(model) if with_grid else None
  coarse, fine = model.apply({'params': params}, batch, None, grid)
  assert coarse is None
  # Brute force: the fine field at the (grid-guided) depths, composited.
  t = model.apply({'params': params}, batch, grid,
                  method=models.NerfaceModel.fine_depths)
  chex.assert_shape(t, (16, 12))
  rgb, sigma = model.apply({'params': params}, batch, t,
                           method=models.NerfaceModel.fine_samples)
  reference = rendering.composite(rgb, sigma, t, batch.rays.directions,
                                  batch.background)
  chex.assert_trees_all_close(fine.rgb, reference.rgb, atol=1e-5)
  chex.assert_trees_all_close(fine.weights, reference.weights, atol=1e-5)
  assert float(jnp.max(fine.acc)) > 0.05  # The field is not empty.
  if with_grid:
    # Every sample but the background's lies in an occupied cell.
    points = (batch.rays.origins[:, None] +
              t[:, :-1, None] * batch.rays.directions[:, None])
    assert np.all(np.asarray(occupancy.occupied_at(grid, points))[
        np.asarray(occupancy.sample(None, grid, batch.rays.origins,
                                    batch.rays.directions, model.near,
                                    model.far, 2)[1])])


def test_one_level_loss_is_the_fine_levels_alone():
  config, model = _hash_model(**ONE_LEVEL)
  params = _random_params(models.init_params(model, jax.random.PRNGKey(0),
                                             EXPR_DIM))
  batch = _one_level_batch(16)
  loss, stats = train_lib.compute_losses(params, model, batch,
                                         jax.random.PRNGKey(1), 0.0)
  assert set(stats) == {'mse_fine', 'latent_prior', 'loss'}
  _, fine = model.apply({'params': params}, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(loss, np.mean((fine.rgb - batch.rgb)**2),
                             rtol=1e-5)
  # Two levels: both photometric terms add up.
  _, two = _hash_model()
  params2 = _random_params(models.init_params(two, jax.random.PRNGKey(0),
                                              EXPR_DIM))
  loss2, stats2 = train_lib.compute_losses(params2, two, batch,
                                           jax.random.PRNGKey(1), 0.0)
  np.testing.assert_allclose(loss2, stats2['mse_coarse'] + stats2['mse_fine'],
                             rtol=1e-6)


def test_latent_fitting_samples_where_the_grid_says():
  config, model = _hash_model(**{**ONE_LEVEL, 'eval.optimize_steps': 3,
                                 'eval.optimize_rays': 16,
                                 'eval.optimize_batch': 2})
  params = _random_params(models.init_params(model, jax.random.PRNGKey(0),
                                             EXPR_DIM))
  rng = np.random.default_rng(0)
  frames, size = 2, 8
  # Cameras at z = 0.5 looking down -z, as in _one_level_batch.
  c2w = np.tile(np.eye(4, dtype=np.float32), (frames, 1, 1))
  c2w[:, 2, 3] = 0.5
  dataset = data_lib.Dataset(
      images=rng.integers(0, 256, (frames, size, size, 3), np.uint8),
      c2w=c2w, intrinsics=np.array([size, -size, 0.5, 0.5], np.float32),
      expressions=rng.normal(size=(frames, EXPR_DIM)).astype(np.float32),
      bboxes=np.tile(np.array([0, 1, 0, 1], np.float32), (frames, 1)),
      background=rng.integers(0, 256, (size, size, 3), np.uint8),
      file_paths=['a', 'b'], split='test', path=pathlib.Path('.'))
  grid = jax.device_get(_some_cells(model))
  free = latents.optimize_latents(config, model, params, dataset)
  guided = latents.optimize_latents(config, model, params, dataset, grid=grid)
  again = latents.optimize_latents(config, model, params, dataset, grid=grid)
  chex.assert_trees_all_close(guided, again)  # Deterministic.
  # The grid placed the samples: other samples, another fit.
  assert np.abs(guided - free).max() > 1e-6
