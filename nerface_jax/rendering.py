"""Volume-rendering quadrature with NeRFace's background at the ray's end."""

from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from nerface_jax import types

# The original NeRF's stand-in for an infinite last interval ('none' mode).
FAR_INTERVAL = 1e10


def density(raw: chex.Array, key: Optional[chex.PRNGKey],
            noise_std: float) -> chex.Array:
  """Volume density from the network's raw output.

  Args:
    raw: float [..., S] raw density logits (any float dtype).
    key: PRNG key for the regularising noise, or None (evaluation).
    noise_std: float, std of the Gaussian noise added to raw before the ReLU;
      0 disables it.

  Returns:
    float32 [..., S] sigma = relu(raw + noise) >= 0.
  """
  raw = jnp.asarray(raw, jnp.float32)
  no_noise = isinstance(noise_std, (int, float)) and noise_std <= 0
  if key is None or no_noise:
    return jax.nn.relu(raw)
  noise = noise_std * jax.random.normal(key, raw.shape, jnp.float32)
  return jax.nn.relu(raw + noise)


def composite(rgb: chex.Array,
              sigma: chex.Array,
              t: chex.Array,
              directions: chex.Array,
              background: Optional[chex.Array] = None) -> types.Renderings:
  """Alpha-composites samples along rays (docs/architecture.md §4).

  alpha_i = 1 - exp(-sigma_i * delta_i) with delta_i = (t_{i+1} - t_i) * ||d||
  and w_i = alpha_i * prod_{k<i} (1 - alpha_k).

  With a background ('image' mode) the last sample's colour is replaced by the
  background pixel and its interval is infinite (alpha = 1), so the weights
  sum to 1 and rgb = sum_{i<S-1} w_i c_i + T_{S-1} * bg. Without one ('none'
  mode, the "no BG" ablation) it is an ordinary NeRF whose last interval is
  1e10, and whatever is not absorbed is black.

  Args:
    rgb: float [..., S, 3] sample colours in [0, 1] (any float dtype).
    sigma: float [..., S] non-negative densities.
    t: float [..., S] sorted sample depths.
    directions: float [..., 3] unnormalised ray directions.
    background: optional float [..., 3] background pixel behind each ray.

  Returns:
    Renderings with float32 rgb [..., 3], depth, acc, bg_weight [...] and
    weights, t [..., S]. acc is the foreground opacity (the first S-1 weights
    in 'image' mode, all S in 'none' mode), bg_weight the last weight
    ('image') or 1 - acc ('none'), depth = sum_i w_i t_i over all samples.
  """
  # Quadrature in float32 whatever the network's compute dtype.
  rgb = jnp.asarray(rgb, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  directions = jnp.asarray(directions, jnp.float32)

  norm = jnp.linalg.norm(directions, axis=-1, keepdims=True)
  delta = t[..., 1:] - t[..., :-1]
  delta = jnp.concatenate(
      [delta, jnp.full_like(delta[..., :1], FAR_INTERVAL)], axis=-1)
  # Unnormalised directions: t is depth, the distance travelled is t * ||d||.
  tau = sigma * (delta * norm)

  # Transmittance as exp of an exclusive running sum: exact where a product of
  # (1 - alpha) would round, and free of the 1e-10 fudge the original needs.
  # The last tau never enters it, so its 1e10 interval cannot overflow T.
  tau_before = jnp.concatenate(
      [jnp.zeros_like(tau[..., :1]), jnp.cumsum(tau[..., :-1], axis=-1)],
      axis=-1)
  trans = jnp.exp(-tau_before)
  alpha = -jnp.expm1(-tau)  # Accurate for tiny sigma * delta.

  if background is not None:
    alpha = alpha.at[..., -1].set(1.0)
    weights = alpha * trans
    bg = jnp.asarray(background, jnp.float32)
    bg = jnp.broadcast_to(bg[..., None, :], rgb[..., -1:, :].shape)
    colours = jnp.concatenate([rgb[..., :-1, :], bg], axis=-2)
    acc = jnp.sum(weights[..., :-1], axis=-1)
    bg_weight = weights[..., -1]
  else:
    weights = alpha * trans
    colours = rgb
    acc = jnp.sum(weights, axis=-1)
    bg_weight = 1.0 - acc

  rgb_out = jnp.sum(weights[..., None] * colours, axis=-2)
  depth = jnp.sum(weights * t, axis=-1)
  return types.Renderings(
      rgb=rgb_out, depth=depth, acc=acc, bg_weight=bg_weight, weights=weights,
      t=jnp.broadcast_to(t, weights.shape))


def composite_segment(rgb: chex.Array, sigma: chex.Array, t: chex.Array,
                      directions: chex.Array,
                      trans_in: chex.Array) -> Tuple[chex.Array, chex.Array,
                                                     chex.Array]:
  """Composites one run of consecutive samples of rays (rendering in passes).

  The samples of a ray split into runs composited one after the other give
  `composite`'s result: with T_0 = 1 and T_{j+1} the `trans_out` of run j,
  rgb = sum_j rgb_j + T_last * background (the last sample of `composite`
  in 'image' mode), depth likewise with far, acc = 1 - T_last. A ray whose
  T is negligible can stop: what it misses is at most T.

  Args:
    rgb: float [R, K, 3] colours of the run's K samples.
    sigma: float [R, K] densities.
    t: float [R, K + 1] their depths and the depth of the sample after the
      run (for the last run of a ray without background, t[-1] + 1e10).
    directions: float [R, 3] unnormalised ray directions.
    trans_in: float [R] transmittance in front of the run.

  Returns:
    rgb_sum float32 [R, 3], depth_sum float32 [R] (the run's weighted
    colour and depth) and trans_out float32 [R].
  """
  rgb = jnp.asarray(rgb, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  t = jnp.asarray(t, jnp.float32)
  norm = jnp.linalg.norm(jnp.asarray(directions, jnp.float32), axis=-1,
                         keepdims=True)
  tau = sigma * ((t[..., 1:] - t[..., :-1]) * norm)
  tau_before = jnp.concatenate(
      [jnp.zeros_like(tau[..., :1]), jnp.cumsum(tau[..., :-1], axis=-1)],
      axis=-1)
  weights = trans_in[..., None] * jnp.exp(-tau_before) * -jnp.expm1(-tau)
  trans_out = trans_in * jnp.exp(-jnp.sum(tau, axis=-1))
  return (jnp.sum(weights[..., None] * rgb, axis=-2),
          jnp.sum(weights * t[..., :-1], axis=-1), trans_out)
