"""Tests of nerface_jax.models: shapes, parameters, conditioning, gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import person
from nerface_jax import encoding
from nerface_jax import models
from nerface_jax import rendering
from nerface_jax import sampling
from nerface_jax import types

EXPR_DIM = 5
NUM_FRAMES = 6
NUM_RAYS = 7

# A small MLP whose layers still have enough entries for init statistics.
TINY_MLP = dict(trunk_depth=3, trunk_width=16, skip_layer=2, color_width=8,
                color_depth=2, xyz_freqs=2, dir_freqs=1)


def _tiny_config(**model_overrides):
  config = person.get_config('tiny')
  for name, value in model_overrides.items():
    setattr(config.model, name, value)
  return config


def _tiny_model(**model_overrides):
  return models.construct_model(_tiny_config(**model_overrides), NUM_FRAMES,
                                EXPR_DIM)


def _batch(seed, num_rays=NUM_RAYS, expr_dim=EXPR_DIM, latent_dim=None):
  """Rays from about z = 0.5 looking down -z through the sample range."""
  rng = np.random.default_rng(seed)
  origins = np.array([0.0, 0.0, 0.5]) + 0.05 * rng.normal(size=(num_rays, 3))
  directions = np.concatenate(
      [0.3 * rng.uniform(-1, 1, size=(num_rays, 2)),
       -np.ones((num_rays, 1))], axis=-1)
  latent = None
  if latent_dim is not None:
    latent = jnp.asarray(rng.normal(size=(num_rays, latent_dim)), jnp.float32)
  return types.Batch(
      rays=types.Rays(origins=jnp.asarray(origins, jnp.float32),
                      directions=jnp.asarray(directions, jnp.float32)),
      rgb=jnp.asarray(rng.uniform(size=(num_rays, 3)), jnp.float32),
      background=jnp.asarray(rng.uniform(size=(num_rays, 3)), jnp.float32),
      expression=jnp.asarray(rng.normal(size=(num_rays, expr_dim)),
                             jnp.float32),
      frame=jnp.asarray(rng.integers(0, NUM_FRAMES, size=num_rays),
                        jnp.int32),
      latent=latent)


def _random_gamma(params, seed):
  """Params with a random (instead of zero) gamma table."""
  gamma = params['latent']['gamma']
  new = jax.random.normal(jax.random.PRNGKey(seed), gamma.shape, gamma.dtype)
  return {**params, 'latent': {'gamma': new}}


def _visible(params, offset=1.0):
  """Params whose density bias is raised so that samples are not all empty.

  A freshly initialised field can have raw density < 0 everywhere, which
  renders the plain background whatever the conditioning.
  """
  params = dict(params)
  for level in ('coarse', 'fine'):
    net = dict(params[level])
    net['density'] = {**net['density'],
                      'bias': net['density']['bias'] + offset}
    params[level] = net
  return params


def _loss(model, params, batch, key=None):
  coarse, fine = model.apply({'params': params}, batch, key)
  return (jnp.sum((coarse.rgb - batch.rgb)**2)
          + jnp.sum((fine.rgb - batch.rgb)**2))


# --- ConditionedMLP ---------------------------------------------------------


def _reference_mlp(params, mlp, positions, condition, viewdirs):
  """The field as a plain per-sample concatenation, in float64 numpy."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  num_rays, num_samples = positions.shape[:2]
  x = np.asarray(encoding.positional_encoding(positions, mlp.xyz_freqs),
                 np.float64)
  cond = np.broadcast_to(np.asarray(condition, np.float64)[:, None, :],
                         (num_rays, num_samples, condition.shape[-1]))
  inputs = np.concatenate([x, cond], axis=-1)

  def dense(name, h):
    return h @ p[name]['kernel'] + p[name]['bias']

  h = inputs
  for i in range(mlp.trunk_depth):
    if i == mlp.skip_layer:
      h = np.concatenate([inputs, h], axis=-1)
    h = np.maximum(dense(f'trunk_{i}', h), 0.0)
  feature = dense('feature', h)
  raw = dense('density', feature)[..., 0]
  h = feature
  if mlp.use_viewdirs:
    d = np.asarray(encoding.positional_encoding(
        viewdirs, mlp.dir_freqs, include_input=False), np.float64)
    d = np.broadcast_to(d[:, None, :], (num_rays, num_samples, d.shape[-1]))
    h = np.concatenate([feature, d], axis=-1)
  for i in range(mlp.color_depth):
    h = np.maximum(dense(f'color_{i}', h), 0.0)
  rgb = 1.0 / (1.0 + np.exp(-dense('rgb', h)))
  return rgb, raw


