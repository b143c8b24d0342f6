"""Tests of latent-code choice and test-time fitting."""

import jax
import numpy as np
import pytest

from nerface_jax import avatar as avatar_lib
from nerface_jax import evaluation
from nerface_jax import latents
from nerface_jax import sampler


def test_shared_codes():
  gamma = np.arange(12, dtype=np.float32).reshape(4, 3)
  params = {'latent': {'gamma': gamma}}
  np.testing.assert_array_equal(latents.shared_code(params, 'mean'),
                                gamma.mean(0))
  np.testing.assert_array_equal(latents.shared_code(params, 'zero'),
                                np.zeros(3))
  np.testing.assert_array_equal(latents.shared_code(params, 'fixed', 2),
                                gamma[2])
  with pytest.raises(ValueError, match='latent_frame = 4'):
    latents.shared_code(params, 'fixed', 4)
  with pytest.raises(ValueError, match="'optimize'"):
    latents.shared_code(params, 'optimize')
  # A model without codes gets zeros of the configured length.
  np.testing.assert_array_equal(latents.shared_code({}, 'mean', 0, 5),
                                np.zeros(5))


def test_the_fit_lowers_its_loss(trained_avatar):
  avatar = trained_avatar
  dataset = avatar_lib.load_dataset(avatar, 'val')
  fit = latents.make_latent_fitter(avatar.config, avatar.model,
                                   avatar.host_params)
  device_data = jax.device_put(sampler.prepare(
      dataset.images, dataset.c2w, dataset.expressions, dataset.bboxes,
      dataset.background, dataset.intrinsics, 0.9))
  init = np.tile(avatar.shared_code('mean'), (2, 1))
  codes, trace = fit(device_data, np.int32([0, 0]), init,
                     jax.random.PRNGKey(0))
  assert codes.shape == init.shape
  trace = np.asarray(trace)
  assert trace[-3:].mean() < trace[:3].mean()


def test_a_fitted_code_beats_the_mean_code_on_its_frame(trained_avatar):
  """The built-in person's light drifts per frame, which only the code can
  hold: fitting it to a test frame must raise that frame's PSNR."""
  avatar = trained_avatar
  config = avatar.config.copy_and_resolve_references()
  config.eval.optimize_steps = 60
  test = avatar_lib.load_dataset(avatar, 'test')
  frames = np.array([0, test.num_frames - 1])
  fitted = latents.optimize_latents(config, avatar.model, avatar.host_params,
                                    test, frames)
  mean = np.tile(avatar.shared_code('mean'), (test.num_frames, 1))
  codes = mean.copy()
  codes[frames] = fitted
  scores = {name: evaluation.score_frames(avatar.renderer, test, c, frames)
            for name, c in (('mean', mean), ('fitted', codes))}
  for i in range(len(frames)):
    assert (scores['fitted']['frames'][i]['psnr'] >
            scores['mean']['frames'][i]['psnr']), scores
