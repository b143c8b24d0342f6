"""End-to-end training on the built-in synthetic person (tiny sizes)."""

import json
import shutil
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from conftest import HASH_OVERRIDES
from conftest import tiny_config
from nerface_jax import checkpoint
from nerface_jax import experiment
from nerface_jax import summary
from nerface_jax import synthetic
from nerface_jax import train_lib


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp('synthetic_cache'))


def _config(cache, **overrides):
  return tiny_config(cache, **overrides)


def _event_records(path) -> int:
  """Records of a TFRecord event file (8-byte length, 4+4 bytes of CRCs)."""
  data, pos, count = path.read_bytes(), 0, 0
  while pos < len(data):
    pos += 16 + struct.unpack('<Q', data[pos:pos + 8])[0]
    count += 1
  return count


def _losses(workdir):
  return {row['step']: row['loss']
          for row in summary.MetricsLog(workdir / 'metrics.jsonl').rows()}


def test_run_writes_config_logs_events_previews_and_checkpoints(cache,
                                                                tmp_path):
  config = _config(cache)
  last = train_lib.train_and_evaluate(config, str(tmp_path))
  assert last['step'] == config.train.max_steps
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['train']['max_steps'] == config.train.max_steps
  assert saved['data']['cache_dir'] == cache
  rows = summary.MetricsLog(tmp_path / 'metrics.jsonl').rows()
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  for row in rows:
    for key in ('step', 'loss', 'psnr', 'lr', 'rays_per_sec'):
      assert key in row
  assert 'val_psnr' in rows[1] and 'val_psnr' not in rows[0]
  assert rows[0]['lr'] == pytest.approx(config.train.lr)
  events = list(tmp_path.glob('events.out.tfevents.*'))
  assert len(events) == 1 and _event_records(events[0]) > 4
  previews = sorted((tmp_path / 'previews').glob('*.png'))
  assert [p.name for p in previews][-1].startswith('step_0000004_')
  size = config.data.synthetic_size
  # prediction | truth | depth, side by side, each upscaled to 256 pixels.
  factor = -(-256 // size)
  assert Image.open(previews[-1]).size == (3 * size * factor, size * factor)
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    assert ckpt.all_steps() == [2, 4]
    assert ckpt.restore_config()['train']['max_steps'] == 4
    # The data facts carry the training expressions' statistics, which a
    # render of a 'standardize' avatar needs.
    meta = ckpt.restore_meta()
  train = experiment.load_data(config)['train']
  chex.assert_trees_all_close(np.float32(meta['expr_mean']),
                              train.expressions.mean(0), rtol=1e-5, atol=1e-6)


# The original field with two levels, and the hash field as `fast` has it:
# one level, the samples placed by an occupancy grid that is refreshed every
# step and culls from step 2 (so a resume carries it over).
FIELDS = {'mlp': {}, 'hash': {**HASH_OVERRIDES, 'render.num_fine': 0}}


@pytest.mark.parametrize('mode', ['shard_map', 'pmap'])
@pytest.mark.parametrize('field', list(FIELDS))
def test_resumed_run_repeats_the_uninterrupted_one(cache, tmp_path, mode,
                                                   field):
  straight = tmp_path / 'straight'
  resumed = tmp_path / 'resumed'
  over = {'parallel.mode': mode, **FIELDS[field]}
  train_lib.train_and_evaluate(_config(cache, **over), str(straight))
  train_lib.train_and_evaluate(
      _config(cache, **{**over, 'train.max_steps': 2}), str(resumed))
  assert sorted(_losses(resumed)) == [1, 2]
  train_lib.train_and_evaluate(_config(cache, **over), str(resumed))
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in range(1, 5)],
                             [a[s] for s in range(1, 5)], rtol=1e-6)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    cache, tmp_path, monkeypatch):
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 2}),
                               str(tmp_path))
  original = train_lib.compute_losses

  def poisoned(*args, **kwargs):
    loss, stats = original(*args, **kwargs)
    return loss * jnp.nan, {**stats, 'loss': loss * jnp.nan}

  monkeypatch.setattr(train_lib, 'compute_losses', poisoned)
  with pytest.raises(train_lib.TrainingError) as info:
    train_lib.train_and_evaluate(_config(cache), str(tmp_path))
  assert 'step 3' in str(info.value) and 'step 2' in str(info.value)
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == 2


# orbax leaves a coroutine of the refused restore unawaited.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_changed_model_cannot_resume_and_says_which_keys_differ(cache,
                                                                  tmp_path):
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 2}),
                               str(tmp_path))
  with pytest.raises(train_lib.TrainingError, match='model.trunk_width'):
    train_lib.train_and_evaluate(
        _config(cache, **{'model.trunk_width': 24}), str(tmp_path))


def test_training_improves_the_picture(cache, tmp_path):
  """A few hundred steps must beat showing the background alone by far."""
  config = _config(cache, **{
      'train.max_steps': 300, 'train.lr': 5e-3, 'train.lr_decay_steps': 300,
      'train.batch_rays': 256, 'train.log_every': 1, 'train.eval_every': 150,
      'train.checkpoint_every': 300, 'model.trunk_width': 64,
      'model.xyz_freqs': 6, 'model.color_width': 16,
      'render.num_coarse': 16, 'render.num_fine': 16})
  train_lib.train_and_evaluate(config, str(tmp_path))
  rows = summary.MetricsLog(tmp_path / 'metrics.jsonl').rows()
  val = [r['val_psnr'] for r in rows if 'val_psnr' in r]
  splits = experiment.load_data(config)
  frame = splits['val'].images[0].astype(np.float64) / 255
  background = splits['val'].background.astype(np.float64) / 255
  background_only = -10 * np.log10(np.mean((frame - background) ** 2))
  print(f'val PSNR {val}, background alone {background_only:.2f} dB')
  assert val[-1] > background_only + 8.0
  assert val[-1] >= val[0] - 0.5
  first, last = (np.mean([r['loss'] for r in part])
                 for part in (rows[:5], rows[-5:]))
  assert last < 0.2 * first, (first, last)


