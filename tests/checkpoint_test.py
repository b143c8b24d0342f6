"""Tests of orbax checkpointing: round trips, retention, and kill safety."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nerface_jax import checkpoint


def _state(step, size=8):
  params = {'w': jnp.full((size, 3), float(step)), 'b': jnp.arange(3.0) + step}
  opt = optax.adam(1e-3)
  return {'params': params, 'opt': opt.init(params),
          'step': jnp.int32(step), 'rng': jax.random.PRNGKey(step)}


def test_round_trip_keeps_values_types_and_config(tmp_path):
  with checkpoint.Checkpoints(tmp_path, keep=2) as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(5, _state(5), {'train': {'lr': 0.1}}, {'expr_dim': 76})
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    restored = ckpt.restore(_state(0))
    assert ckpt.restore_config() == {'train': {'lr': 0.1}}
    assert ckpt.restore_meta() == {'expr_dim': 76}
  chex.assert_trees_all_equal(restored, _state(5))
  # The optax state keeps its named-tuple types, not plain lists.
  chex.assert_trees_all_equal_structs(restored, _state(0))


def test_keeps_the_latest_n_and_restores_any_kept_step(tmp_path):
  with checkpoint.Checkpoints(tmp_path, keep=2) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step), {})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 3]
    chex.assert_trees_all_equal(ckpt.restore(_state(0), step=2), _state(2))
    try:
      ckpt.restore(_state(0), step=1)
      raise AssertionError('restoring a deleted step must fail')
    except FileNotFoundError as e:
      assert 'step 1' in str(e)


_WRITER = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    import jax.numpy as jnp
    from nerface_jax import checkpoint
    ckpt = checkpoint.Checkpoints({path!r}, keep=3, async_save=True)
    step = 0
    while True:
      step += 1
      # Large enough that a kill often lands in the middle of a write.
      ckpt.save(step, {{'w': jnp.full((2_000_000,), float(step))}}, {{}})
      if step == 1:
        ckpt.wait()
        print('first', flush=True)
''')


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for delay in (0.0, 0.3, 0.7):
    path = tmp_path / f'run_{delay}'
    child = subprocess.Popen(
        [sys.executable, '-c', _WRITER.format(repo=repo, path=str(path))],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
    assert child.stdout.readline().strip() == b'first'
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    with checkpoint.Checkpoints(path, keep=3) as ckpt:
      step = ckpt.latest_step()
      assert step is not None and step >= 1
      restored = ckpt.restore({'w': jnp.zeros((2_000_000,))})
      np.testing.assert_array_equal(restored['w'][:3], [float(step)] * 3)