def _mlp_inputs(seed, num_rays, num_samples, cond_dim):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  positions = jax.random.uniform(k1, (num_rays, num_samples, 3),
                                 jnp.float32, -1.0, 1.0)
  condition = jax.random.normal(k2, (num_rays, cond_dim), jnp.float32)
  viewdirs = jax.random.normal(k3, (num_rays, 3), jnp.float32)
  viewdirs = viewdirs / jnp.linalg.norm(viewdirs, axis=-1, keepdims=True)
  return positions, condition, viewdirs


@pytest.mark.parametrize('cond_dim, use_viewdirs', [(7, True), (0, False)])
def test_mlp_split_kernel_equals_concatenation(cond_dim, use_viewdirs):
  mlp = models.ConditionedMLP(use_viewdirs=use_viewdirs, **TINY_MLP)
  positions, condition, viewdirs = _mlp_inputs(0, 4, 5, cond_dim)
  params = jax.jit(mlp.init)(jax.random.PRNGKey(1), positions, condition,
                             viewdirs)['params']
  apply = jax.jit(mlp.apply)
  rgb, raw = apply({'params': params}, positions, condition, viewdirs)
  chex.assert_shape(rgb, (4, 5, 3))
  chex.assert_shape(raw, (4, 5))
  assert rgb.dtype == jnp.float32 and raw.dtype == jnp.float32
  ref_rgb, ref_raw = _reference_mlp(params, mlp, positions, condition,
                                    viewdirs)
  np.testing.assert_allclose(rgb, ref_rgb, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(raw, ref_raw, rtol=1e-5, atol=1e-5)
  # The one-kernel layout: plain-concatenation widths.
  dx = encoding.encoded_dim(3, TINY_MLP['xyz_freqs'])
  width = TINY_MLP['trunk_width']
  chex.assert_shape(params['trunk_0']['kernel'], (dx + cond_dim, width))
  chex.assert_shape(params['trunk_2']['kernel'],
                    (dx + cond_dim + width, width))
  dd = encoding.encoded_dim(3, TINY_MLP['dir_freqs'], include_input=False)
  chex.assert_shape(params['color_0']['kernel'],
                    (width + dd * use_viewdirs, TINY_MLP['color_width']))
  # The direction reaches the colour only, and only with use_viewdirs.
  rgb_b, raw_b = apply({'params': params}, positions, condition, -viewdirs)
  np.testing.assert_array_equal(raw, raw_b)
  if use_viewdirs:
    assert np.max(np.abs(rgb - rgb_b)) > 1e-4
  else:
    np.testing.assert_array_equal(rgb, rgb_b)


def test_mlp_conditioning_is_not_broadcast_over_samples():
  # A distinctive width C = 11: no [R, S, C] or [R, S, Dx + C] tensor may
  # appear in the computation, only the per-ray [R, C] product.
  mlp = models.ConditionedMLP(**TINY_MLP)
  positions, condition, viewdirs = _mlp_inputs(2, 3, 13, 11)
  # Abstract parameters suffice to trace: nothing is compiled or run.
  params = jax.eval_shape(mlp.init, jax.random.PRNGKey(0), positions,
                          condition, viewdirs)
  text = str(jax.make_jaxpr(mlp.apply)(params, positions, condition,
                                       viewdirs))
  dx = encoding.encoded_dim(3, TINY_MLP['xyz_freqs'])
  assert 'f32[3,13,11]' not in text
  assert f'f32[3,13,{dx + 11}]' not in text
  assert f'f32[3,13,{dx + 11 + TINY_MLP["trunk_width"]}]' not in text
  assert 'f32[3,16]' in text  # The per-ray term of the first layer.


def test_mlp_init_is_pytorch_uniform():
  # Width 64 gives kernels of thousands of entries for the statistics.
  mlp = models.ConditionedMLP(trunk_depth=3, trunk_width=64, skip_layer=2,
                              color_width=32, color_depth=2, xyz_freqs=4,
                              dir_freqs=2)
  positions, condition, viewdirs = _mlp_inputs(4, 2, 3, 9)
  params = jax.jit(mlp.init)(jax.random.PRNGKey(5), positions, condition,
                             viewdirs)['params']
  assert len(params) == 3 + 2 + 2 + 1  # trunk, feature+density, colour, rgb
  for name, layer in params.items():
    fan_in = layer['kernel'].shape[0]
    bound = 1.0 / np.sqrt(fan_in)
    for kind in ('kernel', 'bias'):
      w = np.asarray(layer[kind], np.float64).ravel()
      assert layer[kind].dtype == jnp.float32
      assert np.all(np.abs(w) <= bound), (name, kind)
      if w.size < 1000:
        continue
      # Uniform on [-b, b]: mean 0, variance b^2 / 3, flat histogram.
      n = w.size
      assert abs(w.mean()) < 5 * bound / np.sqrt(3 * n), name
      assert abs(w.var() / (bound**2 / 3) - 1.0) < 0.1, name
      assert np.max(np.abs(w)) > 0.98 * bound, name
      counts, _ = np.histogram(w, bins=10, range=(-bound, bound))
      np.testing.assert_allclose(counts / (n / 10), 1.0, atol=0.25)


def test_mlp_bfloat16_close_to_float32():
  positions, condition, viewdirs = _mlp_inputs(6, 8, 16, 5)
  mlp32 = models.ConditionedMLP(**TINY_MLP)
  mlp16 = models.ConditionedMLP(compute_dtype=jnp.bfloat16, **TINY_MLP)
  params = jax.jit(mlp32.init)(jax.random.PRNGKey(0), positions, condition,
                               viewdirs)
  # The parameters are float32 whatever the compute dtype.
  shapes16 = jax.eval_shape(mlp16.init, jax.random.PRNGKey(0), positions,
                            condition, viewdirs)
  chex.assert_trees_all_equal_shapes_and_dtypes(shapes16, params)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes16))
  rgb16, raw16 = jax.jit(mlp16.apply)(params, positions, condition, viewdirs)
  rgb32, raw32 = jax.jit(mlp32.apply)(params, positions, condition, viewdirs)
  assert rgb16.dtype == jnp.float32 and raw16.dtype == jnp.float32
  np.testing.assert_allclose(rgb16, rgb32, atol=0.02)
  np.testing.assert_allclose(raw16, raw32, atol=0.05 * np.max(np.abs(raw32)))
  # bfloat16 really ran: the results are not bit-identical to float32.
  assert np.max(np.abs(raw16 - raw32)) > 0


