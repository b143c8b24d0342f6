"""Faults a user meets, each refused in one line or survived without loss.

CLI rows run the real programs; the others call the library the programs
call. Every row states the exact line (a regular expression) expected.
"""

from concurrent import futures
import errno
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import tiny_config
from nerface_jax import avatar as avatar_lib
from nerface_jax import checkpoint
from nerface_jax import errors
from nerface_jax import summary
from nerface_jax import synthetic
from nerface_jax import train_lib
from nerface_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = '--config=configs/person.py:tiny'


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('fault_cache')


def _run(program, *args, timeout=240):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  return subprocess.run([sys.executable, program, *args], cwd=REPO,
                        capture_output=True, text=True, env=env,
                        timeout=timeout, check=False)


# (id, program, arguments ({w}: a fresh workdir, {c}: the cache), line).
CLI_FAULTS = [
    ('zero_batch', 'train.py', [TINY, '--workdir={w}',
                                '--config.train.batch_rays=0'],
     r'train.py: error: config.train.batch_rays = 0: expected an integer '
     r'>= 1.'),
    ('negative_batch', 'train.py', [TINY, '--workdir={w}',
                                    '--config.train.batch_rays=-8'],
     r'train.py: error: config.train.batch_rays = -8: expected an integer '
     r'>= 1.'),
    ('zero_checkpoint_every', 'train.py', [
        TINY, '--workdir={w}', '--config.train.checkpoint_every=0'],
     r'train.py: error: config.train.checkpoint_every = 0: expected an '
     r'integer >= 1.'),
    ('background_typo', 'train.py', [TINY, '--workdir={w}',
                                     '--config.data.background=imag'],
     r"train.py: error: config.data.background = 'imag': expected one of "
     r"'image', 'none' \(did you mean 'image'\?\)"),
    ('eval_latent_typo', 'train.py', [TINY, '--workdir={w}',
                                      '--config.eval.latent=foo'],
     r"train.py: error: config.eval.latent = 'foo': expected one of .*"),
    ('unset_data_dir', 'train.py', [TINY, '--workdir={w}',
                                    '--config.data.dir='],
     r"train.py: error: config.data.dir = '': expected None .*unset shell "
     r'variable.*'),
    ('unknown_preset', 'train.py', ['--config=configs/person.py:tinyy',
                                    '--workdir={w}'],
     r"train.py: error: Unknown preset 'tinyy' for configs/person.py; .*"),
    ('missing_config_file', 'train.py', ['--config=configs/nope.py',
                                         '--workdir={w}'],
     r"train.py: error: --config=configs/nope.py: no such config file "
     r"'configs/nope.py'.*"),
    ('unknown_key', 'train.py', [TINY, '--workdir={w}',
                                 '--config.train.lrate=1'],
     r'train.py: error: unknown config key .*lrate.*'),
    ('workdir_is_a_file', 'train.py', [TINY, '--workdir={f}'],
     r'train.py: error: .*: --workdir exists and is not a folder.'),
    ('missing_data_dir', 'train.py', [TINY, '--workdir={w}',
                                      '--config.data.dir=/nonexistent/p1'],
     r'train.py: error: /nonexistent/p1.*'),
    ('render_no_workdir', 'render.py', ['--workdir=/nonexistent/w',
                                        '--out={w}'],
     r'render.py: error: /nonexistent/w: no such workdir.'),
    ('render_bad_frames', 'render.py', ['--workdir={w}', '--out={w}/o',
                                        '--mode=orbit', '--frames=0'],
     r'render.py: error: --frames=0: expected at least 1.'),
    ('synthetic_zero_size', '-m', ['nerface_jax.synthetic', '{w}',
                                   '--size=0'],
     r'python -m nerface_jax.synthetic: error: size must be positive, got '
     r'0.'),
    ('synthetic_busy_folder', '-m', ['nerface_jax.synthetic', '{f}'],
     r'python -m nerface_jax.synthetic: error: .*a_file exists and is not '
     r'empty; remove it or choose another folder.'),
]


def _cli_args(root: pathlib.Path, cache, program, args):
  a_file = root / 'a_file'
  a_file.write_text('x')
  args = [a.format(w=root / 'w', c=cache, f=a_file) for a in args]
  if program == 'train.py' and not any('configs/nope' in a or 'tinyy' in a
                                      for a in args):
    args.append(f'--config.data.cache_dir={cache}')
  return args


@pytest.fixture(scope='module')
def cli_results(tmp_path_factory, cache):
  """Every CLI row run once, three at a time (each is a fresh interpreter
  that mostly imports): {case: (result, its folder)}."""
  def run(row):
    case, program, args, _ = row
    root = tmp_path_factory.mktemp(case)
    return case, (_run(program, *_cli_args(root, cache, program, args)), root)

  with futures.ThreadPoolExecutor(3) as pool:
    return dict(pool.map(run, CLI_FAULTS))


