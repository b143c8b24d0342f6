"""Test set-up: 4 fake CPU devices and a persistent compilation cache.

Both must be configured before JAX initialises its backend, which is why this
runs at import time of the test session.
"""

import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = pathlib.Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

import jax  # pylint: disable=g-import-not-at-top

_CACHE = os.environ.get('NERFACE_JAX_TEST_JIT_CACHE',
                        str(REPO / '.pytest_cache' / 'jax_cache'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
