"""Training losses and the PSNR used in logs (pure jax.numpy)."""

from typing import Optional

import chex
import jax.numpy as jnp

from nerface_jax import config_lib
from nerface_jax import types


def mse(prediction: chex.Array, target: chex.Array) -> chex.Array:
  """Mean squared error over all elements.

  Args:
    prediction: float [..., 3].
    target: float [..., 3], same shape.

  Returns:
    float32 scalar.
  """
  chex.assert_equal_shape([prediction, target])
  return jnp.mean(jnp.square(prediction.astype(jnp.float32) - target))


def level_mses(coarse: Optional[types.Renderings], fine: types.Renderings,
               target: chex.Array) -> dict[str, chex.Array]:
  """The photometric loss of every level: {'mse_coarse', 'mse_fine'}.

  Args:
    coarse: the coarse level's Renderings of R rays, or None for a model
      with one level (no 'mse_coarse' then).
    fine: the fine level's Renderings.
    target: float [R, 3].

  Returns:
    float32 scalars; the training loss is their sum.
  """
  out = {'mse_fine': mse(fine.rgb, target)}
  if coarse is not None:
    out['mse_coarse'] = mse(coarse.rgb, target)
  return out


PRIORS = config_lib.CHOICES['train.latent_prior']


def latent_prior(codes: chex.Array, kind: str = 'norm') -> chex.Array:
  """Mean L2 norm (or squared norm) of the latent codes used by a batch.

  The original adds `0.005 * ||gamma_i||_2` for the one frame of a step; with
  rays from many frames each ray contributes its frame's norm, so frames are
  weighted by how many rays they have in the batch.

  Args:
    codes: float [R, L] the gamma row of each ray's frame.
    kind: 'norm' (||gamma||, the original) or 'squared' (||gamma||^2, a
      Gaussian prior whose pull vanishes near zero instead of staying
      constant).

  Returns:
    float32 scalar.
  """
  squares = jnp.sum(jnp.square(codes.astype(jnp.float32)), axis=-1)
  if kind == 'squared':
    return jnp.mean(squares)
  if kind != 'norm':
    raise ValueError(f'train.latent_prior must be one of {PRIORS}, got '
                     f'{kind!r}.')
  # sqrt has an infinite gradient at 0 and gamma starts at zero: the
  # epsilon keeps the first step's gradient finite (and zero).
  return jnp.mean(jnp.sqrt(squares + 1e-12))


def psnr(mse_value: chex.Array) -> chex.Array:
  """PSNR in dB of a mean squared error of colours in [0, 1]."""
  return -10.0 * jnp.log10(jnp.maximum(mse_value, 1e-10))