@pytest.mark.parametrize('case,program,args,line', CLI_FAULTS,
                         ids=[c[0] for c in CLI_FAULTS])
def test_cli_faults_end_in_one_line(cli_results, case, program, args, line):
  del program, args
  result, root = cli_results[case]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert result.returncode == 2, result
  assert len(lines) == 1, result.stderr[-3000:]
  assert re.fullmatch(line, lines[0]), lines[0]
  assert not (root / 'w' / 'config.json').exists()


def _losses(workdir):
  rows = summary.MetricsLog(workdir / 'metrics.jsonl').rows()
  steps = [r['step'] for r in rows]
  assert len(steps) == len(set(steps)), steps
  return {r['step']: r['loss'] for r in rows}


@pytest.fixture(scope='module')
def straight(cache, tmp_path_factory):
  """An uninterrupted run of 6 steps with a checkpoint every 2."""
  workdir = tmp_path_factory.mktemp('straight')
  train_lib.train_and_evaluate(_config(cache), str(workdir))
  return _losses(workdir)


@pytest.fixture(scope='module')
def four_steps(cache, tmp_path_factory):
  """A run stopped after 4 of the 6 steps (checkpoints 2 and 4)."""
  workdir = tmp_path_factory.mktemp('four_steps')
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 4}),
                               str(workdir))
  return workdir


def _config(cache, **overrides):
  defaults = {'train.max_steps': 6, 'train.checkpoint_every': 2,
              'train.keep_checkpoints': 3}
  return tiny_config(cache, **{**defaults, **overrides})


def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob('*') if p.is_file() and
              p.name != checkpoint.MANIFEST), key=lambda p: p.stat().st_size)


def _flip(folder):
  victim = _largest_file(folder / 'state')
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0x10
  victim.write_bytes(bytes(data))


def _truncate(folder):
  victim = _largest_file(folder / 'state')
  victim.write_bytes(victim.read_bytes()[:7])


DAMAGE = {
    'flipped_byte': _flip,
    'truncated_file': _truncate,
    'missing_state': lambda folder: shutil.rmtree(folder / 'state'),
    'empty_step_folder': lambda folder: [shutil.rmtree(folder),
                                         folder.mkdir()],
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_falls_back_and_the_run_goes_on(
    cache, tmp_path, straight, four_steps, capfd, damage):
  tmp_path = tmp_path / 'work'
  shutil.copytree(four_steps, tmp_path)
  DAMAGE[damage](tmp_path / 'checkpoints' / '4')
  capfd.readouterr()
  # render.py takes the newest intact checkpoint and says so.
  avatar = avatar_lib.load(tmp_path)
  assert avatar.step == 2
  err = capfd.readouterr().err
  if damage != 'empty_step_folder':  # orbax no longer lists that one.
    assert 'checkpoint 4 is damaged' in err and 'Using checkpoint 2' in err
  train_lib.train_and_evaluate(_config(cache), str(tmp_path))
  err = capfd.readouterr().err
  if damage != 'empty_step_folder':
    assert 'Checkpoint 4 is damaged' in err and 'moved to' in err
    assert (tmp_path / 'checkpoints' / 'damaged' / '4').is_dir()
  losses = _losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                             [straight[s] for s in range(1, 7)], rtol=1e-6)


def test_resume_from_a_chosen_step_sets_newer_ones_aside(cache, tmp_path,
                                                         straight):
  train_lib.train_and_evaluate(_config(cache), str(tmp_path))
  train_lib.train_and_evaluate(_config(cache), str(tmp_path), step=2)
  assert sorted(p.name for p in (tmp_path / 'checkpoints' / 'superseded')
                .iterdir()) == ['4', '6']
  losses = _losses(tmp_path)
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([losses[s] for s in range(1, 7)],
                             [straight[s] for s in range(1, 7)], rtol=1e-6)
  with pytest.raises(errors.TrainingError, match=r'--step=5 is not a '):
    train_lib.train_and_evaluate(_config(cache), str(tmp_path), step=5)


def test_divergence_never_becomes_a_checkpoint(cache, tmp_path):
  """The guard checks the updated state, not the loss computed before it."""
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 2}),
                               str(tmp_path))
  good = avatar_lib.load(tmp_path)
  with pytest.raises(errors.TrainingError, match='non-finite|became') as info:
    train_lib.train_and_evaluate(
        _config(cache, **{'train.lr': 1e30, 'train.checkpoint_every': 1}),
        str(tmp_path), allow=('train.lr',))
  assert 'step 2' in str(info.value) and '--step=2' in str(info.value)
  with checkpoint.Checkpoints(tmp_path, read_only=True) as ckpt:
    assert ckpt.all_steps() == [2]
  after = avatar_lib.load(tmp_path)
  assert after.step == 2
  np.testing.assert_array_equal(after.host_params['latent']['gamma'],
                                good.host_params['latent']['gamma'])


