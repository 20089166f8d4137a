"""Joining a multi-process JAX job (TPU pod slice, several GPU hosts) before anything else runs.

  python -m t5like.parallel.distributed experiments/main.py --config=... --workdir=...

runs the script after `maybe_initialize()`, which calls `jax.distributed.initialize`:
- with explicit arguments when T5LIKE_COORDINATOR (host:port), T5LIKE_NUM_PROCESSES and
  T5LIKE_PROCESS_ID are set (GPU hosts without a cluster manager);
- with none, letting JAX auto-detect the cluster, on a TPU VM of a multi-host slice or under SLURM
  / Open MPI (JAX reads their environment);
- not at all otherwise: one process (a laptop, Colab, one multi-GPU host) sees all its devices.
Each process then reads only its share of the data (t5like.data.pipeline shards by
`jax.process_index()`), and the mesh spans the devices of every process.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Mapping

from t5like.config import ConfigError

_EXPLICIT = ('T5LIKE_COORDINATOR', 'T5LIKE_NUM_PROCESSES', 'T5LIKE_PROCESS_ID')
# Set on the workers of a multi-host TPU slice, or by cluster managers JAX auto-detects.
_AUTO_MARKERS = ('TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS', 'SLURM_JOB_ID',
                 'OMPI_COMM_WORLD_SIZE')


def initialize_args(environ: Mapping[str, str]) -> dict | None:
  """kwargs for jax.distributed.initialize from the environment, or None for a single process."""
  given = [k for k in _EXPLICIT if environ.get(k)]
  if given and len(given) != len(_EXPLICIT):
    missing = sorted(set(_EXPLICIT) - set(given))
    raise ConfigError(f'{given} are set but {missing} are not; set all of {list(_EXPLICIT)} '
                      '(or none, to auto-detect)')
  if given:
    try:
      num, pid = int(environ['T5LIKE_NUM_PROCESSES']), int(environ['T5LIKE_PROCESS_ID'])
    except ValueError:
      raise ConfigError('T5LIKE_NUM_PROCESSES and T5LIKE_PROCESS_ID must be integers, got '
                        f"{environ['T5LIKE_NUM_PROCESSES']!r}, {environ['T5LIKE_PROCESS_ID']!r}"
                        ) from None
    if not 0 <= pid < num:
      raise ConfigError(f'T5LIKE_PROCESS_ID={pid} must be in [0, T5LIKE_NUM_PROCESSES={num})')
    return {'coordinator_address': environ['T5LIKE_COORDINATOR'], 'num_processes': num,
            'process_id': pid}
  hosts = environ.get('TPU_WORKER_HOSTNAMES', '')
  if any(environ.get(k) for k in _AUTO_MARKERS if k != 'TPU_WORKER_HOSTNAMES') or ',' in hosts:
    return {}
  return None


def maybe_initialize(environ: Mapping[str, str] | None = None) -> bool:
  """Joins the multi-process job the environment describes; True if it did."""
  args = initialize_args(os.environ if environ is None else environ)
  if args is None:
    return False
  import jax
  jax.distributed.initialize(**args)
  return True


def main(argv: list[str]) -> None:
  if not argv or not argv[0].endswith('.py'):
    raise SystemExit('usage: python -m t5like.parallel.distributed SCRIPT.py [ARGS...]')
  maybe_initialize()
  sys.argv = list(argv)
  runpy.run_path(argv[0], run_name='__main__')


if __name__ == '__main__':
  main(sys.argv[1:])