def test_mlp_rejects_bad_shapes():
  mlp = models.ConditionedMLP(**TINY_MLP)
  positions, condition, viewdirs = _mlp_inputs(0, 4, 5, 2)
  with pytest.raises(ValueError, match=r'condition: expected shape \[R, C\]'):
    mlp.init(jax.random.PRNGKey(0), positions, condition[:3], viewdirs)
  with pytest.raises(ValueError, match=r'viewdirs: expected shape \[R, 3\]'):
    mlp.init(jax.random.PRNGKey(0), positions, condition, viewdirs[:, :2])


# --- LatentTable ------------------------------------------------------------


def test_latent_table_zero_init_and_lookup():
  table = models.LatentTable(num_frames=5, dim=3)
  frame = jnp.array([4, 0, 4, 2], jnp.int32)
  params = table.init(jax.random.PRNGKey(0), frame)['params']
  chex.assert_shape(params['gamma'], (5, 3))
  assert params['gamma'].dtype == jnp.float32
  np.testing.assert_array_equal(params['gamma'], 0.0)
  gamma = np.arange(15, dtype=np.float32).reshape(5, 3)
  out = table.apply({'params': {'gamma': jnp.asarray(gamma)}}, frame)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, gamma[[4, 0, 4, 2]])


# --- NerfaceModel -----------------------------------------------------------


