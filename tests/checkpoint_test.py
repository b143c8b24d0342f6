"""Tests of orbax checkpointing: round trips, retention, and kill safety."""

import json
import os
import shutil
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
import pytest

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
    ckpt = checkpoint.Checkpoints({path!r}, keep=3)
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
      steps = ckpt.all_steps()
      intact = [s for s in steps if ckpt.verify(s) is None]
      assert intact and intact[0] >= 1, steps
      # Only the save the kill interrupted may be incomplete (orbax can list
      # it before all its items are written); it has no manifest yet, and
      # resuming passes over it (train_lib). Every finished save verifies.
      for s in sorted(set(steps) - set(intact)):
        assert s == steps[-1], (s, ckpt.verify(s))
        assert not (ckpt.step_dir(s) / checkpoint.MANIFEST).exists()
      step = intact[-1]
      restored = ckpt.restore({'w': jnp.zeros((2_000_000,))}, step=step)
      np.testing.assert_array_equal(restored['w'][:3], [float(step)] * 3)


def _saved(tmp_path, steps=(1, 2), keep=3):
  with checkpoint.Checkpoints(tmp_path, keep=keep) as ckpt:
    for step in steps:
      ckpt.save(step, _state(step), {'step': step}, {'x': 1})
  return tmp_path / checkpoint.SUBDIR


def _array_files(folder):
  return [p for p in (folder / 'state').rglob('*') if p.is_file() and
          p.stat().st_size > 0 and 'd' in p.parent.name]


def test_a_flipped_byte_fails_verification_and_the_rest_verifies(tmp_path):
  folder = _saved(tmp_path)
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    assert ckpt.verify(1) is None and ckpt.verify(2) is None
  manifest = (folder / '2' / checkpoint.MANIFEST).read_text()
  assert 'state/' in manifest and 'config/' in manifest
  victim = max((p for p in (folder / '2').rglob('*') if p.is_file() and
                p.name != checkpoint.MANIFEST), key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x40
  victim.write_bytes(bytes(data))
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    reason = ckpt.verify(2)
    assert reason is not None and 'checksum' in reason and victim.name in reason
    assert ckpt.verify(1) is None


def test_orbax_step_metadata_is_not_vouched_for(tmp_path):
  # Orbax may write its step metadata again after a save returns; a kill
  # then can leave it missing, which must not make the data untrusted.
  folder = _saved(tmp_path)
  manifest = json.loads((folder / '2' / checkpoint.MANIFEST).read_text())
  assert manifest['sha256']
  assert not any(name.endswith('_CHECKPOINT_METADATA')
                 for name in manifest['sha256'])
  for path in (folder / '2').rglob('_CHECKPOINT_METADATA'):
    path.unlink()
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    assert ckpt.verify(2) is None
    chex.assert_trees_all_equal(ckpt.restore(_state(0), step=2), _state(2))


@pytest.mark.parametrize('damage', ['truncate', 'remove_state', 'empty_dir'])
def test_damaged_checkpoints_are_found(tmp_path, damage):
  folder = _saved(tmp_path)
  step_dir = folder / '2'
  if damage == 'truncate':
    victim = max((p for p in step_dir.rglob('*') if p.is_file() and
                  p.name != checkpoint.MANIFEST),
                 key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:10])
  elif damage == 'remove_state':
    shutil.rmtree(step_dir / 'state')
  else:
    shutil.rmtree(step_dir)
    step_dir.mkdir()
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    if 2 in ckpt.all_steps():
      assert ckpt.verify(2) is not None
    assert ckpt.verify(1) is None


def test_set_aside_moves_without_deleting(tmp_path):
  folder = _saved(tmp_path)
  files = sorted(p.relative_to(folder / '2') for p in (folder / '2').rglob('*'))
  with checkpoint.Checkpoints(tmp_path) as ckpt:
    moved = ckpt.set_aside(2)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    assert moved == folder / 'damaged' / '2'
    assert sorted(p.relative_to(moved) for p in moved.rglob('*')) == files
    ckpt.save(2, _state(7), {}, {})  # The step is free again.
    assert ckpt.all_steps() == [1, 2]
    assert ckpt.set_aside(2) == folder / 'damaged' / '2-1'


def test_rotation_keeps_n_but_not_for_a_save_that_fails_to_verify(
    tmp_path, monkeypatch):
  _saved(tmp_path, steps=(1, 2, 3, 4), keep=2)
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    assert ckpt.all_steps() == [3, 4]
  original = checkpoint.Checkpoints.verify
  monkeypatch.setattr(checkpoint.Checkpoints, 'verify', lambda self, step: (
      'damaged' if step == 5 else original(self, step)))
  with checkpoint.Checkpoints(tmp_path, keep=2) as ckpt:
    ckpt.save(5, _state(5), {}, {})
    # Step 5 cannot be trusted, so steps 3 and 4 both stay.
    assert ckpt.all_steps() == [3, 4, 5]
