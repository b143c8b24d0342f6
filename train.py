r"""Trains a NeRFace avatar.

  python train.py --config=configs/person.py --workdir=W \
      --config.data.dir=/path/to/person_1
  python train.py --config=configs/person.py:demo --workdir=W   # built-in person

Resumes from the latest checkpoint in W when there is one. On several hosts,
start the same command on every host with --coordinator_address,
--num_processes and --process_id (or --distributed on TPU pods and SLURM).
"""

from nerface_jax.apps import train

if __name__ == '__main__':
  train.run()