@pytest.fixture(scope='module')
def tiny():
  model = _tiny_model()
  params = models.init_params(model, jax.random.PRNGKey(0), EXPR_DIM)
  return model, _visible(_random_gamma(params, 1))


def test_model_shapes_and_finite_gradients(tiny):
  model, params = tiny
  config = _tiny_config()
  s_c, s_f = config.render.num_coarse, config.render.num_fine
  batch = _batch(0)
  coarse, fine = jax.jit(model.apply)({'params': params}, batch,
                                      jax.random.PRNGKey(3))
  for out, num in ((coarse, s_c), (fine, s_c + s_f)):
    chex.assert_shape(out.rgb, (NUM_RAYS, 3))
    chex.assert_shape([out.depth, out.acc, out.bg_weight], (NUM_RAYS,))
    chex.assert_shape([out.weights, out.t], (NUM_RAYS, num))
    chex.assert_tree_all_finite(out)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(out))
    assert np.all(np.diff(np.asarray(out.t), axis=-1) >= 0)
  assert np.all((coarse.t >= 0.2 - 1e-6) & (coarse.t <= 0.8 + 1e-6))
  grads = jax.jit(jax.grad(lambda p: _loss(model, p, batch,
                                           jax.random.PRNGKey(3))))(params)
  chex.assert_tree_all_finite(grads)
  chex.assert_trees_all_equal_shapes(grads, params)
  # Both networks and the table receive a signal.
  for part in ('coarse', 'fine', 'latent'):
    assert sum(float(jnp.sum(jnp.abs(g)))
               for g in jax.tree.leaves(grads[part])) > 0, part


def _hand_wired(model, params, batch):
  """Both levels of `model` (key None) composed by hand."""
  mlp = models.ConditionedMLP(**{
      name: getattr(model, name)
      for name in ('trunk_depth', 'trunk_width', 'skip_layer', 'color_width',
                   'color_depth', 'xyz_freqs', 'dir_freqs', 'use_viewdirs')})
  condition = jnp.concatenate(
      [batch.expression * model.expr_scale,
       params['latent']['gamma'][batch.frame]], -1)
  d = batch.rays.directions
  viewdirs = d / jnp.linalg.norm(d, axis=-1, keepdims=True)

  def level(net, t):
    positions = batch.rays.origins[:, None] + t[..., None] * d[:, None]
    rgb, raw = mlp.apply({'params': params[net]}, positions, condition,
                         viewdirs)
    return rendering.composite(rgb, jax.nn.relu(raw), t, d, batch.background)

  t = jnp.broadcast_to(jnp.linspace(0.2, 0.8, model.num_coarse),
                       (NUM_RAYS, model.num_coarse))
  coarse = level('coarse', t)
  t_fine = sampling.resample(None, t, coarse.weights, model.num_fine)
  return coarse, level('fine', t_fine)


def test_model_matches_hand_wiring(tiny):
  # Both levels rebuilt from the pure functions and the bare MLPs: condition
  # = [expression * expr_scale, gamma of the frame], unit view directions,
  # background at the ray's end, fine samples from the coarse weights. A
  # scale other than the default 1 checks that it is applied.
  _, params = tiny
  model = _tiny_model(expr_scale=0.25)
  batch = _batch(10)
  coarse, fine = jax.jit(model.apply)({'params': params}, batch)
  ref_coarse, ref_fine = jax.jit(
      lambda p, b: _hand_wired(model, p, b))(params, batch)
  chex.assert_trees_all_close(coarse, ref_coarse, atol=1e-5)
  chex.assert_trees_all_close(fine, ref_fine, atol=1e-5)


