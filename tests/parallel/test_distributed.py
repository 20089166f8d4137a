"""When and how a process joins a multi-process job (no process is started here)."""
import jax
import pytest

from t5like.config import ConfigError
from t5like.parallel import distributed


def test_single_process_by_default():
  assert distributed.initialize_args({}) is None
  assert distributed.initialize_args({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None  # one host
  assert distributed.maybe_initialize({}) is False


def test_auto_detection_on_pods_and_clusters():
  no_tpu = lambda: False
  assert distributed.initialize_args({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}, no_tpu) == {}
  slurm = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'n[1-2]', 'SLURM_NTASKS': '2'}
  assert distributed.initialize_args(slurm, no_tpu) == {}
  # One task (sbatch of a single process, or outside srun) never waits for a coordinator.
  assert distributed.initialize_args(dict(slurm, SLURM_NTASKS='1'), no_tpu) is None
  assert distributed.initialize_args({'SLURM_JOB_ID': '7'}, no_tpu) is None
  assert distributed.initialize_args({'OMPI_COMM_WORLD_SIZE': '4'}, no_tpu) == {}
  assert distributed.initialize_args({'OMPI_COMM_WORLD_SIZE': '1'}, no_tpu) is None
  assert distributed.initialize_args({'KUBERNETES_SERVICE_HOST': '10.0.0.1',
                                      'JOB_COMPLETION_INDEX': '0'}, no_tpu) == {}
  assert distributed.initialize_args({'MEGASCALE_COORDINATOR_ADDRESS': 'h:8080'}, no_tpu) == {}
  # On a Cloud TPU VM JAX reads the slice from the metadata server (one host: one process).
  assert distributed.initialize_args({}, on_tpu_vm=lambda: True) == {}


def test_flags_override_the_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  env = {'T5LIKE_COORDINATOR': 'a:1', 'T5LIKE_NUM_PROCESSES': '4', 'T5LIKE_PROCESS_ID': '3'}
  assert distributed.maybe_initialize(env, coordinator_address='b:2', process_id=0,
                                      on_tpu_vm=lambda: False)
  assert calls == [{'coordinator_address': 'b:2', 'num_processes': 4, 'process_id': 0}]
  assert not distributed.maybe_initialize({}, on_tpu_vm=lambda: False) and len(calls) == 1
  with pytest.raises(ConfigError, match='T5LIKE_PROCESS_ID'):
    distributed.maybe_initialize({}, coordinator_address='b:2', num_processes=2,
                                 on_tpu_vm=lambda: False)


def test_explicit_coordinator():
  env = {'T5LIKE_COORDINATOR': '10.0.0.2:1234', 'T5LIKE_NUM_PROCESSES': '2',
         'T5LIKE_PROCESS_ID': '1'}
  assert distributed.initialize_args(env) == {'coordinator_address': '10.0.0.2:1234',
                                              'num_processes': 2, 'process_id': 1}
  with pytest.raises(ConfigError, match=r"\['T5LIKE_NUM_PROCESSES', 'T5LIKE_PROCESS_ID'\] are not"):
    distributed.initialize_args({'T5LIKE_COORDINATOR': 'h:1'})
  with pytest.raises(ConfigError, match='T5LIKE_PROCESS_ID=2 must be in'):
    distributed.initialize_args(dict(env, T5LIKE_PROCESS_ID='2'))