def test_training_ends_with_a_summary_and_the_next_commands(cache, tmp_path,
                                                            capsys):
  train_lib.train_and_evaluate(_config(cache), str(tmp_path))
  out = capsys.readouterr().out
  assert 'Trained steps 1-4' in out and 'val PSNR' in out
  assert f'python render.py --workdir={tmp_path}' in out
  assert str(tmp_path / 'checkpoints') in out
  # The same command again has nothing to do, and says so.
  assert train_lib.train_and_evaluate(_config(cache), str(tmp_path)) == {}
  out = capsys.readouterr().out
  assert 'already trained to step 4' in out and 'python render.py' in out


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_a_refused_resume_writes_nothing(cache, tmp_path):
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 2}),
                               str(tmp_path))
  before = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
  with pytest.raises(train_lib.TrainingError,
                     match=r'model\.trunk_width: saved 16, now 24'):
    train_lib.train_and_evaluate(
        _config(cache, **{'model.trunk_width': 24}), str(tmp_path))
  after = {p: p.read_bytes() for p in tmp_path.rglob('*') if p.is_file()}
  assert after == before  # config.json included.


def test_resuming_on_other_data_of_the_same_shape_is_refused(tmp_path):
  data_dir = tmp_path / 'data'
  synthetic.write(data_dir, size=16, frames=12, seed=0)
  config = _config(None, **{'train.max_steps': 2})
  config.data.dir = str(data_dir)
  train_lib.train_and_evaluate(config, str(tmp_path / 'work'))
  # The same folder now holds another recording with as many frames.
  shutil.rmtree(data_dir)
  synthetic.write(data_dir, size=16, frames=12, seed=1)
  config.train.max_steps = 4
  with pytest.raises(train_lib.TrainingError, match='fingerprint'):
    train_lib.train_and_evaluate(config, str(tmp_path / 'work'))
  with checkpoint.Checkpoints(tmp_path / 'work', read_only=True) as ckpt:
    assert ckpt.latest_step() == 2


def test_a_crash_after_the_last_checkpoint_leaves_no_duplicate_rows(
    cache, tmp_path):
  straight = tmp_path / 'straight'
  train_lib.train_and_evaluate(_config(cache), str(straight))
  work = tmp_path / 'work'
  train_lib.train_and_evaluate(_config(cache), str(work))
  # As if the process died after logging steps 3 and 4 but before the save
  # of step 4 completed.
  shutil.rmtree(work / 'checkpoints' / '4')
  train_lib.train_and_evaluate(_config(cache), str(work))
  steps = [r['step'] for r in summary.MetricsLog(work / 'metrics.jsonl').rows()]
  assert steps == [1, 2, 3, 4]
  a, b = _losses(straight), _losses(work)
  np.testing.assert_allclose([b[s] for s in range(1, 5)],
                             [a[s] for s in range(1, 5)], rtol=1e-6)


@pytest.mark.parametrize('field', list(FIELDS))
def test_a_run_resumed_on_another_device_count_repeats_the_run(cache,
                                                               tmp_path,
                                                               field):
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  one = Mesh(np.asarray(jax.devices()[:1]), ('data',))
  four = Mesh(np.asarray(jax.devices()[:4]), ('data',))
  assert four.devices.size == 4
  over = FIELDS[field]
  straight = tmp_path / 'straight'
  train_lib.train_and_evaluate(_config(cache, **over), str(straight),
                               mesh=four)
  resumed = tmp_path / 'resumed'
  train_lib.train_and_evaluate(
      _config(cache, **{**over, 'train.max_steps': 2}), str(resumed),
      mesh=one)
  train_lib.train_and_evaluate(_config(cache, **over), str(resumed),
                               mesh=four)
  a, b = _losses(straight), _losses(resumed)
  assert sorted(b) == [1, 2, 3, 4]
  np.testing.assert_allclose([b[s] for s in range(1, 5)],
                             [a[s] for s in range(1, 5)], rtol=1e-5)


def test_a_bad_config_is_refused_before_anything_is_written(cache, tmp_path):
  from nerface_jax import config_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(config_lib.ConfigError, match=r'eval\.latent'):
    train_lib.train_and_evaluate(_config(cache, **{'eval.latent': 'foo'}),
                                 str(tmp_path / 'w'))
  assert not (tmp_path / 'w').exists()


def test_max_seconds_stops_early_with_a_checkpoint(cache, tmp_path):
  config = _config(cache, **{'train.max_steps': 1000,
                             'train.checkpoint_every': 1000})
  config.train.max_seconds = 1e-9
  last = train_lib.train_and_evaluate(config, str(tmp_path))
  assert last['step'] < 1000
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == last['step']
  # The checkpoint resumes: a later run goes on from it.
  config.train.max_seconds = None
  config.train.max_steps = last['step'] + 2
  again = train_lib.train_and_evaluate(config, str(tmp_path))
  assert again['step'] == last['step'] + 2
  assert sorted(_losses(tmp_path))[-3:] == [last['step'], last['step'] + 1,
                                            last['step'] + 2]