def test_a_changed_learning_rate_is_refused_unless_allowed(cache, tmp_path):
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 2}),
                               str(tmp_path))
  with pytest.raises(errors.TrainingError, match=r'train\.lr: saved'):
    train_lib.train_and_evaluate(_config(cache, **{'train.lr': 1e-4}),
                                 str(tmp_path))
  train_lib.train_and_evaluate(_config(cache, **{'train.lr': 1e-4}),
                               str(tmp_path), allow=('train.lr',))
  assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_keeps_the_previous_checkpoint(cache, tmp_path,
                                                   monkeypatch):
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 2}),
                               str(tmp_path))

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(checkpoint.Checkpoints, 'save', full)
  with pytest.raises(errors.TrainingError) as info:
    train_lib.train_and_evaluate(_config(cache), str(tmp_path))
  message = str(info.value)
  assert re.fullmatch(r'.*checkpoints/4: cannot write \(OSError: .*No space '
                      r'left on device; [\d,]+ MiB free there\)\. The last '
                      r'good checkpoint is step 2\.', message), message
  monkeypatch.undo()
  assert avatar_lib.load(tmp_path).step == 2


def test_the_workdir_is_protected(cache, tmp_path):
  mine = tmp_path / 'mine'
  mine.mkdir()
  (mine / 'config.json').write_text('{"my": "notes"}')
  with pytest.raises(errors.TrainingError, match='did not write'):
    train_lib.train_and_evaluate(_config(cache), str(mine))
  assert (mine / 'config.json').read_text() == '{"my": "notes"}'
  # A run holding the lock keeps a second one out, naming it.
  work = tmp_path / 'work'
  train_lib.train_and_evaluate(_config(cache, **{'train.max_steps': 2}),
                               str(work))
  lock = workdir_lib.Lock(work)
  lock.acquire()
  try:
    with pytest.raises(errors.TrainingError,
                       match=rf'another run is training here \(process '
                       rf'{os.getpid()} on '):
      train_lib.train_and_evaluate(_config(cache), str(work))
  finally:
    lock.release()
  # A lock left by a process that died is taken over.
  dead = subprocess.Popen(['true'])
  dead.wait()
  (work / workdir_lib.LOCK).write_text(json.dumps(
      {'pid': dead.pid, 'host': os.uname().nodename, 'started': 'then'}))
  train_lib.train_and_evaluate(_config(cache), str(work))
  assert not (work / workdir_lib.LOCK).exists()
  # render.py's own output folders inside the workdir are fine.
  (work / 'renders').mkdir()
  (work / 'renders' / '.nerface-render').write_text('')
  workdir_lib.check(work)


_KILLED = '''
import sys
sys.path.insert(0, {repo!r})
from conftest import tiny_config
from nerface_jax import train_lib
config = tiny_config({cache!r}, **{{'train.max_steps': 200,
    'train.checkpoint_every': 3, 'train.log_every': 1,
    'train.eval_every': 1000}})
train_lib.train_and_evaluate(config, {work!r})
'''


def test_sigkill_at_random_moments_then_resume_repeats_the_run(cache,
                                                               tmp_path):
  overrides = {'train.max_steps': 30, 'train.checkpoint_every': 3,
               'train.log_every': 1, 'train.eval_every': 1000}
  reference = tmp_path / 'reference'
  train_lib.train_and_evaluate(tiny_config(cache, **overrides),
                               str(reference))
  work = tmp_path / 'work'
  rng = random.Random(0)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '',
         'PYTHONPATH': str(REPO / 'tests')}
  for _ in range(3):
    child = subprocess.Popen(
        [sys.executable, '-c', _KILLED.format(repo=str(REPO), cache=str(cache),
                                              work=str(work))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Once its first checkpoint is being written, kill it at a random moment.
    deadline = time.time() + 120
    while time.time() < deadline and child.poll() is None and not any(
        (work / 'checkpoints').glob('*')):
      time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    child.send_signal(signal.SIGKILL)
    child.wait()
  train_lib.train_and_evaluate(tiny_config(cache, **overrides), str(work))
  a, b = _losses(reference), _losses(work)
  assert sorted(b) == list(range(1, 31))
  np.testing.assert_allclose([b[s] for s in range(1, 31)],
                             [a[s] for s in range(1, 31)], rtol=1e-6)
