"""Matmul FLOP counts against the traced program and XLA's cost analysis (no weights allocated).

XLA's HloCostAnalysis counts a while-loop body once whatever its trip count, and nn.scan lowers
the layer stack to a while loop; the XLA comparison therefore unrolls the scan (flax's `unroll`,
patched in for the test only). It then counts every instruction: the dots are exactly our figure
and the rest is elementwise work (softmax, norms, activations, residual adds, masks), so our
count is a tight lower bound (0.2% below XLA for t5_small at 128 + 128 tokens).
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from t5like.config import get_variant
from t5like.models import abstract_params, build_model
from t5like.models import flops


def _inputs(cfg, batch, inputs_len, targets_len):
  dec = jax.ShapeDtypeStruct((batch, targets_len), jnp.int32)
  if cfg.is_encdec:
    return jax.ShapeDtypeStruct((batch, inputs_len), jnp.int32), dec
  return (dec,)


def _apply(cfg):
  model = build_model(cfg)
  return lambda p, *a: model.apply({'params': p}, *a)


def _dot_flops(jaxpr, multiplier=1):
  """Sum over dot_general equations of 2 * prod(output) * prod(contracted), scan bodies times
  their length."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
    assert eqn.primitive.name != 'while', 'a while loop of unknown trip count'
    inner = eqn.params['length'] if eqn.primitive.name == 'scan' else 1
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          total += _dot_flops(sub, inner)
  return multiplier * total


def test_training_step_of_t5_small_matches_the_project_figure():
  """t5_small, batch 8, 128 input + 128 target tokens: 3x forward = 3.86e11 FLOPs."""
  cfg = get_variant('t5_small')
  step = flops.train_step_flops(cfg, 8, 128, 128)
  assert step == pytest.approx(3.86e11, rel=0.01)
  assert step == 3 * flops.forward_flops(cfg, 8, 128, 128)
  # By hand: per encoder token and layer 4 projections (8*D*D), QK + PV over 128 keys
  # (4*128*D), FFN (4*D*F); the decoder adds cross-attention (q, o, and k, v over the encoder
  # tokens, QK + PV); logits 2*D*V per target token; the relative-bias one-hot einsums.
  D, F, V, L, n = 512, 2048, 32128, 6, 8 * 128
  enc = L * n * (8 * D * D + 4 * 128 * D + 4 * D * F)
  dec = L * n * (8 * D * D + 4 * 128 * D + 8 * D * D + 4 * 128 * D + 4 * D * F)
  relpos = 2 * (2 * 128 * 128 * 32 * 8)
  assert flops.forward_flops(cfg, 8, 128, 128) == enc + dec + 2 * n * D * V + relpos


@pytest.mark.parametrize('name,overrides,batch,inputs_len,targets_len', [
    ('t5_small', {}, 2, 128, 64),
    ('t5_1_1_small', {}, 1, 32, 48),
    ('decoder_small', {}, 2, 0, 96),
    ('decoder_small', dict(position='relative'), 1, 0, 40),
    ('t5_tiny', dict(shared_layer_groups=1), 3, 12, 8),
])
def test_forward_flops_equal_the_dot_generals_of_the_program(name, overrides, batch, inputs_len,
                                                             targets_len):
  """Exactly the einsums the traced forward pass runs (relative one-hot einsum included)."""
  cfg = get_variant(name, **overrides)
  jaxpr = jax.make_jaxpr(_apply(cfg))(abstract_params(cfg),
                                      *_inputs(cfg, batch, inputs_len, targets_len))
  assert _dot_flops(jaxpr.jaxpr) == flops.forward_flops(cfg, batch, inputs_len, targets_len)


