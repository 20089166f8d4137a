"""EncoderDecoder / DecoderOnly on tiny configs: shapes, dtypes, masks, packing, KV cache, params.

Every test uses the same few shapes (B=2, S=12, T=8) so that the jitted functions below compile
once per config and are shared across tests.
"""
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import (VARIANTS, ConfigError, ModelConfig, QuantConfig, from_dict, get_variant,
                           to_dict)
from t5like.models import abstract_params, build_model, init_cache, param_count
from t5like.models.layers import REMAT_POLICIES
from t5like.models.random_weights import random_params

B, S, T = 2, 12, 8
# Tiny shapes run in microseconds; what costs is compiling. LLVM's cheapest optimisation level
# halves XLA's CPU compile time.
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
ENCDEC = ('t5_tiny', 't5_1_1_tiny')
DECODERS = {'decoder_rope': dict(), 'decoder_relative': dict(position='relative')}


def cfg_of(name, **overrides):
  if name in DECODERS:
    return get_variant('decoder_tiny', **DECODERS[name], **overrides)
  return get_variant(name, **overrides)


def _structure(cfg):
  """Configs that differ only in dropout, precision or remat share one parameter tree."""
  return cfg.replace(dropout_rate=0.0, precision='f32', remat_policy='none', name='custom')


@functools.lru_cache(maxsize=None)
def _params(cfg):
  # Random numpy weights (no compile of `init` per config); test_layers.py runs real initialisers.
  return random_params(cfg)


def params_of(cfg):
  return _params(_structure(cfg))


@functools.lru_cache(maxsize=None)
def forward_fn(cfg, method=None):
  model = build_model(cfg)
  return jit(lambda p, *args, **kw: model.apply({'params': p}, *args, method=method, **kw))


def forward(cfg, *args, params=None, **kw):
  return forward_fn(cfg)(params_of(cfg) if params is None else params, *args, **kw)


def _arange(b, n):
  return jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))


def tokens(shape, cfg, seed=0, low=2):
  return jnp.asarray(np.random.RandomState(seed).randint(low, cfg.vocab_size, shape), jnp.int32)


def decoder_inputs(cfg, seed=1):
  """Decoder tokens that begin with T5's decoder start id."""
  return tokens((B, T), cfg, seed).at[:, 0].set(cfg.decoder_start_id)


def model_inputs(cfg, seed=0):
  if cfg.is_encdec:
    return tokens((B, S), cfg, seed), decoder_inputs(cfg, seed + 1)
  return (decoder_inputs(cfg, seed + 1),)


def assert_close(a, b, atol=1e-5, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def assert_differs(a, b, min_diff=1e-3):
  diff = float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))
  assert diff > min_diff, f'expected a change, max |diff| = {diff}'