def test_paper_parameter_count():
  expr_dim, num_frames = 76, 100
  model = models.construct_model(person.get_config('paper'), num_frames,
                                 expr_dim)
  shapes = jax.eval_shape(
      lambda key: models.init_params(model, key, expr_dim),
      jax.random.PRNGKey(0))
  inputs = 63 + 76 + 32  # PE(xyz) ++ expression ++ gamma = 171

  def dense(fan_in, fan_out):
    return fan_in * fan_out + fan_out

  per_network = (dense(inputs, 256)  # trunk 0
                 + 2 * dense(256, 256)  # trunk 1, 2
                 + dense(inputs + 256, 256)  # trunk 3 after the skip
                 + 2 * dense(256, 256)  # trunk 4, 5
                 + dense(256, 256)  # feature
                 + dense(256, 1)  # density
                 + dense(256 + 24, 128)  # colour 0 with PE(direction)
                 + 2 * dense(128, 128)  # colour 1, 2
                 + dense(128, 3))  # rgb
  assert per_network == 552_196
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert count(shapes['coarse']) == per_network
  assert count(shapes['fine']) == per_network
  chex.assert_shape(shapes['latent']['gamma'], (num_frames, 32))
  assert count(shapes) == 2 * per_network + num_frames * 32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('use_expression, use_latent',
                         [(True, True), (False, True), (True, False)])
def test_conditioning_matters_only_when_used(tiny, use_expression,
                                             use_latent):
  if use_expression and use_latent:
    model, params = tiny
  else:
    model = _tiny_model(use_expression=use_expression, use_latent=use_latent)
    params = models.init_params(model, jax.random.PRNGKey(0), EXPR_DIM)
    params = _visible(_random_gamma(params, 4) if use_latent else params)
  assert ('latent' in params) == use_latent
  batch = _batch(2, latent_dim=_tiny_config().model.latent_dim)
  apply = jax.jit(model.apply)
  base = apply({'params': params}, batch)[1].rgb

  def change(other):
    return np.max(np.abs(apply({'params': params}, other)[1].rgb - base))

  expr_diff = change(batch.replace(expression=batch.expression + 1.0))
  latent_diff = change(batch.replace(latent=batch.latent + 1.0))
  # Unused inputs must not leak in at all: exactly equal, not just close.
  assert expr_diff > 1e-4 if use_expression else expr_diff == 0.0
  assert latent_diff > 1e-4 if use_latent else latent_diff == 0.0
  if use_latent:
    # The table path too: another frame's (random) code changes the output.
    table_a = batch.replace(latent=None, frame=jnp.zeros_like(batch.frame))
    table_b = table_a.replace(frame=jnp.ones_like(batch.frame))
    assert np.max(np.abs(apply({'params': params}, table_a)[1].rgb
                         - apply({'params': params}, table_b)[1].rgb)) > 1e-4


def test_gamma_gradient_only_on_the_batch_frames(tiny):
  model, params = tiny
  batch = _batch(3).replace(frame=jnp.array([1, 4, 4, 1, 1, 4, 1], jnp.int32))
  grad_fn = jax.jit(jax.grad(lambda p, b: _loss(model, p, b)))
  g = np.asarray(grad_fn(params, batch)['latent']['gamma'])
  row_norms = np.abs(g).sum(axis=-1)
  assert np.all(row_norms[[1, 4]] > 0)
  np.testing.assert_array_equal(row_norms[[0, 2, 3, 5]], 0.0)
  # The lookup is the frame's own row: moving one ray to frame 2 moves its
  # gradient contribution there.
  batch2 = batch.replace(frame=batch.frame.at[0].set(2))
  g2 = np.asarray(grad_fn(params, batch2)['latent']['gamma'])
  assert np.abs(g2[2]).sum() > 0
  # An explicit latent bypasses the table entirely.
  latent_dim = params['latent']['gamma'].shape[-1]
  explicit = batch.replace(latent=jnp.ones((NUM_RAYS, latent_dim)))
  g3 = grad_fn(params, explicit)['latent']['gamma']
  np.testing.assert_array_equal(g3, 0.0)


def test_explicit_latent_equals_table_row(tiny):
  model, params = tiny
  batch = _batch(4)
  gamma = params['latent']['gamma']
  explicit = batch.replace(latent=gamma[batch.frame])
  apply = jax.jit(model.apply)
  chex.assert_trees_all_close(apply({'params': params}, batch),
                              apply({'params': params}, explicit))


def test_jitted_forward_traces_once(tiny):
  model, params = tiny

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(p, batch, key):
    return model.apply({'params': p}, batch, key)

  for seed in range(3):
    forward(params, _batch(seed), jax.random.PRNGKey(seed))


