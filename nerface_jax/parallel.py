"""Data parallelism: the device mesh, placement, and mapping a per-device step.

One per-device step body (it samples its own rays, computes its gradients and
averages them with `lax.pmean` over the axis 'data') is mapped over all
devices of all processes, either by `jax.shard_map` under `jax.jit` (default)
or by `jax.pmap`. Both produce the same numbers; `shard_map` keeps one global
replicated state, `pmap` a per-device stack of identical copies.
"""

import os
from typing import Any, Callable, Optional

from absl import logging
import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from nerface_jax import config_lib

AXIS = 'data'
MODES = config_lib.CHOICES['parallel.mode']


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           auto: bool = False) -> bool:
  """Joins a multi-process job when one is described; returns whether it did.

  Args:
    coordinator_address: 'host:port' of process 0 (explicit launch).
    num_processes: number of processes of the job.
    process_id: this process's index.
    auto: let JAX detect the cluster (TPU pods, SLURM, Open MPI, or the
      JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables).

  Returns:
    True when `jax.distributed.initialize` was called.
  """
  if coordinator_address is None and not auto and not os.environ.get(
      'JAX_COORDINATOR_ADDRESS'):
    return False
  kwargs = {}
  if coordinator_address is not None:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d; %d local of %d devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def make_mesh() -> Mesh:
  """A one-axis mesh ('data') over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places a pytree of host or device arrays replicated on every device.

  Works in a multi-process job: every process passes the same full arrays
  and contributes them for its own devices.
  """
  sharding = NamedSharding(mesh, P())

  def put(x):
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree.map(put, tree)


def stack_local(tree: Any) -> Any:
  """One copy per local device, stacked on a leading axis (for `pmap`).

  Each copy is put on its device directly, so no [n, ...] host array is
  ever built (the training images are the largest thing here).
  """
  devices = jax.local_devices()
  mesh = Mesh(np.asarray(devices), (AXIS,))
  sharding = NamedSharding(mesh, P(AXIS))

  def put(x):
    x = np.asarray(x)[None]
    shards = [jax.device_put(x, d) for d in devices]
    return jax.make_array_from_single_device_arrays(
        (len(devices),) + x.shape[1:], sharding, shards)
  return jax.tree.map(put, tree)


def unstack(tree: Any) -> Any:
  """The first copy of a `pmap` stack (all copies are equal)."""
  return jax.tree.map(lambda x: x[0], tree)


def to_host(tree: Any) -> Any:
  """Numpy copies of a pytree of (possibly multi-process) arrays.

  A replicated global array of a multi-process job is not fully addressable;
  every process holds a full copy, so its first local shard is the value.
  """
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise ValueError('to_host takes replicated arrays only.')
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(get, tree)


def map_step(body: Callable[..., Any], mode: str, mesh: Mesh,
             num_args: int = 2) -> Callable[..., Any]:
  """Maps a per-device body `(state, *args) -> (state, stats)` over devices.

  Args:
    body: uses collectives over axis 'data' (lax.pmean, lax.axis_index).
    mode: 'shard_map' (jit of shard_map over `mesh`) or 'pmap'.
    mesh: the device mesh (shard_map only).
    num_args: number of positional arguments of `body`, state included.

  Returns:
    The compiled step. Its first argument (the state) is donated. In
    'shard_map' mode all arguments and results are replicated global arrays;
    in 'pmap' mode they carry a leading local-device axis.
  """
  if mode == 'shard_map':
    specs = (P(),) * num_args
    # Without replication checking, a gradient taken inside the body is the
    # device's own (as under pmap) and the body's lax.pmean averages it.
    # With checking on, JAX would already sum gradients of replicated inputs
    # across devices, and the pmean would then leave that sum in place.
    mapped = jax.shard_map(body, mesh=mesh, in_specs=specs,
                           out_specs=(P(), P()), check_vma=False)
    return jax.jit(mapped, donate_argnums=0)
  if mode == 'pmap':
    return jax.pmap(body, axis_name=AXIS, donate_argnums=0)
  raise ValueError(f'parallel.mode must be one of {MODES}, got {mode!r}.')