def dot_generals(jaxpr):
  """Every dot_general equation of a jaxpr, recursing into scan / pjit / remat bodies."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      out.append(eqn)
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          out.extend(dot_generals(sub))
  return out


# ----------------------------------------------------------------------------- shapes, dtypes


@pytest.mark.parametrize('name', ENCDEC + ('decoder_rope',))
@pytest.mark.parametrize('precision', ['f32', 'bf16'])
def test_shapes_and_dtypes_per_policy(name, precision):
  cfg = cfg_of(name, precision=precision)
  params = abstract_params(cfg)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  model = build_model(cfg)
  inputs = model_inputs(cfg)
  apply = lambda p, *a: model.apply({'params': p}, *a)
  out = jax.eval_shape(apply, params, *inputs)
  assert out.shape == (B, T, cfg.vocab_size) and out.dtype == jnp.float32
  dots = dot_generals(jax.make_jaxpr(apply)(params, *inputs).jaxpr)
  in_dtypes = [tuple(v.aval.dtype for v in eqn.invars) for eqn in dots]
  table_shape = (cfg.num_heads, cfg.relative_attention_num_buckets)
  relpos = [any(v.aval.shape == table_shape for v in eqn.invars) for eqn in dots]
  if precision == 'f32':
    assert all(d == (jnp.float32, jnp.float32) for d in in_dtypes)
  else:
    # Every projection, attention and logits matmul runs in bf16; only T5's one-hot
    # relative-position einsum stays f32 (an exact table lookup).
    n_bf16 = 0
    for d, is_relpos in zip(in_dtypes, relpos):
      if is_relpos:
        assert d == (jnp.float32, jnp.float32)
      else:
        assert d == (jnp.bfloat16, jnp.bfloat16), d
        n_bf16 += 1
    # nn.scan traces one layer body per stack: q, k, v, o, QK^T, PV (+ the same for
    # cross-attention) and the FFN matrices; plus the logits.
    ffn = 3 if cfg.ffn_activation == 'gated-gelu' else 2
    expected = (6 + ffn) + (6 if cfg.is_encdec else 0) + 1 + ((6 + ffn) if cfg.is_encdec else 0)
    assert n_bf16 == expected, (n_bf16, expected)


def test_bf16_logits_close_to_f32():
  cfg = cfg_of('decoder_rope')
  params = params_of(cfg)
  inputs = model_inputs(cfg)
  f32 = forward(cfg, *inputs)
  bf16 = forward_fn(cfg.replace(precision='bf16'))(params, *inputs)
  assert bf16.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(f32)))
  assert float(jnp.max(jnp.abs(bf16 - f32))) < 0.05 * scale
  assert float(jnp.max(jnp.abs(bf16 - f32))) > 0  # really computed in bf16


def test_init_cache_shapes_and_dtype():
  cfg = cfg_of('t5_tiny', precision='bf16')
  cache = init_cache(cfg, B, T, S)
  L, N, H = cfg.num_decoder_layers, cfg.num_heads, cfg.head_dim
  assert cache['index'].shape == (B,) and cache['index'].dtype == jnp.int32
  assert cache['self_k'].shape == (L, B, N, H, T) and cache['self_k'].dtype == jnp.bfloat16
  assert cache['self_v'].shape == (L, B, N, T, H) and cache['self_v'].dtype == jnp.bfloat16
  assert cache['cross_k'].shape == (L, B, N, H, S) and cache['cross_v'].shape == (L, B, N, S, H)
  assert cache['encoder_mask'].shape == (B, S)
  assert 'cross_k' not in init_cache(cfg_of('decoder_rope'), B, T)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize('name', ENCDEC + tuple(DECODERS))
def test_causal_masking(name):
  """Logits at t do not depend on decoder tokens after t (and do depend on those before)."""
  cfg = cfg_of(name)
  *enc, dec = model_inputs(cfg)
  t = 4
  # Row 0 and row 1 share tokens up to t; after t, row 1 has other tokens.
  dec = dec.at[1].set(dec[0]).at[1, t + 1:].set(tokens((T - t - 1,), cfg, seed=7))
  enc = [e.at[1].set(e[0]) for e in enc]
  logits = forward(cfg, *enc, dec)
  assert_close(logits[0, :t + 1], logits[1, :t + 1])
  assert_differs(logits[0, t + 1:], logits[1, t + 1:])


def test_encoder_padding_via_segment_ids():
  """Tokens at padded encoder positions (segment id 0) change nothing at non-padded positions
  of the encoder output, nor the decoder logits."""
  cfg = cfg_of('t5_tiny')
  enc, dec = model_inputs(cfg)
  seg = jnp.asarray([[1] * 9 + [0] * 3, [1] * 6 + [0] * 6], jnp.int32)
  enc2 = jnp.where(seg == 0, tokens((B, S), cfg, seed=9), enc)
  assert bool(jnp.any(enc2 != enc))
  encode = forward_fn(cfg, 'encode')
  p = params_of(cfg)
  e1, e2 = encode(p, enc, seg), encode(p, enc2, seg)
  valid = np.asarray(seg) != 0
  assert_close(np.asarray(e1)[valid], np.asarray(e2)[valid])
  assert_differs(np.asarray(e1)[~valid], np.asarray(e2)[~valid])  # they are really different
  # (The packing test's signature: encoder / decoder segment ids and positions.)
  ones, pos_S, pos_T = jnp.ones((B, T), jnp.int32), _arange(B, S), _arange(B, T)
  assert_close(forward(cfg, enc, dec, seg, ones, pos_S, pos_T),
               forward(cfg, enc2, dec, seg, ones, pos_S, pos_T))


def test_encoder_padding_by_pad_id():
  """Right-padding the encoder input with id 0 gives the logits of the unpadded input."""
  cfg = cfg_of('t5_tiny')
  enc, dec = model_inputs(cfg)
  n = 8
  enc_pad = enc.at[:, n:].set(cfg.pad_id)
  assert_close(forward(cfg, enc_pad, dec), forward(cfg, enc[:, :n], dec))
  assert_differs(forward(cfg, enc, dec), forward(cfg, enc_pad, dec))


@pytest.mark.parametrize('name', ('t5_1_1_tiny', 'decoder_rope'))
def test_decoder_start_id_is_attended(name):
  """Decoder inputs begin with id 0 (= pad id): it must be attended, not masked. Changing the
  embedding of id 0 (untied output layer) changes the logits at every later position."""
  cfg = cfg_of(name)
  assert cfg.decoder_start_id == cfg.pad_id == 0 and not cfg.tie_embeddings
  inputs = model_inputs(cfg)
  assert bool(jnp.all(inputs[-1][:, 0] == 0)) and bool(jnp.all(inputs[-1][:, 1:] != 0))
  p = params_of(cfg)
  p2 = jax.tree.map(lambda x: x, p)
  emb = p2['shared_embedding']['embedding']
  p2['shared_embedding']['embedding'] = emb.at[0].add(1.0)
  a, b = forward(cfg, *inputs), forward(cfg, *inputs, params=p2)
  for t in range(T):
    assert_differs(a[:, t], b[:, t], 1e-4)


def test_decoder_start_id_vs_other_id_changes_logits():
  cfg = cfg_of('t5_tiny')
  enc, dec = model_inputs(cfg)
  dec = dec.at[1].set(dec[0]).at[1, 0].set(5)
  enc = enc.at[1].set(enc[0])
  logits = forward(cfg, enc, dec)
  for t in range(T):
    assert_differs(logits[0, t], logits[1, t], 1e-4)


# ----------------------------------------------------------------------------- relative bias


@pytest.mark.parametrize('name', ENCDEC + tuple(DECODERS))
def test_one_relative_bias_table_per_stack(name):
  cfg = cfg_of(name)
  flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
  tables = {jax.tree_util.keystr(path): x.shape for path, x in flat if 'rel_embedding' in
            jax.tree_util.keystr(path)}
  expected = {'t5_tiny': 2, 't5_1_1_tiny': 2, 'decoder_relative': 1, 'decoder_rope': 0}[name]
  assert len(tables) == expected, tables
  assert set(tables.values()) <= {(cfg.num_heads, 32)}  # no leading 'layers' axis
  stacks = {re.match(r"\['(\w+)'\]", k).group(1) for k in tables}
  assert len(stacks) == expected  # one per stack (encoder, decoder)


# ----------------------------------------------------------------------------- packing


def test_packing_encoder_decoder():
  """Two examples packed into one row give the logits of each example run alone."""
  cfg = cfg_of('t5_tiny')
  x = tokens((7,), cfg, 11)
  y = tokens((5,), cfg, 12)
  a = tokens((5,), cfg, 13).at[0].set(0)
  b = tokens((3,), cfg, 14).at[0].set(0)
  enc_packed = jnp.concatenate([x, y])[None].repeat(B, 0)
  dec_packed = jnp.concatenate([a, b])[None].repeat(B, 0)
  enc_seg = jnp.asarray([1] * 7 + [2] * 5)[None].repeat(B, 0)
  dec_seg = jnp.asarray([1] * 5 + [2] * 3)[None].repeat(B, 0)
  dec_pos = jnp.asarray(list(range(5)) + list(range(3)))[None].repeat(B, 0)
  enc_pos = jnp.asarray(list(range(7)) + list(range(5)))[None].repeat(B, 0)
  packed = forward(cfg, enc_packed, dec_packed, enc_seg, dec_seg, enc_pos, dec_pos)
  pad = lambda v, n: jnp.pad(v, (0, n - v.shape[0]))
  alone = forward(cfg, jnp.stack([pad(x, S), pad(y, S)]), jnp.stack([pad(a, T), pad(b, T)]))
  assert_close(packed[0, :5], alone[0, :5])
  assert_close(packed[0, 5:], alone[1, :3])


@pytest.mark.parametrize('name', tuple(DECODERS))
def test_packing_decoder_only(name):
  """Packed rows (segment ids + positions; RoPE reads the positions) equal each run alone."""
  cfg = cfg_of(name)
  a = tokens((5,), cfg, 13)
  b = tokens((3,), cfg, 14)
  packed_row = jnp.concatenate([a, b])[None].repeat(B, 0)
  seg = jnp.asarray([1] * 5 + [2] * 3)[None].repeat(B, 0)
  pos = jnp.asarray(list(range(5)) + list(range(3)))[None].repeat(B, 0)
  packed = forward(cfg, packed_row, seg, pos)
  pad = lambda v: jnp.pad(v, (0, T - v.shape[0]))
  alone = forward(cfg, jnp.stack([pad(a), pad(b)]))
  assert_close(packed[0, :5], alone[0, :5])
  assert_close(packed[0, 5:], alone[1, :3])
  if cfg.position == 'rope':
    # RoPE is shift-invariant, so wrong positions are needed to see that they are read.
    wrong = forward(cfg, packed_row, seg, pos.at[:, 5:].set(0))
    assert_differs(wrong[0, 6:], alone[1, 1:3], 1e-4)


# ----------------------------------------------------------------------------- KV cache


@functools.lru_cache(maxsize=None)
def step_fn(cfg):
  return forward_fn(cfg, 'decode_step')


def decode_one_by_one(cfg, params, dec, cache):
  logits = []
  for t in range(dec.shape[1]):
    out, cache = step_fn(cfg)(params, dec[:, t:t + 1], cache)
    logits.append(out)
  return jnp.concatenate(logits, axis=1), cache


def test_cache_decoding_equals_full_forward_encdec():
  cfg = cfg_of('t5_tiny')
  p = params_of(cfg)
  enc, dec = model_inputs(cfg)
  enc = enc.at[1, 9:].set(0)  # one row with encoder padding
  full = forward(cfg, enc, dec)
  cache = forward_fn(cfg, 'prefill')(p, enc, init_cache(cfg, B, T, S))
  assert cache['encoder_mask'].tolist() == (enc != 0).tolist()
  stepped, cache = decode_one_by_one(cfg, p, dec, cache)
  assert cache['index'].tolist() == [T] * B
  assert stepped.shape == full.shape
  assert_close(stepped, full, atol=2e-5)


@pytest.mark.parametrize('name', tuple(DECODERS))
def test_cache_decoding_equals_full_forward_decoder_only(name):
  cfg = cfg_of(name)
  p = params_of(cfg)
  (dec,) = model_inputs(cfg)
  stepped, cache = decode_one_by_one(cfg, p, dec, init_cache(cfg, B, T))
  assert cache['index'].tolist() == [T] * B
  assert_close(stepped, forward(cfg, dec), atol=2e-5)


@pytest.mark.parametrize('name', tuple(DECODERS))
def test_multi_token_prefill_with_per_row_lengths(name):
  """Prefill right-padded prompts of different lengths in one call, set each row's cache index
  to its prompt length, then decode one token at a time: rows sit at different positions, and
  every logit equals the full forward pass of that row's sequence."""
  cfg = cfg_of(name)
  p = params_of(cfg)
  (seq,) = model_inputs(cfg)                # row b's full sequence: prompt then continuation
  lengths = [5, 3]
  P = max(lengths)
  prompts = jnp.stack([seq[b, :P].at[n:].set(0) for b, n in enumerate(lengths)])
  cache = init_cache(cfg, B, T)
  prefill_logits, cache = step_fn(cfg)(p, prompts, cache)
  assert cache['index'].tolist() == [P] * B
  cache = dict(cache, index=jnp.asarray(lengths, jnp.int32))
  full = forward(cfg, seq)
  for b, n in enumerate(lengths):
    assert_close(prefill_logits[b, :n], full[b, :n], atol=2e-5)
  steps = T - P
  for k in range(steps):
    index = np.asarray(cache['index'])
    assert index.tolist() == [n + k for n in lengths]   # per-row cache index
    next_tokens = jnp.stack([seq[b, index[b]] for b in range(B)])[:, None]
    out, cache = step_fn(cfg)(p, next_tokens, cache)
    for b in range(B):
      assert_close(out[b, 0], full[b, index[b]], atol=2e-5)


