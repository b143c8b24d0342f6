"""Tests of nerface_jax.encoding against the per-element NeRF formula."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nerface_jax import encoding


def _brute_force(x, num_freqs, include_input):
  """Builds the encoding channel by channel in float64."""
  x = np.asarray(x, np.float64)
  d = x.shape[-1]
  channels = []
  if include_input:
    channels += [x[..., c] for c in range(d)]
  for k in range(num_freqs):
    channels += [np.sin(2.0**k * x[..., c]) for c in range(d)]
    channels += [np.cos(2.0**k * x[..., c]) for c in range(d)]
  if not channels:
    return np.zeros((*x.shape[:-1], 0))
  return np.stack(channels, axis=-1)


def test_default_dimensions():
  x = jnp.zeros((2, 3))
  chex.assert_shape(encoding.positional_encoding(x, 10), (2, 63))
  chex.assert_shape(encoding.positional_encoding(x, 4, include_input=False),
                    (2, 24))
  assert encoding.encoded_dim(3, 10) == 63
  assert encoding.encoded_dim(3, 4, include_input=False) == 24
  assert encoding.encoded_dim(76, 0) == 76


@pytest.mark.parametrize('num_freqs,include_input,dim',
                         [(10, True, 3), (4, False, 3), (2, True, 1),
                          (0, True, 2), (3, False, 5)])
def test_values_match_formula(num_freqs, include_input, dim):
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 4, dim), minval=-1.5,
                         maxval=1.5)
  out = encoding.positional_encoding(x, num_freqs, include_input)
  chex.assert_shape(out, (2, 4, encoding.encoded_dim(dim, num_freqs,
                                                     include_input)))
  assert out.dtype == jnp.float32
  chex.assert_trees_all_close(
      out, _brute_force(x, num_freqs, include_input).astype(np.float32),
      atol=1e-5, rtol=0)


def test_no_pi_factor():
  # sin(2^0 * pi) would be 0 with a pi factor; without it, it is sin(pi).
  out = encoding.positional_encoding(jnp.array([[1.0]]), 1,
                                     include_input=False)
  chex.assert_trees_all_close(out, jnp.array([[np.sin(1.0), np.cos(1.0)]]),
                              atol=1e-6, rtol=0)


def test_jit_and_vmap_agree_with_eager():
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 3))
  eager = encoding.positional_encoding(x, 6)
  jitted = jax.jit(encoding.positional_encoding, static_argnums=(1, 2))(
      x, 6, True)
  vmapped = jax.vmap(lambda v: encoding.positional_encoding(v, 6))(x)
  chex.assert_trees_all_close(jitted, eager, atol=1e-6, rtol=0)
  chex.assert_trees_all_close(vmapped, eager, atol=1e-6, rtol=0)
