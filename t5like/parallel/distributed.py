"""Joining a multi-process JAX job (TPU pod slice, several GPU hosts) before anything else runs.

  python -m t5like.parallel.distributed experiments/main.py --config=... --workdir=...

runs the script after `maybe_initialize()`; experiments/main.py calls `maybe_initialize()` itself
(as MaxText does), with its --coordinator_address / --num_processes / --process_id flags.
`maybe_initialize` calls `jax.distributed.initialize`:
- with explicit arguments when given, or when T5LIKE_COORDINATOR (host:port),
  T5LIKE_NUM_PROCESSES and T5LIKE_PROCESS_ID are set (GPU hosts without a cluster manager);
- with none, letting JAX auto-detect the job: on a Cloud TPU VM (its TPU devices; JAX reads the
  slice's workers from the metadata server, and a one-host slice is a one-process job), on GKE
  (TPU_WORKER_HOSTNAMES listing several hosts, multislice's MEGASCALE_COORDINATOR_ADDRESS, or an
  indexed Kubernetes Job), under SLURM `srun` with several tasks, or Open MPI with several ranks;
- not at all otherwise: one process (a laptop, Colab, one multi-GPU host) sees all its devices and
  never waits for a coordinator.
Multi-process CPU jobs (the tests) use gloo collectives.
Each process then reads only its share of the data (t5like.data.pipeline shards by
`jax.process_index()`), and the mesh spans the devices of every process.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Mapping

from t5like.config import ConfigError
from t5like.parallel import hardware

_EXPLICIT = ('T5LIKE_COORDINATOR', 'T5LIKE_NUM_PROCESSES', 'T5LIKE_PROCESS_ID')


def _several(environ: Mapping[str, str], key: str) -> bool:
  try:
    return int(environ.get(key, '1')) > 1
  except ValueError:
    return False


def _auto_detected(environ: Mapping[str, str], on_tpu_vm) -> bool:
  """True where JAX's cluster auto-detection finds the job (see the module docstring)."""
  if environ.get('MEGASCALE_COORDINATOR_ADDRESS') or ',' in environ.get('TPU_WORKER_HOSTNAMES', ''):
    return True                                     # GKE TPU node pools, multislice
  if environ.get('KUBERNETES_SERVICE_HOST') and environ.get('JOB_COMPLETION_INDEX'):
    return True                                     # an indexed Kubernetes Job (GKE GPUs)
  if environ.get('SLURM_STEP_NODELIST') and _several(environ, 'SLURM_NTASKS'):
    return True                                     # inside `srun` with several tasks
  if _several(environ, 'OMPI_COMM_WORLD_SIZE'):
    return True
  return on_tpu_vm()


def _on_tpu_vm() -> bool:
  return hardware.detect_platform(environ={}) == 'tpu'


def initialize_args(environ: Mapping[str, str], on_tpu_vm=_on_tpu_vm) -> dict | None:
  """kwargs for jax.distributed.initialize from the environment, or None for a single process."""
  given = [k for k in _EXPLICIT if environ.get(k)]
  if given and len(given) != len(_EXPLICIT):
    missing = sorted(set(_EXPLICIT) - set(given))
    raise ConfigError(f'{given} are set but {missing} are not; set all of {list(_EXPLICIT)} '
                      '(the trainer\'s --coordinator_address, --num_processes, --process_id) '
                      'or none, to auto-detect')
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
  return {} if _auto_detected(environ, on_tpu_vm) else None


def maybe_initialize(environ: Mapping[str, str] | None = None, *, coordinator_address: str = '',
                     num_processes: int | None = None, process_id: int | None = None,
                     on_tpu_vm=_on_tpu_vm) -> bool:
  """Joins the multi-process job the arguments or the environment describe; True if it did.

  Explicit arguments (the trainer's flags) override the T5LIKE_* variables. Call it before
  anything touches a jax backend."""
  environ = dict(os.environ if environ is None else environ)
  for key, value in zip(_EXPLICIT, (coordinator_address, num_processes, process_id)):
    if value not in (None, ''):
      environ[key] = str(value)
  args = initialize_args(environ, on_tpu_vm)
  if args is None:
    return False
  import jax
  # Collectives between the processes of a CPU job (tests, a CPU cluster) go through gloo; GPU
  # and TPU backends ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
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