def test_rows_decode_independently_of_each_others_position():
  """A row's step logits do not depend on where another row of the batch is."""
  cfg = cfg_of('decoder_rope')
  p = params_of(cfg)
  (seq,) = model_inputs(cfg)
  _, cache = decode_one_by_one(cfg, p, seq[:, :4], init_cache(cfg, B, T))
  moved = dict(cache, index=cache['index'].at[1].set(2))   # row 1 rewinds to position 2
  a, _ = step_fn(cfg)(p, seq[:, 4:5], cache)
  b, _ = step_fn(cfg)(p, seq[:, 4:5], moved)
  assert_close(a[0], b[0])
  assert_differs(a[1], b[1], 1e-4)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize('name,expected', [
    ('t5_small', 60_506_624), ('t5_base', 222_903_552), ('t5_large', 737_668_096),
    ('t5_1_1_small', 76_961_152)])
def test_published_parameter_counts(name, expected):
  assert param_count(abstract_params(get_variant(name))) == expected


@pytest.mark.parametrize('name,expected', [('t5_11b', 11_307_321_344),
                                           ('t5_1_1_xxl', 11_135_332_352)])
def test_eval_shape_of_largest_variants(name, expected):
  """Nothing is allocated (eval_shape); counts as transformers reports for t5-11b and
  google/t5-v1_1-xxl."""
  params = abstract_params(get_variant(name))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
  assert param_count(params) == expected


