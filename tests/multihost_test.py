"""Two processes on localhost train as one job (jax.distributed).

The job has 2 processes x 2 CPU devices; it must reproduce, step for step, a
single process with 4 devices (the per-device randomness depends on the
global device index only), and only process 0 may write logs.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices: int, cache: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', NERFACE_JAX_CACHE=cache)
  return env


def _train(workdir, devices, cache, extra=()):
  return subprocess.Popen(
      [sys.executable, str(REPO / 'train.py'),
       f'--config={REPO / "configs" / "person.py"}:tiny',
       f'--workdir={workdir}', *extra],
      env=_env(devices, cache), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return [(row['step'], row['loss']) for row in map(json.loads, f)]


def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
  cache = str(tmp_path / 'cache')
  port = _free_port()
  job = [_train(tmp_path / 'job', 2, cache,
                [f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}'])
         for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in job]
  for i, (p, out) in enumerate(zip(job, outputs)):
    assert p.returncode == 0, f'process {i} failed:\n{out[-3000:]}'
  single = _train(tmp_path / 'single', 4, cache)
  out = single.communicate(timeout=300)[0]
  assert single.returncode == 0, out[-3000:]

  job_losses, single_losses = _losses(tmp_path / 'job'), _losses(
      tmp_path / 'single')
  assert [s for s, _ in job_losses] == [1, 2, 3, 4]  # One writer only.
  np.testing.assert_allclose([l for _, l in job_losses],
                             [l for _, l in single_losses], rtol=1e-6)
  assert len(list((tmp_path / 'job').glob('events.out.tfevents.*'))) == 1
  assert sorted(os.listdir(tmp_path / 'job' / 'checkpoints')) == ['2', '4']
  assert 'step 4/4' in outputs[0] and 'step 4/4' not in outputs[1]