def test_key_none_is_deterministic_and_keys_randomise(tiny):
  model, params = tiny
  batch = _batch(5)
  apply = jax.jit(model.apply)
  a = apply({'params': params}, batch)
  b = apply({'params': params}, batch)
  chex.assert_trees_all_equal(a, b)
  # Evaluation samples are the plain linspace, ends included.
  np.testing.assert_allclose(
      a[0].t, np.broadcast_to(np.linspace(0.2, 0.8, a[0].t.shape[-1]),
                              a[0].t.shape), atol=1e-6)
  k1 = apply({'params': params}, batch, jax.random.PRNGKey(1))
  k1_again = apply({'params': params}, batch, jax.random.PRNGKey(1))
  k2 = apply({'params': params}, batch, jax.random.PRNGKey(2))
  chex.assert_trees_all_equal(k1, k1_again)
  for level in (0, 1):
    assert np.max(np.abs(k1[level].t - k2[level].t)) > 1e-4
    assert np.max(np.abs(k1[level].rgb - k2[level].rgb)) > 1e-6
    assert np.max(np.abs(k1[level].t - a[level].t)) > 1e-4


def test_per_ray_keys_make_each_ray_independent_of_its_batch(tiny):
  """With one key per ray, a ray renders the same alone or in any batch
  (what makes training independent of the device count)."""
  model, params = tiny
  batch = _batch(6)
  keys = jax.random.split(jax.random.PRNGKey(3), batch.frame.shape[0])
  apply = jax.jit(model.apply)
  whole = apply({'params': params}, batch, keys)
  half = batch.frame.shape[0] // 2
  part = jax.tree.map(lambda x: x[half:], batch)
  tail = apply({'params': params}, part, keys[half:])
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[half:], whole), tail,
                              atol=1e-6)
  # Still random: other keys move the samples.
  other = apply({'params': params}, batch, keys[::-1])
  assert np.max(np.abs(other[0].t - whole[0].t)) > 1e-4
  with pytest.raises(ValueError, match='one key per ray'):
    model.apply({'params': params}, batch, keys[:2])


def test_density_noise_follows_noise_std(tiny):
  # The same key gives the same jitter, so with noise_std 0.1 against 0 only
  # the density noise separates the coarse renderings.
  noisy, params = tiny
  assert noisy.noise_std > 0
  quiet = noisy.clone(noise_std=0.0)
  batch = _batch(6)
  key = jax.random.PRNGKey(7)
  out_noisy = jax.jit(noisy.apply)({'params': params}, batch, key)
  out_quiet = jax.jit(quiet.apply)({'params': params}, batch, key)
  np.testing.assert_array_equal(out_noisy[0].t, out_quiet[0].t)
  assert np.max(np.abs(out_noisy[0].rgb - out_quiet[0].rgb)) > 1e-5
  # Without a key there is no noise whatever noise_std says.
  chex.assert_trees_all_equal(
      jax.jit(noisy.apply)({'params': params}, batch),
      jax.jit(quiet.apply)({'params': params}, batch))


def test_bfloat16_model():
  model32 = _tiny_model()
  model16 = _tiny_model(compute_dtype='bfloat16')
  assert model16.compute_dtype == jnp.bfloat16
  params = models.init_params(model16, jax.random.PRNGKey(0), EXPR_DIM)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  params = _visible(_random_gamma(params, 2))
  batch = _batch(7)
  out16 = jax.jit(model16.apply)({'params': params}, batch)
  out32 = jax.jit(model32.apply)({'params': params}, batch)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(out16))
  chex.assert_tree_all_finite(out16)
  for level in (0, 1):
    np.testing.assert_allclose(out16[level].rgb, out32[level].rgb, atol=0.03)
  assert np.max(np.abs(out16[0].rgb - out32[0].rgb)) > 0


def test_background_mode_none(tiny):
  config = _tiny_config()
  config.data.background = 'none'
  model = models.construct_model(config, NUM_FRAMES, EXPR_DIM)
  assert not model.use_background
  _, params = tiny
  batch = _batch(8)
  apply = jax.jit(model.apply)
  out_a = apply({'params': params}, batch)
  out_b = apply({'params': params},
                batch.replace(background=batch.background + 0.5))
  # Without the background the pixel does not depend on batch.background,
  # and it does in 'image' mode.
  chex.assert_trees_all_equal(out_a, out_b)
  image_apply = jax.jit(tiny[0].apply)
  image = image_apply({'params': params}, batch)
  image_b = image_apply({'params': params},
                        batch.replace(background=batch.background + 0.5))
  assert np.max(np.abs(image[1].rgb - image_b[1].rgb)) > 1e-4