LOGICAL_NAMES = {'vocab', 'embed', 'mlp', 'heads', 'kv', 'layers', 'relpos_buckets'}


@pytest.mark.parametrize('name', ENCDEC + tuple(DECODERS))
def test_every_parameter_has_logical_axis_names(name):
  cfg = cfg_of(name, shared_layer_groups=1)
  model = build_model(cfg)
  boxed = jax.eval_shape(model.init, jax.random.key(0), *model_inputs(cfg))['params']
  leaves = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  assert leaves
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert isinstance(leaf, nn.Partitioned), f'{where} has no logical axis names'
    names = leaf.names
    assert len(names) == leaf.value.ndim, (where, names, leaf.value.shape)
    assert set(names) <= LOGICAL_NAMES, (where, names)
    in_stack = "['stack']" in where
    assert (names[0] == 'layers') == in_stack, (where, names)
    if in_stack:
      assert names.count('layers') == 1
  assert jax.tree.structure(nn.unbox(boxed)) == jax.tree.structure(abstract_params(cfg))


# ----------------------------------------------------------------------------- dropout, remat


def _primitives(jaxpr):
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for v in eqn.params.values():
      for sub in v if isinstance(v, (tuple, list)) else (v,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          names |= _primitives(sub)
  return names


def test_dropout_off_when_deterministic():
  """deterministic=True is the very computation of the dropout-free model: no random bits."""
  cfg = cfg_of('decoder_rope', dropout_rate=0.3)
  inputs = model_inputs(cfg)
  params = abstract_params(cfg)

  def jaxpr(c, deterministic):
    fn = lambda p, k, *a: build_model(c).apply({'params': p}, *a, deterministic=deterministic,
                                               rngs={'dropout': k})
    return jax.make_jaxpr(fn)(params, jax.random.key(0), *inputs)

  assert str(jaxpr(cfg, True)) == str(jaxpr(cfg.replace(dropout_rate=0.0), True))
  assert 'random_bits' not in _primitives(jaxpr(cfg, True).jaxpr)
  assert 'random_bits' in _primitives(jaxpr(cfg, False).jaxpr)


def test_dropout_on_when_not_deterministic():
  cfg = cfg_of('decoder_rope', dropout_rate=0.3)
  model = build_model(cfg)
  train_mode = jit(lambda p, k, *a: model.apply({'params': p}, *a, deterministic=False,
                                                rngs={'dropout': k}))
  p = params_of(cfg)
  inputs = model_inputs(cfg)
  eval_out = forward(cfg.replace(dropout_rate=0.0), *inputs)
  # 'rbg' keys: XLA's RngBitGenerator compiles in a fraction of threefry's time on CPU.
  k1, k2 = jax.random.key(1, impl='rbg'), jax.random.key(2, impl='rbg')
  t1, t1_again, t2 = train_mode(p, k1, *inputs), train_mode(p, k1, *inputs), train_mode(p, k2, *inputs)
  assert_close(t1, t1_again, 0, 0)
  assert_differs(t1, eval_out)
  assert_differs(t1, t2)


@functools.lru_cache(maxsize=None)
def loss_and_grads_fn(cfg):
  model = build_model(cfg)

  def loss_fn(p, inputs, targets):
    logits = model.apply({'params': p}, *inputs)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

  return jit(jax.value_and_grad(loss_fn))


def loss_and_grads(cfg, params, inputs, targets):
  return loss_and_grads_fn(cfg)(params, inputs, targets)


def _check_remat(policies):
  cfg = cfg_of('decoder_relative')
  p = params_of(cfg)
  inputs = model_inputs(cfg)
  targets = tokens((B, T), cfg, 21)
  ref_loss, ref_grads = loss_and_grads(cfg, p, inputs, targets)
  assert sorted(REMAT_POLICIES) == ['dots', 'dots_with_no_batch_dims', 'full', 'none',
                                    'save_nothing_but_params']
  # 'save_nothing_but_params' is the same checkpoint policy as 'full' (weights are scan inputs,
  # never saved residuals), so it is not compiled twice.
  assert REMAT_POLICIES['save_nothing_but_params'] is REMAT_POLICIES['full']
  for policy in policies:
    loss, grads = loss_and_grads(cfg.replace(remat_policy=policy), p, inputs, targets)
    assert_close(loss, ref_loss, 1e-6, 1e-6)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6, 1e-5), grads, ref_grads)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(ref_grads)) > 0


