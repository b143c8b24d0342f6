"""Tests of the training losses."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import losses


def test_mse_matches_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.random((2, 10, 3)).astype(np.float32)
  chex.assert_trees_all_close(losses.mse(a, b), np.mean((a - b) ** 2),
                              rtol=1e-6)


def test_latent_prior_is_mean_norm_with_finite_gradient_at_zero():
  codes = np.float32([[3, 4], [0, 0], [6, 8]])
  chex.assert_trees_all_close(losses.latent_prior(codes), 5.0, rtol=1e-6)
  grad = jax.grad(losses.latent_prior)(jnp.zeros((4, 32)))
  chex.assert_tree_all_finite(grad)
  chex.assert_trees_all_close(grad, jnp.zeros((4, 32)))


def test_squared_prior_is_mean_squared_norm_with_its_gradient():
  codes = np.float32([[3, 4], [0, 0], [6, 8]])
  chex.assert_trees_all_close(losses.latent_prior(codes, 'squared'),
                              125.0 / 3, rtol=1e-6)
  grad = jax.grad(lambda c: losses.latent_prior(c, 'squared'))(codes)
  chex.assert_trees_all_close(grad, 2 * codes / 3, rtol=1e-6)


def test_unknown_prior_is_an_error():
  with pytest.raises(ValueError, match='latent_prior'):
    losses.latent_prior(np.zeros((2, 3), np.float32), 'l1')


def test_psnr_known_values():
  chex.assert_trees_all_close(losses.psnr(jnp.float32(0.01)), 20.0, rtol=1e-6)
  chex.assert_trees_all_close(losses.psnr(jnp.float32(1.0)), 0.0, atol=1e-6)
  assert np.isfinite(losses.psnr(jnp.float32(0.0)))
