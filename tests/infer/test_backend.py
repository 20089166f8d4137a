"""The decode backend seam: the CPU kernels give the same tokens as XLA, and nothing is built or
probed off the CPU."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.infer import backend as backend_lib, decode
from t5like.kernels import cpu_matmul, library
from t5like.models.random_weights import random_params

needs_kernel = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                  reason='no C++ compiler to build the CPU kernel')
B, T = 4, 6


@functools.lru_cache(maxsize=None)
def setup(name):
  cfg = get_variant(name)
  params = random_params(cfg, embed_std=0.3, std=0.2)
  rng = np.random.default_rng(3)
  inputs = jnp.asarray(rng.integers(2, cfg.vocab_size, (B, 7)), jnp.int32).at[1, 5:].set(0)
  return cfg, params, inputs


@needs_kernel
@pytest.mark.parametrize('name', ['t5_tiny', 't5_1_1_tiny', 'decoder_tiny'])
def test_cpu_kernel_backend_decodes_the_same_tokens_as_xla(name):
  cfg, params, inputs = setup(name)
  assert backend_lib.get_backend('auto', cfg) is backend_lib.CPU_KERNELS
  xla = decode.greedy(params, cfg, inputs, T, stop_at_eos=False, backend='xla')
  rows = {tuple(r) for r in np.asarray(xla.tokens).tolist()}
  assert len(rows) == B, f'the fixture must give varied outputs, got {rows}'
  prepared = backend_lib.CPU_KERNELS.prepare(cfg, params)
  assert any(isinstance(x, cpu_matmul.PackedKernel) for x in jax.tree.leaves(
      prepared, is_leaf=lambda x: isinstance(x, cpu_matmul.PackedKernel)))
  for p in (params, prepared):   # training layout (kernels for attention only) and packed
    got = decode.greedy(p, cfg, inputs, T, stop_at_eos=False, backend='cpu_kernels')
    np.testing.assert_array_equal(got.tokens, xla.tokens)
    np.testing.assert_allclose(got.scores, xla.scores, rtol=1e-4, atol=1e-4)
  # The kernels really run: the traced loop calls them.
  hlo = decode.greedy.lower(prepared, cfg, inputs, T, stop_at_eos=False,
                            backend='cpu_kernels').as_text()
  assert '@t5like_matmul_packed(' in hlo and '@t5like_greedy_pick(' in hlo
  assert '@t5like_' not in decode.greedy.lower(params, cfg, inputs, T, stop_at_eos=False,
                                               backend='xla').as_text()


def test_nothing_is_built_or_probed_off_the_cpu(monkeypatch):
  def no_build(*_):
    raise AssertionError('the kernel library was built or probed on a non-CPU request')
  monkeypatch.setattr(library, '_compile', no_build)
  monkeypatch.setattr(library, 'available', no_build)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  cfg, params, inputs = setup('t5_tiny')
  cfg = cfg.replace(name='probe_off_cpu')   # a fresh trace of the jitted decoders
  assert backend_lib.get_backend('auto', cfg) is backend_lib.XLA
  prepared = decode.prepare_params(cfg, params)
  assert not any(isinstance(x, cpu_matmul.PackedKernel) for x in jax.tree.leaves(
      prepared, is_leaf=lambda x: isinstance(x, cpu_matmul.PackedKernel)))
  out = decode.greedy(prepared, cfg, inputs, 3, stop_at_eos=False)
  assert out.tokens.shape == (B, 3)
  with pytest.raises(ValueError, match="runs on the CPU, but jax's default backend is 'gpu'"):
    backend_lib.get_backend('cpu_kernels', cfg)


def test_backend_choice_errors_name_the_problem():
  cfg = get_variant('t5_tiny')
  with pytest.raises(ValueError, match="choose one of \\['auto', 'xla', 'cpu_kernels'\\]"):
    backend_lib.get_backend('tpu_kernels', cfg)
  bf16 = cfg.replace(precision='bf16')
  assert backend_lib.get_backend('auto', bf16) is backend_lib.XLA
  with pytest.raises(ValueError, match='float32'):
    backend_lib.get_backend('cpu_kernels', bf16)
  assert backend_lib.get_backend('xla', cfg) is backend_lib.XLA
