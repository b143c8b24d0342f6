"""Tests of nerface_jax.sampling: stratified, inverse-CDF and resampling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import sampling

# A piecewise-constant pdf with an empty bin in the middle and uneven widths.
BINS = np.array([0.0, 0.1, 0.35, 0.5, 0.9, 1.0], np.float32)
WEIGHTS = np.array([1.0, 3.0, 0.0, 2.0, 4.0], np.float32)


def _exact_cdf(x, bins, weights):
  """CDF of the piecewise-constant pdf at points x (float64)."""
  bins = np.asarray(bins, np.float64)
  mass = np.asarray(weights, np.float64) / np.sum(weights)
  edges_cdf = np.concatenate([[0.0], np.cumsum(mass)])
  return np.interp(x, bins, edges_cdf)


def _exact_quantile(u, bins, weights):
  """Right-continuous inverse CDF, inf{x : F(x) > u}, by a loop over bins."""
  bins = np.asarray(bins, np.float64)
  mass = np.asarray(weights, np.float64) / np.sum(weights)
  lo = 0.0
  for b, m in enumerate(mass):
    if m > 0 and u < lo + m:
      return bins[b] + (u - lo) / m * (bins[b + 1] - bins[b])
    lo += m
  return bins[-1]


def test_stratified_deterministic_is_linspace():
  t = sampling.stratified(None, 0.2, 0.8, (3, 2), 11)
  chex.assert_shape(t, (3, 2, 11))
  assert t.dtype == jnp.float32
  expected = np.broadcast_to(np.linspace(0.2, 0.8, 11), (3, 2, 11))
  chex.assert_trees_all_close(t, expected.astype(np.float32), atol=1e-6,
                              rtol=0)
  # Both ends exactly: the last sample is where the background sits.
  assert np.all(np.asarray(t[..., 0]) == np.float32(0.2))
  assert np.all(np.asarray(t[..., -1]) == np.float32(0.8))


def test_stratified_per_ray_near_far():
  near = jnp.array([0.1, 0.3, 0.5])
  far = jnp.array([0.6, 0.9, 2.0])
  t = sampling.stratified(None, near, far, (3,), 5)
  for r in range(3):
    np.testing.assert_allclose(t[r], np.linspace(near[r], far[r], 5),
                               atol=1e-6)


def test_stratified_jitter_stays_in_its_interval():
  near, far, num = 0.2, 0.8, 8
  t = sampling.stratified(jax.random.PRNGKey(0), near, far, (500,), num)
  chex.assert_shape(t, (500, num))
  grid = np.linspace(near, far, num)
  mids = 0.5 * (grid[1:] + grid[:-1])
  lower = np.concatenate([[near], mids])
  upper = np.concatenate([mids, [far]])
  t = np.asarray(t, np.float64)
  assert np.all(t >= lower - 1e-6) and np.all(t <= upper + 1e-6)
  assert np.all(np.diff(t, axis=-1) >= 0)
  assert np.all((t >= np.float32(near)) & (t <= np.float32(far)))
  # Uniform within each interval: the relative position has mean 1/2 and
  # variance 1/12 (500 rays: standard errors 0.013 and 0.004).
  rel = (t - lower) / (upper - lower)
  np.testing.assert_allclose(rel.mean(axis=0), 0.5, atol=0.06)
  np.testing.assert_allclose(rel.var(), 1.0 / 12.0, atol=0.01)
  # A different key gives different samples.
  t2 = sampling.stratified(jax.random.PRNGKey(1), near, far, (500,), num)
  assert np.abs(t - np.asarray(t2)).max() > 1e-3


def test_sample_pdf_deterministic_is_exact_quantile():
  # u = k / 12 avoids the cdf's break points, where the quantile jumps.
  num = 13
  t = sampling.sample_pdf(None, BINS, WEIGHTS, num)
  chex.assert_shape(t, (num,))
  u = np.linspace(0.0, 1.0, num)
  expected = [_exact_quantile(min(v, 1 - 1e-12), BINS, WEIGHTS) for v in u]
  np.testing.assert_allclose(t, expected, atol=1e-5)


def test_sample_pdf_follows_pdf_kolmogorov_smirnov():
  n_rays, n_samples = 4, 5000
  bins = np.broadcast_to(BINS, (n_rays, len(BINS)))
  # Unnormalised on purpose: each ray scales the same pdf differently.
  weights = WEIGHTS * np.arange(1, n_rays + 1, dtype=np.float32)[:, None]
  t = sampling.sample_pdf(jax.random.PRNGKey(0), bins, weights, n_samples)
  chex.assert_shape(t, (n_rays, n_samples))
  x = np.sort(np.asarray(t, np.float64).ravel())
  n = x.size
  cdf = _exact_cdf(x, BINS, WEIGHTS)
  ks = max(np.max(np.arange(1, n + 1) / n - cdf),
           np.max(cdf - np.arange(n) / n))
  # 1.95 / sqrt(n) is the 0.1% critical value; a wrong pdf exceeds it by far.
  assert ks < 1.95 / np.sqrt(n), ks
  # The empty bin (0.35, 0.5) receives nothing.
  assert not np.any((x > BINS[2] + 1e-6) & (x < BINS[3] - 1e-6))


@pytest.mark.parametrize('key', [None, jax.random.PRNGKey(3)])
def test_sample_pdf_all_mass_in_one_bin(key):
  num_bins = 6
  bins = np.sort(np.random.default_rng(0).uniform(0, 1, (num_bins, num_bins + 1)
                                                 ), axis=-1).astype(np.float32)
  weights = np.eye(num_bins, dtype=np.float32) * 0.3  # Ray k: all in bin k.
  t = np.asarray(sampling.sample_pdf(key, bins, weights, 17))
  for k in range(num_bins):
    assert np.all(t[k] >= bins[k, k]) and np.all(t[k] <= bins[k, k + 1]), k
  if key is None:
    # Deterministic u spreads the samples evenly across that bin.
    for k in range(num_bins):
      np.testing.assert_allclose(
          t[k], np.linspace(bins[k, k], bins[k, k + 1], 17), atol=1e-5)


def test_sample_pdf_sorted_inside_range_any_batch_shape():
  rng = np.random.default_rng(1)
  bins = np.sort(rng.uniform(0.2, 0.8, (2, 3, 9)), axis=-1).astype(np.float32)
  weights = rng.uniform(0, 1, (2, 3, 8)).astype(np.float32)
  weights[weights < 0.4] = 0.0  # Empty bins too.
  t = np.asarray(sampling.sample_pdf(jax.random.PRNGKey(2), bins, weights, 32))
  chex.assert_shape(t, (2, 3, 32))
  assert np.all(np.diff(t, axis=-1) >= 0)
  assert np.all(t >= bins[..., :1]) and np.all(t <= bins[..., -1:])
  # Every sample sits in a bin of positive weight.
  idx = np.clip(np.sum(t[..., :, None] > bins[..., None, 1:], -1), 0, 7)
  assert np.all(np.take_along_axis(weights, idx, -1) > 0)


def test_sample_pdf_zero_weights_sample_uniformly():
  bins = np.linspace(0.2, 0.8, 9, dtype=np.float32)
  t = sampling.sample_pdf(None, bins, np.zeros(8, np.float32), 7)
  np.testing.assert_allclose(t, np.linspace(0.2, 0.8, 7), atol=1e-5)
  t = sampling.sample_pdf(jax.random.PRNGKey(0), bins, np.zeros(8), 64)
  chex.assert_tree_all_finite(t)


def test_sample_pdf_has_zero_gradient():
  bins = jnp.asarray(BINS)
  weights = jnp.asarray(WEIGHTS)

  def total(b, w):
    return jnp.sum(sampling.sample_pdf(jax.random.PRNGKey(0), b, w, 16) ** 2)

  grad_b, grad_w = jax.grad(total, argnums=(0, 1))(bins, weights)
  np.testing.assert_array_equal(grad_b, 0.0)
  np.testing.assert_array_equal(grad_w, 0.0)


def test_sample_pdf_jit_matches_eager():
  key = jax.random.PRNGKey(4)
  eager = sampling.sample_pdf(key, BINS, WEIGHTS, 9)
  jitted = jax.jit(sampling.sample_pdf, static_argnums=3)(key, BINS, WEIGHTS,
                                                          9)
  chex.assert_trees_all_close(jitted, eager, atol=1e-6, rtol=0)


@pytest.mark.parametrize('key', [None, jax.random.PRNGKey(5)])
def test_resample(key):
  num_rays, num_coarse, num_fine = 3, 8, 12
  t = sampling.stratified(jax.random.PRNGKey(6), 0.2, 0.8, (num_rays,),
                          num_coarse)
  # Coarse weights peaked at sample 3, with a large background weight last
  # (which resampling must ignore).
  weights = jnp.zeros((num_rays, num_coarse)).at[:, 3].set(0.6)
  weights = weights.at[:, -1].set(0.4)
  t_all = sampling.resample(key, t, weights, num_fine)
  chex.assert_shape(t_all, (num_rays, num_coarse + num_fine))
  t_all, t = np.asarray(t_all), np.asarray(t)
  assert np.all(np.diff(t_all, axis=-1) >= 0)
  for r in range(num_rays):
    assert np.all(np.isin(t[r], t_all[r]))
  # First and last coarse samples stay first and last.
  np.testing.assert_array_equal(t_all[:, 0], t[:, 0])
  np.testing.assert_array_equal(t_all[:, -1], t[:, -1])
  # The fine samples go between the midpoints around sample 3, except at
  # most the two extreme quantiles (u = 0 and u = 1 reach the 1e-5 padding).
  mids = 0.5 * (t[:, 1:] + t[:, :-1])
  for r in range(num_rays):
    fine = np.setdiff1d(t_all[r], t[r])
    inside = (fine >= mids[r, 2] - 1e-6) & (fine <= mids[r, 3] + 1e-6)
    assert np.sum(inside) >= num_fine - 2, (r, fine)


def test_resample_has_zero_gradient():
  t = sampling.stratified(None, 0.2, 0.8, (2,), 6)
  weights = jnp.linspace(0.0, 1.0, 12).reshape(2, 6)

  def total(tt, w):
    return jnp.sum(sampling.resample(jax.random.PRNGKey(0), tt, w, 5))

  grad_t, grad_w = jax.grad(total, argnums=(0, 1))(t, weights)
  np.testing.assert_array_equal(grad_t, 0.0)
  np.testing.assert_array_equal(grad_w, 0.0)
