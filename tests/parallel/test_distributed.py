"""When and how a process joins a multi-process job (no process is started here)."""
import pytest

from t5like.config import ConfigError
from t5like.parallel import distributed


def test_single_process_by_default():
  assert distributed.initialize_args({}) is None
  assert distributed.initialize_args({'TPU_WORKER_HOSTNAMES': 'localhost'}) is None  # one host
  assert distributed.maybe_initialize({}) is False


def test_auto_detection_on_pods_and_clusters():
  assert distributed.initialize_args({'TPU_WORKER_HOSTNAMES': 'w0,w1,w2,w3'}) == {}
  assert distributed.initialize_args({'SLURM_JOB_ID': '7'}) == {}


def test_explicit_coordinator():
  env = {'T5LIKE_COORDINATOR': '10.0.0.2:1234', 'T5LIKE_NUM_PROCESSES': '2',
         'T5LIKE_PROCESS_ID': '1'}
  assert distributed.initialize_args(env) == {'coordinator_address': '10.0.0.2:1234',
                                              'num_processes': 2, 'process_id': 1}
  with pytest.raises(ConfigError, match=r"\['T5LIKE_NUM_PROCESSES', 'T5LIKE_PROCESS_ID'\] are not"):
    distributed.initialize_args({'T5LIKE_COORDINATOR': 'h:1'})
  with pytest.raises(ConfigError, match='T5LIKE_PROCESS_ID=2 must be in'):
    distributed.initialize_args(dict(env, T5LIKE_PROCESS_ID='2'))
