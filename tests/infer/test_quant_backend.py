"""Quantised (int8 / int4 weight-only) decoding through the CPU kernel backend gives the tokens of
the XLA quantised path, with the quantised kernel really running (t5like/kernels/cpu_matmul_q.cc)."""
import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.compress.quantize import quantize_params
from t5like.config import get_variant
from t5like.infer import backend as backend_lib, decode
from t5like.kernels import cpu_matmul
from t5like.models.random_weights import random_params

needs_kernel = pytest.mark.skipif(shutil.which('c++') is None and shutil.which('g++') is None,
                                  reason='no C++ compiler to build the CPU kernel')
T = 6
TARGET = {'int8': '@t5like_matmul_q8(', 'int4': '@t5like_matmul_q4('}


@functools.lru_cache(maxsize=None)
def setup(name, scheme, B=4):
  cfg = get_variant(name)
  params = random_params(cfg, embed_std=0.3, std=0.2)
  qparams, qcfg = quantize_params(params, cfg, scheme, group_size=32)
  rng = np.random.default_rng(3)
  inputs = jnp.asarray(rng.integers(2, cfg.vocab_size, (B, 7)), jnp.int32).at[1, 5:].set(0)
  return qcfg, qparams, inputs


def packed_leaves(tree):
  return [x for x in jax.tree.leaves(tree, is_leaf=backend_lib._is_packed)
          if isinstance(x, cpu_matmul.PackedQuantKernel)]


@needs_kernel
@pytest.mark.parametrize('name,scheme', [
    ('t5_tiny', 'int8'), ('t5_tiny', 'int4'), ('decoder_tiny', 'int4'),
    pytest.param('decoder_tiny', 'int8', marks=pytest.mark.slow),
    pytest.param('t5_1_1_tiny', 'int8', marks=pytest.mark.slow),
    pytest.param('t5_1_1_tiny', 'int4', marks=pytest.mark.slow)])
def test_quantised_kernel_decoding_equals_xla_quantised(name, scheme):
  cfg, params, inputs = setup(name, scheme)
  assert backend_lib.get_backend('auto', cfg) is backend_lib.CPU_KERNELS
  xla = decode.greedy(params, cfg, inputs, T, stop_at_eos=False, backend='xla')
  rows = {tuple(r) for r in np.asarray(xla.tokens).tolist()}
  assert len(rows) == inputs.shape[0], f'the fixture must give varied outputs, got {rows}'
  prepared = backend_lib.CPU_KERNELS.prepare(cfg, params)
  packed = packed_leaves(prepared)
  # Per decoder layer: self q/k/v/out, cross q/out, the FFN; plus the output layer.
  ffn = 3 if cfg.ffn_activation in ('gated-gelu', 'swiglu') else 2
  per_layer = 4 + (2 if cfg.is_encdec else 0) + ffn
  assert len(packed) == cfg.num_decoder_layers * per_layer + 1
  assert {w.scheme for w in packed} == {scheme}
  got = decode.greedy(prepared, cfg, inputs, T, stop_at_eos=False, backend='auto')
  np.testing.assert_array_equal(got.tokens, xla.tokens)
  np.testing.assert_allclose(got.scores, xla.scores, rtol=1e-4, atol=1e-4)
  # The quantised kernel runs for every packed weight (none falls back to dequantising), and the
  # float one never does.
  hlo = decode.greedy.lower(prepared, cfg, inputs, T, stop_at_eos=False,
                            backend='cpu_kernels').as_text()
  calls = hlo.split(TARGET[scheme])[1:]    # operands: x, then (panels, scales) per weight
  assert sum(o[:o.index(')')].count(',') for o in calls) // 2 >= len(packed)
  assert '@t5like_matmul_packed(' not in hlo
  # The XLA backend reads the packed params too (it unpacks them).
  again = decode.greedy(backend_lib.XLA.layout(cfg, prepared), cfg, inputs, T, stop_at_eos=False,
                        backend='xla')
  np.testing.assert_array_equal(again.tokens, xla.tokens)


@needs_kernel
@pytest.mark.parametrize('scheme', ['int4'])
def test_prompt_over_the_kernel_rows_falls_back_to_dequantised_xla(scheme):
  # 6 prompts x 7 tokens = 42 rows > MAX_ROWS in the decoder-only prefill.
  cfg, params, inputs = setup('decoder_tiny', scheme, B=6)
  assert inputs.size > cpu_matmul.MAX_ROWS
  xla = decode.greedy(params, cfg, inputs, T, stop_at_eos=False, backend='xla')
  assert len({tuple(r) for r in np.asarray(xla.tokens).tolist()}) > 1
  prepared = backend_lib.CPU_KERNELS.prepare(cfg, params)
  got = decode.greedy(prepared, cfg, inputs, T, stop_at_eos=False, backend='cpu_kernels')
  np.testing.assert_array_equal(got.tokens, xla.tokens)
  np.testing.assert_allclose(got.scores, xla.scores, rtol=1e-4, atol=1e-4)


def test_only_weight_only_quantisation_runs_on_the_kernels():
  cfg = get_variant('t5_tiny')
  for ok in (cfg.with_quant(weights='int8'), cfg.with_quant(weights='int4', group_size=32)):
    assert backend_lib.kernel_obstacle(ok) is None
  for bad in (cfg.with_quant(weights='int8', activations='dynamic'), cfg.with_quant(qat='int8'),
              cfg.with_quant(activations='dynamic')):
    assert 'float activations' in backend_lib.kernel_obstacle(bad)
    assert backend_lib.get_backend('auto', bad) is backend_lib.XLA
    with pytest.raises(ValueError, match='float activations'):
      backend_lib.get_backend('cpu_kernels', bad)