def test_remat_full_same_loss_and_gradients():
  _check_remat(['full'])


@pytest.mark.slow
def test_remat_dots_policies_same_loss_and_gradients():
  _check_remat(['dots', 'dots_with_no_batch_dims'])


def test_remat_is_in_the_program():
  """The remat policy really wraps the layer stack (a 'checkpoint' / remat primitive)."""
  cfg = cfg_of('decoder_relative', remat_policy='full')
  fn = lambda p, *a: build_model(cfg).apply({'params': p}, *a).sum()
  prims = _primitives(jax.make_jaxpr(jax.grad(fn))(abstract_params(cfg), *model_inputs(cfg)).jaxpr)
  assert prims & {'checkpoint', 'remat', 'remat2'}, prims
  fn0 = lambda p, *a: build_model(cfg_of('decoder_relative')).apply({'params': p}, *a).sum()
  prims0 = _primitives(jax.make_jaxpr(jax.grad(fn0))(abstract_params(cfg), *model_inputs(cfg)).jaxpr)
  assert not prims0 & {'checkpoint', 'remat', 'remat2'}


def test_unknown_remat_policy_or_precision_is_a_config_error():
  with pytest.raises(ConfigError, match=r"remat_policy='sometimes'.*'dots'"):
    cfg_of('decoder_rope', remat_policy='sometimes')
  with pytest.raises(ConfigError, match=r"precision='f8'.*'bf16'"):
    cfg_of('decoder_rope', precision='f8')


