"""Sample depths along rays: stratified (coarse) and inverse-CDF (fine)."""

from typing import Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp

Scalar = Union[float, chex.Array]


def stratified(key: Optional[chex.PRNGKey], near: Scalar, far: Scalar,
               shape: Sequence[int], num_samples: int) -> chex.Array:
  """Coarse sample depths between near and far.

  Args:
    key: PRNG key for jitter, or None for the deterministic samples.
    near: float or float array broadcastable to `shape`, first depth.
    far: float or float array broadcastable to `shape`, last depth.
    shape: batch shape of the rays, e.g. (R,) or (H, W).
    num_samples: int S.

  Returns:
    float32 [*shape, S] sorted depths in [near, far]. Without a key they are
    linspace(near, far, S) with both ends included (the original NeRF: in
    'image' mode the last one, at far, carries the background). With a key each
    depth is uniform in its own interval, whose edges are the midpoints between
    neighbouring deterministic depths (near and far at the ends).
  """
  shape = tuple(shape)
  near = jnp.broadcast_to(jnp.asarray(near, jnp.float32), shape)[..., None]
  far = jnp.broadcast_to(jnp.asarray(far, jnp.float32), shape)[..., None]
  u = jnp.linspace(0.0, 1.0, num_samples, dtype=jnp.float32)
  # This form is exact at both ends (u = 0 gives near, u = 1 gives far).
  t = near * (1.0 - u) + far * u
  if key is None:
    return t
  mids = 0.5 * (t[..., 1:] + t[..., :-1])
  lower = jnp.concatenate([t[..., :1], mids], axis=-1)
  upper = jnp.concatenate([mids, t[..., -1:]], axis=-1)
  r = jax.random.uniform(key, t.shape, jnp.float32)
  # The clip only guards against rounding, so neighbours can never swap.
  return jnp.clip(lower + (upper - lower) * r, lower, upper)


def _searchsorted_right(sorted_rows: chex.Array, queries: chex.Array,
                        method: str) -> chex.Array:
  """searchsorted(side='right') per row: [..., K], [..., N] -> int [..., N]."""
  batch = sorted_rows.shape[:-1]
  rows = sorted_rows.reshape(-1, sorted_rows.shape[-1])
  qs = queries.reshape(-1, queries.shape[-1])
  # jnp.searchsorted only takes a 1-D sorted array, hence the vmap.
  idx = jax.vmap(lambda a, v: jnp.searchsorted(a, v, side='right',
                                               method=method))(rows, qs)
  return idx.reshape(*batch, queries.shape[-1])


def sample_pdf(key: Optional[chex.PRNGKey], bins: chex.Array,
               weights: chex.Array, num_samples: int,
               search_method: str = 'scan') -> chex.Array:
  """Inverse-CDF samples of a piecewise-constant pdf.

  Args:
    key: PRNG key, or None for the deterministic u = linspace(0, 1, N).
    bins: float [..., B + 1] sorted bin edges.
    weights: float [..., B] non-negative bin weights (normalised here; rays
      whose weights are all zero sample uniformly).
    num_samples: int N.
    search_method: `method` of jnp.searchsorted ('scan', 'compare_all', ...).

  Returns:
    float32 [..., N] sorted samples inside [bins[..., 0], bins[..., -1]], each
    inside a bin of positive weight; no gradient flows to bins or weights.
  """
  # Fine samples only choose where to look; NeRF trains no gradient through
  # them, and the integer bin search would give none anyway.
  bins = jax.lax.stop_gradient(jnp.asarray(bins, jnp.float32))
  weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
  weights = jnp.maximum(weights, 0.0)
  batch = jnp.broadcast_shapes(bins.shape[:-1], weights.shape[:-1])
  bins = jnp.broadcast_to(bins, (*batch, bins.shape[-1]))
  weights = jnp.broadcast_to(weights, (*batch, weights.shape[-1]))

  total = jnp.sum(weights, axis=-1, keepdims=True)
  weights = jnp.where(total > 0, weights, jnp.ones_like(weights))
  csum = jnp.cumsum(weights, axis=-1)
  # Dividing by the running sum's own last entry makes the cdf end at exactly
  # 1 and hold exactly 1 over trailing empty bins, so no sample lands there.
  cdf = jnp.concatenate(
      [jnp.zeros((*batch, 1), jnp.float32), csum / csum[..., -1:]], axis=-1)

  if key is None:
    u = jnp.linspace(0.0, 1.0, num_samples, dtype=jnp.float32)
    u = jnp.broadcast_to(u, (*batch, num_samples))
  else:
    # Sorted u gives sorted samples: the inverse cdf is monotone.
    u = jnp.sort(jax.random.uniform(key, (*batch, num_samples), jnp.float32),
                 axis=-1)
  # With u < 1 the bin found below always has cdf[b] <= u < cdf[b + 1], i.e.
  # positive mass (u = 1 would fall past trailing empty bins).
  u = jnp.minimum(u, jnp.nextafter(jnp.float32(1.0), jnp.float32(0.0)))

  idx = _searchsorted_right(cdf[..., 1:], u, search_method)
  idx = jnp.clip(idx, 0, weights.shape[-1] - 1)
  cdf_lo = jnp.take_along_axis(cdf, idx, axis=-1)
  cdf_hi = jnp.take_along_axis(cdf, idx + 1, axis=-1)
  bin_lo = jnp.take_along_axis(bins, idx, axis=-1)
  bin_hi = jnp.take_along_axis(bins, idx + 1, axis=-1)
  denom = cdf_hi - cdf_lo
  frac = (u - cdf_lo) / jnp.where(denom > 0, denom, 1.0)
  frac = jnp.clip(frac, 0.0, 1.0)
  samples = bin_lo + frac * (bin_hi - bin_lo)
  return jax.lax.stop_gradient(jnp.clip(samples, bin_lo, bin_hi))


def resample(key: Optional[chex.PRNGKey], t: chex.Array, weights: chex.Array,
             num_fine: int, search_method: str = 'scan') -> chex.Array:
  """The NeRF coarse-to-fine step: add samples where the coarse weights are.

  Args:
    key: PRNG key, or None for deterministic fine samples.
    t: float [..., S] sorted coarse depths.
    weights: float [..., S] coarse compositing weights.
    num_fine: int N, fine samples to add.
    search_method: `method` of jnp.searchsorted.

  Returns:
    float32 [..., S + N] sorted depths: t and the fine samples. The fine
    samples lie between the midpoints of t, so t's first and last samples stay
    first and last (the last one keeps the background in 'image' mode). No
    gradient flows to t or weights.
  """
  t = jax.lax.stop_gradient(jnp.asarray(t, jnp.float32))
  weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
  bins = 0.5 * (t[..., 1:] + t[..., :-1])
  # The original drops the first and last weights (the last is the background
  # in 'image' mode) and pads with 1e-5 so no interval is ever impossible.
  pdf_weights = weights[..., 1:-1] + 1e-5
  t_fine = sample_pdf(key, bins, pdf_weights, num_fine, search_method)
  return jnp.sort(jnp.concatenate([t, t_fine], axis=-1), axis=-1)
