"""Tests of nerface_jax.rendering: closed forms and a brute-force loop."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import rendering
from nerface_jax import sampling

MODES = ['image', 'none']


def _bg(mode, shape):
  """A background for 'image' mode, None for 'none' mode."""
  if mode == 'none':
    return None
  return jnp.broadcast_to(jnp.array([0.2, 0.5, 0.9]), (*shape, 3))


def _brute_force(rgb, sigma, t, directions, background):
  """NeRF quadrature written as a float64 loop over rays and samples."""
  rgb, sigma, t, directions = (np.asarray(a, np.float64)
                               for a in (rgb, sigma, t, directions))
  num_rays, num = sigma.shape
  out = {k: np.zeros(s) for k, s in [('rgb', (num_rays, 3)), (
      'depth', num_rays), ('acc', num_rays), ('bg_weight', num_rays), (
          'weights', (num_rays, num))]}
  for r in range(num_rays):
    norm = np.linalg.norm(directions[r])
    trans = 1.0
    for i in range(num):
      if i < num - 1:
        alpha = 1.0 - np.exp(-sigma[r, i] * (t[r, i + 1] - t[r, i]) * norm)
      elif background is None:
        alpha = 1.0 - np.exp(-sigma[r, i] * 1e10 * norm)
      else:
        alpha = 1.0
      w = alpha * trans
      trans *= 1.0 - alpha
      out['weights'][r, i] = w
      out['depth'][r] += w * t[r, i]
      if background is not None and i == num - 1:
        out['rgb'][r] += w * np.asarray(background[r], np.float64)
        out['bg_weight'][r] = w
      else:
        out['rgb'][r] += w * rgb[r, i]
        out['acc'][r] += w
    if background is None:
      out['bg_weight'][r] = 1.0 - out['acc'][r]
  return out


def _random_inputs(key, num_rays=6, num=9):
  k1, k2, k3, k4, k5 = jax.random.split(key, 5)
  rgb = jax.random.uniform(k1, (num_rays, num, 3))
  # Mixed regimes: transparent, partly and fully opaque samples.
  sigma = jax.random.uniform(k2, (num_rays, num), maxval=12.0)
  sigma = sigma * (jax.random.uniform(k3, (num_rays, num)) > 0.3)
  t = sampling.stratified(k4, 0.2, 0.8, (num_rays,), num)
  directions = jax.random.normal(k5, (num_rays, 3))
  return rgb, sigma, t, directions


@pytest.mark.parametrize('mode', MODES)
def test_matches_brute_force_loop(mode):
  rgb, sigma, t, directions = _random_inputs(jax.random.PRNGKey(0))
  background = (None if mode == 'none' else jax.random.uniform(
      jax.random.PRNGKey(1), (6, 3)))
  out = rendering.composite(rgb, sigma, t, directions, background)
  expected = _brute_force(rgb, sigma, t, directions, background)
  for name, value in expected.items():
    chex.assert_trees_all_close(getattr(out, name), value.astype(np.float32),
                                atol=1e-5, rtol=0, custom_message=name)
  chex.assert_trees_all_close(out.t, t, atol=0, rtol=0)
  for field in (out.rgb, out.depth, out.acc, out.bg_weight, out.weights):
    assert field.dtype == jnp.float32


def test_constant_slab_transmittance():
  near, far, num = 0.2, 0.8, 33
  t = jnp.broadcast_to(jnp.linspace(near, far, num), (2, num))
  directions = jnp.array([[0.0, 0.0, -1.0], [0.3, -0.4, -1.2]])
  norms = np.linalg.norm(directions, axis=-1)
  density_value, colour = 2.5, jnp.array([0.7, 0.1, 0.4])
  rgb = jnp.broadcast_to(colour, (2, num, 3))
  background = jnp.array([[0.2, 0.5, 0.9]] * 2)
  expected_t = np.exp(-density_value * (far - near) * norms)

  # 'image': the slab spans near..far and the background sits behind it.
  sigma = jnp.full((2, num), density_value)
  out = rendering.composite(rgb, sigma, t, directions, background)
  np.testing.assert_allclose(out.bg_weight, expected_t, atol=1e-5)
  np.testing.assert_allclose(out.acc, 1 - expected_t, atol=1e-5)
  np.testing.assert_allclose(
      out.rgb, (1 - expected_t)[:, None] * colour +
      expected_t[:, None] * background, atol=1e-5)

  # 'none': same slab with an empty last sample, so nothing absorbs beyond far.
  sigma = sigma.at[:, -1].set(0.0)
  out = rendering.composite(rgb, sigma, t, directions)
  np.testing.assert_allclose(out.bg_weight, expected_t, atol=1e-5)
  np.testing.assert_allclose(out.acc, 1 - expected_t, atol=1e-5)
  np.testing.assert_allclose(out.rgb, (1 - expected_t)[:, None] * colour,
                             atol=1e-5)


def test_direction_norm_scales_optical_thickness():
  # Doubling ||d|| keeps t but doubles every path length.
  num = 17
  t = jnp.broadcast_to(jnp.linspace(0.2, 0.8, num), (1, num))
  sigma = jnp.full((1, num), 1.5)
  rgb = jnp.zeros((1, num, 3))
  d = jnp.array([[0.1, 0.2, -1.0]])
  norm = float(np.linalg.norm(d))
  bg = jnp.ones((1, 3))
  single = rendering.composite(rgb, sigma, t, d, bg)
  double = rendering.composite(rgb, sigma, t, 2.0 * d, bg)
  np.testing.assert_allclose(single.bg_weight, np.exp(-1.5 * 0.6 * norm),
                             atol=1e-5)
  np.testing.assert_allclose(double.bg_weight, np.exp(-1.5 * 0.6 * 2 * norm),
                             atol=1e-5)
  # Equivalently: twice the direction is twice the density.
  for mode_bg in (bg, None):
    a = rendering.composite(rgb, sigma, t, 2.0 * d, mode_bg)
    b = rendering.composite(rgb, 2.0 * sigma, t, d, mode_bg)
    chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0)


def test_zero_density_image_mode_is_exactly_background():
  rgb, _, t, directions = _random_inputs(jax.random.PRNGKey(2))
  background = jax.random.uniform(jax.random.PRNGKey(3), (6, 3))
  out = rendering.composite(rgb, jnp.zeros(t.shape), t, directions, background)
  np.testing.assert_array_equal(out.rgb, background)
  np.testing.assert_array_equal(out.acc, 0.0)
  np.testing.assert_array_equal(out.bg_weight, 1.0)
  np.testing.assert_array_equal(out.depth, t[:, -1])


def test_zero_density_none_mode_is_empty():
  rgb, _, t, directions = _random_inputs(jax.random.PRNGKey(4))
  out = rendering.composite(rgb, jnp.zeros(t.shape), t, directions)
  np.testing.assert_array_equal(out.rgb, 0.0)
  np.testing.assert_array_equal(out.acc, 0.0)
  np.testing.assert_array_equal(out.bg_weight, 1.0)
  np.testing.assert_array_equal(out.depth, 0.0)


@pytest.mark.parametrize('mode', MODES)
def test_opaque_first_sample_returns_its_colour(mode):
  rgb, sigma, t, directions = _random_inputs(jax.random.PRNGKey(5))
  sigma = sigma.at[:, 0].set(1e8)
  out = rendering.composite(rgb, sigma, t, directions, _bg(mode, (6,)))
  chex.assert_trees_all_close(out.rgb, rgb[:, 0], atol=1e-5, rtol=0)
  chex.assert_trees_all_close(out.acc, jnp.ones(6), atol=1e-5, rtol=0)
  chex.assert_trees_all_close(out.bg_weight, jnp.zeros(6), atol=1e-5, rtol=0)
  chex.assert_trees_all_close(out.depth, t[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize('mode', MODES)
def test_thin_opaque_shell_depth(mode):
  # A single dense sample (optical thickness about 40) in front of emptiness.
  num, shell = 65, 23
  t = jnp.broadcast_to(jnp.linspace(0.2, 0.8, num), (3, num))
  sigma = jnp.zeros((3, num)).at[:, shell].set(4000.0)
  directions = jnp.array([[0, 0, -1.0], [0.2, 0.1, -1], [-0.3, 0.2, -1]])
  out = rendering.composite(jnp.full((3, num, 3), 0.5), sigma, t, directions,
                            _bg(mode, (3,)))
  chex.assert_trees_all_close(out.depth, t[:, shell], atol=1e-5, rtol=0)
  chex.assert_trees_all_close(out.acc, jnp.ones(3), atol=1e-5, rtol=0)


def test_image_mode_weights_sum_to_one():
  for seed in range(3):
    rgb, sigma, t, directions = _random_inputs(jax.random.PRNGKey(10 + seed),
                                               num_rays=32, num=16)
    sigma = sigma * 10.0**(seed - 1)  # From thin to nearly opaque.
    out = rendering.composite(rgb, sigma, t, directions, _bg('image', (32,)))
    chex.assert_trees_all_close(jnp.sum(out.weights, -1), jnp.ones(32),
                                atol=1e-5, rtol=0)
    chex.assert_trees_all_close(out.acc + out.bg_weight, jnp.ones(32),
                                atol=1e-5, rtol=0)
    assert np.all(np.asarray(out.weights) >= 0)


def test_density_without_noise_is_relu():
  raw = jax.random.normal(jax.random.PRNGKey(6), (4, 8))
  np.testing.assert_array_equal(rendering.density(raw, None, 0.5),
                                jax.nn.relu(raw))
  np.testing.assert_array_equal(
      rendering.density(raw, jax.random.PRNGKey(0), 0.0), jax.nn.relu(raw))


def test_density_noise_has_requested_std():
  raw = jnp.full((64, 64), 100.0)  # Far from the ReLU's kink.
  sigma = rendering.density(raw, jax.random.PRNGKey(7), 0.3)
  noise = np.asarray(sigma - raw, np.float64)
  # 4096 draws: the std is known to about 1.1%, the mean to 0.005.
  assert abs(noise.std() - 0.3) < 0.015, noise.std()
  assert abs(noise.mean()) < 0.02, noise.mean()
  assert np.all(np.asarray(rendering.density(raw - 100.0, jax.random.PRNGKey(
      7), 0.3)) >= 0)


def test_bfloat16_inputs_are_composited_in_float32():
  """bfloat16 network outputs are composited in float32: the result equals
  the float32 quadrature of the same (rounded) values exactly (a bfloat16
  cumulative product would not), and stays within bfloat16's rounding of the
  unrounded result."""
  rgb, sigma, t, directions = _random_inputs(jax.random.PRNGKey(8))
  rgb16, sigma16 = rgb.astype(jnp.bfloat16), sigma.astype(jnp.bfloat16)
  background = _bg('image', (6,))
  out = rendering.composite(rgb16, sigma16, t, directions, background)
  rounded = rendering.composite(rgb16.astype(jnp.float32),
                                sigma16.astype(jnp.float32), t, directions,
                                background)
  chex.assert_trees_all_equal(out, rounded)
  exact = rendering.composite(rgb, sigma, t, directions, background)
  chex.assert_trees_all_close(out.rgb, exact.rgb, atol=2e-2)
  assert rendering.density(sigma16, None, 0.0).dtype == jnp.float32


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('zero_density', [False, True])
def test_gradients_are_finite(mode, zero_density):
  rgb, sigma, t, directions = _random_inputs(jax.random.PRNGKey(9))
  if zero_density:
    sigma = jnp.zeros_like(sigma)
  background = _bg(mode, (6,))

  def loss(c, s):
    out = rendering.composite(c, s, t, directions, background)
    return (jnp.sum(out.rgb**2) + jnp.sum(out.depth) + jnp.sum(out.acc) +
            jnp.sum(out.bg_weight))

  grads = jax.grad(loss, argnums=(0, 1))(rgb, sigma)
  chex.assert_tree_all_finite(grads)
  # Also through the noisy density, as in training.
  grad_raw = jax.grad(lambda r: loss(rgb, rendering.density(
      r, jax.random.PRNGKey(0), 0.1)))(sigma - 0.05)
  chex.assert_tree_all_finite(grad_raw)


@pytest.mark.parametrize('mode', MODES)
def test_colour_gradient_is_the_weight(mode):
  # d rgb_out / d c_i = w_i, except the background sample in 'image' mode.
  rgb, sigma, t, directions = _random_inputs(jax.random.PRNGKey(11))
  background = _bg(mode, (6,))
  grad = jax.grad(lambda c: jnp.sum(rendering.composite(
      c, sigma, t, directions, background).rgb[:, 0]))(rgb)
  weights = rendering.composite(rgb, sigma, t, directions, background).weights
  if mode == 'image':
    weights = weights.at[:, -1].set(0.0)
  chex.assert_trees_all_close(grad[..., 0], weights, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(grad[..., 1:], 0.0)


def test_jit_and_broadcast_background():
  rgb, sigma, t, directions = _random_inputs(jax.random.PRNGKey(12))
  # One background colour for all rays broadcasts like a per-ray one.
  eager = rendering.composite(rgb, sigma, t, directions, _bg('image', (6,)))
  jitted = jax.jit(rendering.composite)(rgb, sigma, t, directions,
                                        jnp.array([0.2, 0.5, 0.9]))
  chex.assert_trees_all_close(jitted, eager, atol=1e-6, rtol=0)