def test_construct_model_reads_config():
  config = _tiny_config()
  config.data.near, config.data.far = 0.1, 0.9
  model = models.construct_model(config, NUM_FRAMES, EXPR_DIM)
  assert (model.near, model.far) == (0.1, 0.9)
  assert model.num_coarse == config.render.num_coarse
  assert model.num_fine == config.render.num_fine
  assert model.trunk_width == config.model.trunk_width
  assert model.use_background and model.compute_dtype == jnp.float32
  assert (model.num_frames, model.expr_dim) == (NUM_FRAMES, EXPR_DIM)
  config.model.expr_dim = EXPR_DIM + 1
  with pytest.raises(ValueError, match='expr_dim'):
    models.construct_model(config, NUM_FRAMES, EXPR_DIM)
  config.model.expr_dim = EXPR_DIM
  models.construct_model(config, NUM_FRAMES, EXPR_DIM)  # Equal is fine.
  config.model.compute_dtype = 'float16'
  with pytest.raises(ValueError, match='compute_dtype'):
    models.construct_model(config, NUM_FRAMES, EXPR_DIM)


def test_model_rejects_bad_inputs(tiny):
  model, params = tiny
  batch = _batch(9)
  with pytest.raises(ValueError,
                     match=r'expression: expected .*\(7, 5\).*got \(7, 4\)'):
    model.apply({'params': params},
                batch.replace(expression=batch.expression[:, :4]))
  with pytest.raises(ValueError, match=r'latent: expected shape \[R, L\]'):
    model.apply({'params': params},
                batch.replace(latent=jnp.zeros((NUM_RAYS, 3))))
  with pytest.raises(ValueError, match=r'directions: expected shape \[R, 3\]'):
    model.apply({'params': params}, batch.replace(
        rays=batch.rays.replace(directions=batch.rays.directions[:5])))


def test_standardized_expressions_equal_the_scaled_model_on_standard_input():
  """'standardize' feeds (e - mean) / std to the same layers: with equal
  parameters it renders what 'scale' renders from the standardised input."""
  rng = np.random.default_rng(3)
  train = rng.normal(2.0, 0.5, size=(40, EXPR_DIM))
  train[:, 0] = 0.7  # A coefficient that never moves: its std is floored.
  stats = models.expression_stats(train)
  chex.assert_trees_all_close(np.float64(stats['expr_mean']),
                              train.mean(0), rtol=1e-12)
  assert stats['expr_std'][0] == pytest.approx(0.01)
  config = _tiny_config(expr_norm='standardize')
  standard = models.construct_model(config, NUM_FRAMES, EXPR_DIM, stats)
  plain = models.construct_model(_tiny_config(), NUM_FRAMES, EXPR_DIM)
  params = _visible(_random_gamma(
      models.init_params(plain, jax.random.PRNGKey(0), EXPR_DIM), 1))
  batch = _batch(4)
  mean = np.float32(stats['expr_mean'])
  std = np.float32(stats['expr_std'])
  got = standard.apply({'params': params}, batch)
  want = plain.apply({'params': params}, batch.replace(
      expression=(batch.expression - mean) / std))
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  other = plain.apply({'params': params}, batch)
  assert np.max(np.abs(other[1].rgb - got[1].rgb)) > 1e-4


def test_standardize_needs_statistics_of_the_right_length():
  config = _tiny_config(expr_norm='standardize')
  with pytest.raises(ValueError, match='mean and std'):
    models.construct_model(config, NUM_FRAMES, EXPR_DIM)
  stats = models.expression_stats(np.ones((3, EXPR_DIM + 1)))
  with pytest.raises(ValueError, match='statistics'):
    models.construct_model(config, NUM_FRAMES, EXPR_DIM, stats)
  with pytest.raises(ValueError, match='expr_norm'):
    models.construct_model(_tiny_config(expr_norm='whiten'), NUM_FRAMES,
                           EXPR_DIM)