# ----------------------------------------------------------------------------- configs


def test_unknown_variant_lists_known_ones():
  with pytest.raises(ConfigError) as e:
    get_variant('t5_smal')
  for name in VARIANTS:
    assert name in str(e.value)


@pytest.mark.parametrize('overrides,match', [
    (dict(arch='encoder'), 'model.arch'),
    (dict(ffn_activation='swish'), 'model.ffn_activation'),
    (dict(position='alibi'), 'model.position'),
    (dict(d_model=0), 'model.d_model'),
    (dict(num_heads=-1), 'model.num_heads'),
    (dict(num_encoder_layers=0), 'num_encoder_layers'),
    (dict(num_decoder_layers=0), 'num_decoder_layers'),
    (dict(position='rope'), 'rope'),  # RoPE only for decoder-only
    (dict(dropout_rate=1.0), 'dropout_rate'),
    (dict(shared_layer_groups=-1), 'shared_layer_groups'),
    (dict(shared_layer_groups=3), 'shared_layer_groups'),  # does not divide 2 layers
    (dict(quant={'weights': 'int3'}), 'model.quant.weights'),
    (dict(weight_quant='int3'), 'model.quant.weights'),   # an old flat name, mapped
    (dict(quant={'wieghts': 'int8'}), "unknown config key 'model.quant.wieghts'"),
    (dict(quant={'weights': 'int8'}, weight_quant='int4'), 'conflicts with model.quant.weights'),
    (dict(num_layers=2), "unknown config key 'model.num_layers'"),
    (dict(d_model='64'), 'model.d_model must be int'),
])
def test_invalid_configs_raise_config_error(overrides, match):
  with pytest.raises(ConfigError, match=re.escape(match)):
    get_variant('t5_tiny', **overrides)


