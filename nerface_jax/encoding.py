"""Sinusoidal positional encoding in the original NeRF layout."""

import chex
import jax.numpy as jnp


def encoded_dim(dim: int, num_freqs: int, include_input: bool = True) -> int:
  """Width of `positional_encoding` for a D-wide input.

  Args:
    dim: int D, channels of the raw input.
    num_freqs: int, octaves of the encoding.
    include_input: whether the raw input is kept in front.

  Returns:
    int D * (include_input + 2 * num_freqs), e.g. 63 for (3, 10, True) and
    24 for (3, 4, False).
  """
  return dim * (int(include_input) + 2 * num_freqs)


def positional_encoding(x: chex.Array, num_freqs: int,
                        include_input: bool = True) -> chex.Array:
  """Encodes x as [x, sin(x), cos(x), sin(2x), cos(2x), ...].

  The frequencies are 2^0 ... 2^(num_freqs - 1) without a factor of pi, the
  layout of the original NeRF (and NeRFace) code, so weights trained there
  would line up channel for channel.

  Args:
    x: float [..., D] input (float32 unless a float dtype is given).
    num_freqs: int, octaves of the encoding (0 leaves only the input).
    include_input: whether x itself is the first block.

  Returns:
    float [..., D * (include_input + 2 * num_freqs)] in blocks of D channels:
    x (optional), then sin and cos for each octave in increasing order.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(jnp.float32)
  blocks = [x] if include_input else []
  if num_freqs > 0:
    # Powers of two scale float32 exactly, so each argument is bit-identical
    # to x * 2**k however the product is formed.
    freqs = 2.0**jnp.arange(num_freqs, dtype=x.dtype)
    scaled = x[..., None, :] * freqs[:, None]  # [..., num_freqs, D]
    sincos = jnp.stack([jnp.sin(scaled), jnp.cos(scaled)], axis=-2)
    blocks.append(sincos.reshape(*x.shape[:-1], 2 * num_freqs * x.shape[-1]))
  if not blocks:
    return jnp.zeros((*x.shape[:-1], 0), x.dtype)
  return jnp.concatenate(blocks, axis=-1)
