"""Tests of chunked, sharded frame rendering."""

import chex
import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from nerface_jax import avatar as avatar_lib
from nerface_jax import renderer


def test_padding_over_four_devices_equals_one_device(trained_avatar):
  avatar = trained_avatar
  dataset = avatar_lib.load_dataset(avatar, 'val')
  inputs = renderer.dataset_inputs(dataset, 0, avatar.shared_code('mean'))
  out = {}
  for count in (1, 4):
    mesh = Mesh(np.asarray(jax.devices()[:count]), ('data',))
    # 24 * 24 = 576 pixels in chunks of 100: the last chunk is padded.
    render = renderer.Renderer.create(avatar.model, avatar.host_params, mesh,
                                      100)
    out[count] = render(inputs, dataset.height, dataset.width)
  chex.assert_trees_all_close(out[1], out[4], atol=1e-5)
  chex.assert_shape(out[4]['rgb'], (dataset.height, dataset.width, 3))
  chex.assert_shape(out[4]['depth'], (dataset.height, dataset.width))


def test_a_frame_equals_the_model_applied_to_its_rays(trained_avatar):
  """The chunked renderer is the model on the image's rays, pixel for pixel."""
  avatar = trained_avatar
  dataset = avatar_lib.load_dataset(avatar, 'test')
  code = avatar.shared_code('zero')
  out = avatar.render(renderer.dataset_inputs(dataset, 1, code))
  from nerface_jax import camera, types  # pylint: disable=g-import-not-at-top
  rays = camera.image_rays(dataset.intrinsics, dataset.c2w[1],
                           dataset.height, dataset.width)
  num = dataset.height * dataset.width
  flat = jax.tree.map(lambda x: x.reshape(num, 3), rays)
  batch = types.Batch(
      rays=flat, rgb=np.zeros((num, 3), np.float32),
      background=dataset.background.reshape(num, 3).astype(np.float32) / 255,
      expression=np.tile(dataset.expressions[1], (num, 1)),
      frame=np.zeros((num,), np.int32),
      latent=np.tile(code, (num, 1)))
  _, fine = avatar.model.apply({'params': avatar.host_params}, batch)
  chex.assert_trees_all_close(
      out['rgb'], np.asarray(fine.rgb).reshape(out['rgb'].shape), atol=1e-5)


def test_with_params_reuses_the_compiled_chunk(trained_avatar):
  render = trained_avatar.renderer
  other = render.with_params(jax.tree.map(np.zeros_like,
                                          trained_avatar.host_params))
  assert other.fns is render.fns
  assert not np.allclose(jax.tree.leaves(other.params)[0],
                         jax.tree.leaves(render.params)[0])


@pytest.mark.parametrize('devices', [1, 4])
def test_chunk_sizes_cover_the_rays_with_little_padding(devices):
  chunk = 64 * devices
  shapes = {chunk >> k for k in range(4)}
  for total in range(1, 5 * chunk):
    sizes = renderer.chunk_sizes(total, chunk, devices)
    assert set(sizes) <= shapes
    assert all(s % devices == 0 for s in sizes)
    assert sizes == sorted(sizes, reverse=True)
    # Covered, with less padding than the smallest shape (and than full
    # chunks alone would need).
    assert total <= sum(sizes) < total + chunk // 8
    assert sum(sizes) <= -(-total // chunk) * chunk
    # Without halvings: whole chunks, one compiled shape.
    assert renderer.chunk_sizes(total, chunk, devices, 0) == [chunk] * (
        -(-total // chunk))


def test_should_stop_interrupts_between_chunks(trained_avatar):
  render = trained_avatar.renderer
  dataset = avatar_lib.load_dataset(trained_avatar, 'val')
  inputs = renderer.dataset_inputs(dataset, 0,
                                   trained_avatar.shared_code('mean'))
  args = (render.fns, render.params, inputs, dataset.height,
          dataset.width, 96, render.mesh)  # 576 pixels: 6 chunks.
  asked = []

  def never():
    asked.append(len(asked))
    return False

  # Asked before each chunk but the first; the frame is the usual one.
  chex.assert_trees_all_close(renderer.render_frame(*args, should_stop=never),
                              renderer.render_frame(*args), atol=0)
  assert len(asked) == 5
  asked.clear()

  def after_two():
    asked.append(len(asked))
    return len(asked) >= 2

  with pytest.raises(renderer.RenderInterrupted, match='after 2 of 6'):
    renderer.render_frame(*args, should_stop=after_two)
  assert len(asked) == 2