def test_old_flat_quant_keys_load_into_quant_config():
  """Configs saved before QuantConfig (flat weight_quant / ... keys) load with the same meaning."""
  old = dict(to_dict(get_variant('t5_tiny')))
  del old['quant']
  old.update(weight_quant='int4', weight_quant_group_size=32, activation_quant='dynamic', qat='none')
  cfg = from_dict(ModelConfig, old, prefix='model')
  assert cfg.quant == QuantConfig(weights='int4', group_size=32, activations='dynamic')
  assert from_dict(ModelConfig, to_dict(cfg), prefix='model') == cfg
  assert cfg.replace(activation_quant='none').quant.activations == 'none'
  assert cfg.with_quant(weights='none').quant.active


def test_rope_needs_even_head_dim():
  with pytest.raises(ConfigError, match='head_dim'):
    ModelConfig(arch='decoder', position='rope', head_dim=15, num_encoder_layers=0)


# ----------------------------------------------------------------------------- shared layers


def _stack_sizes(params):
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return sum(x.size for path, x in flat if "['stack']" in jax.tree_util.keystr(path))


@pytest.mark.parametrize('name', ('t5_tiny', 'decoder_relative'))
def test_shared_layer_groups(name):
  """4 layers in 2 groups: exactly half the stacked weights; runs, caches, and equals the
  unshared model whose layers repeat each group's weights."""
  L, G = 4, 2
  base = cfg_of(name, num_encoder_layers=L if name == 't5_tiny' else 0, num_decoder_layers=L)
  shared = base.replace(shared_layer_groups=G)
  n_base, n_shared = param_count(abstract_params(base)), param_count(abstract_params(shared))
  stacked = _stack_sizes(abstract_params(base))
  assert n_base - n_shared == stacked * (L - G) // L
  # The same figure from the architecture.
  D, NH, F = base.d_model, base.num_heads * base.head_dim, base.d_ff
  ffn = (3 if base.ffn_activation == 'gated-gelu' else 2) * D * F
  enc_layer = 4 * D * NH + ffn + 2 * D
  dec_layer = (8 if base.is_encdec else 4) * D * NH + ffn + (3 if base.is_encdec else 2) * D
  assert n_base - n_shared == (L - G) * (dec_layer + (enc_layer if base.is_encdec else 0))
  if base.is_encdec:
    return  # the numerics below run once, on the cheaper-to-compile decoder-only model

  p = params_of(shared)
  inputs = model_inputs(shared)
  out = forward(shared, *inputs)
  assert out.shape == (B, T, base.vocab_size) and bool(jnp.all(jnp.isfinite(out)))
  # Layer l of the shared model uses group l // (L // G).
  expand = lambda tree: jax.tree.map(lambda x: jnp.repeat(x, L // G, axis=0), tree)
  unshared = {k: ({**v, 'stack': expand(v['stack'])} if isinstance(v, dict) and 'stack' in v else v)
              for k, v in p.items()}
  assert param_count(unshared) == n_base
  assert_close(forward(base, *inputs, params=unshared), out)
  # Cache decoding with shared layers.
  if shared.is_encdec:
    cache = forward_fn(shared, 'prefill')(p, inputs[0], init_cache(shared, B, T, S))
  else:
    cache = init_cache(shared, B, T)
  stepped, _ = decode_one_by_one(shared, p, inputs[-1], cache)
  assert_close(stepped, out, atol=2e-5)