def test_forward_flops_against_xla_cost_analysis(monkeypatch):
  cfg = get_variant('t5_small')
  B, S, T = 1, 128, 128
  args = (abstract_params(cfg),) + _inputs(cfg, B, S, T)
  ours = flops.forward_flops(cfg, B, S, T)
  # As compiled (scan = while loop): XLA counts one encoder and one decoder layer only.
  rolled = jax.jit(_apply(cfg)).lower(*args).cost_analysis()['flops']
  one_layer = (ours - flops.forward_flops(cfg.replace(num_encoder_layers=1, num_decoder_layers=1),
                                          B, S, T))
  assert rolled < ours - 0.9 * one_layer
  # Unrolled, so that XLA sees every layer.
  scan = nn.scan
  monkeypatch.setattr(nn, 'scan', lambda *a, **kw: scan(*a, **{**kw, 'unroll': kw['length']}))
  xla = jax.jit(_apply(cfg)).lower(*args).compile().cost_analysis()['flops']
  print(f'\nt5_small forward, B={B}, {S}+{T} tokens: ours {ours:.6e}, XLA {xla:.6e} '
        f'(ratio {ours / xla:.4f}); XLA with the layer scan rolled: {rolled:.4e}')
  assert 0.99 * xla <= ours <= xla    # a tight lower bound: XLA adds the elementwise ops
  # The difference is elementwise work: a few ops per attention score and per activation.
  scores = (cfg.num_encoder_layers * S * S + cfg.num_decoder_layers * (T * T + T * S))
  elementwise = xla - ours
  assert elementwise < 20 * cfg.num_heads * B * scores + 20 * B * (S + T) * cfg.d_ff * 6


def test_flops_per_token_definition():
  enc = get_variant('t5_small')
  assert flops.flops_per_token(enc, 128, 128) == flops.train_step_flops(enc, 1, 128, 128) / 256
  assert (flops.flops_per_token(enc, 128, 128, batch=8) ==
          flops.train_step_flops(enc, 8, 128, 128) / (8 * 256))
  # Batch-independent except for the batch-shared relative-bias einsum (~1e-4).
  assert flops.flops_per_token(enc, 128, 128, batch=8) == pytest.approx(
      flops.flops_per_token(enc, 128, 128), rel=1e-3)
  dec = get_variant('decoder_small')
  assert flops.flops_per_token(dec, 0, 512) == flops.train_step_flops(dec, 1, 0, 512) / 512
  assert flops.forward_flops(dec, 4, 999, 64) == flops.forward_flops(dec, 4, 0, 64)  # ignored
  # ~6N for a decoder at short length (N without embeddings, plus the logits matrix).
  n_matmul = dec.num_decoder_layers * (4 * 512 * 512 + 3 * 512 * 1408) + 512 * 32128
  assert flops.flops_per_token(dec, 0, 16) == pytest.approx(6 * n_matmul, rel=0.01)


def test_components():
  relu, gated = get_variant('t5_small'), get_variant('t5_1_1_small')
  assert flops.ffn_flops(relu, 10) == 2 * 2 * 10 * 512 * 2048
  assert flops.ffn_flops(gated, 10) == 3 * 2 * 10 * 512 * 1024
  assert flops.relpos_flops(get_variant('decoder_small'), 8, 8) == 0  # RoPE: no bias einsum
  # Causal self-attention is counted over the full square, like bidirectional attention.
  enc_attn = flops.attention_flops(relu, 1, 16, 16, 16)
  assert enc_attn == 4 * 2 * 16 * 512 * 512 + 2 * 2 * 16 * 16 * 512
  # Shared layer weights do not change the work.
  shared = relu.replace(shared_layer_groups=2)
  assert flops.forward_flops(shared, 2, 64, 32) == flops.forward_flops(relu, 2, 64, 32)
  parts = flops.forward_flops_breakdown(relu, 2, 64, 32)
  assert sum(parts.values()) == flops.forward_flops(relu, 2, 64, 32)
  assert set(parts) == {'encoder_attention', 'encoder_ffn', 'encoder_relpos',
                        'decoder_self_attention', 'decoder_cross_attention', 'decoder_ffn',
                        'decoder_relpos', 'logits'}
