"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

import pytest  # noqa: E402

from t5like import runtime  # noqa: E402


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """The whole suite in one process compiles thousands of programs: after each test module, the
  jit caches are dropped once they hold a third of the process's mapping cap."""
  yield
  runtime.free_compiled_programs()
