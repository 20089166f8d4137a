"""decode.greedy / sample / beam_search against step-by-step full forwards, EOS handling, the
sampling filters, and the decoding parameter layout (prepare_params)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.infer import decode
from t5like.models import build_model, init_cache
from t5like.infer import backend as backend_lib
from t5like.models.random_weights import random_params

B, S, T = 2, 10, 6
jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})


@functools.lru_cache(maxsize=None)
def setup(name):
  cfg = get_variant(name)
  # Spread enough that greedy outputs vary (fresh inits of tied models mostly repeat one token).
  params = random_params(cfg, embed_std=0.3, std=0.2)
  rng = np.random.RandomState(1)
  if cfg.is_encdec:
    inputs = jnp.asarray(rng.randint(2, cfg.vocab_size, (B, S)), jnp.int32).at[1, 7:].set(0)
  else:   # right-padded prompts of lengths 5 and 3
    inputs = jnp.asarray(rng.randint(2, cfg.vocab_size, (B, 5)), jnp.int32).at[1, 3:].set(0)
  return cfg, params, inputs


@functools.lru_cache(maxsize=None)
def full_forward(cfg):
  model = build_model(cfg)
  return jit(lambda p, *a: model.apply({'params': p}, *a))


def reference_greedy(cfg, params, inputs, steps):
  """Greedy decoding by re-running the full forward on the whole prefix at every step. The prefix
  lives in a fixed-size buffer (one compile): causality keeps later slots from mattering."""
  f = full_forward(cfg)
  if cfg.is_encdec:
    dec = jnp.full((inputs.shape[0], steps), cfg.decoder_start_id, jnp.int32)
    for t in range(steps - 1):
      nxt = jnp.argmax(f(params, inputs, dec)[:, t], axis=-1).astype(jnp.int32)
      dec = dec.at[:, t + 1].set(nxt)
    last = jnp.argmax(f(params, inputs, dec)[:, -1], axis=-1).astype(jnp.int32)
    return np.asarray(jnp.concatenate([dec[:, 1:], last[:, None]], axis=1))
  lengths = np.asarray(decode.prompt_lengths(inputs))
  seq = jnp.concatenate([inputs, jnp.zeros((inputs.shape[0], steps), jnp.int32)], axis=1)
  rows = np.arange(inputs.shape[0])
  for t in range(steps):
    nxt = jnp.argmax(f(params, seq)[rows, lengths - 1 + t], axis=-1).astype(jnp.int32)
    seq = seq.at[rows, lengths + t].set(nxt)
  return np.stack([np.asarray(seq[r, n:n + steps]) for r, n in zip(rows, lengths)])


def sequence_logprob(cfg, params, inputs, new_tokens):
  """Sum of log p(token) of `new_tokens` [B, T] under a full forward (encoder-decoder)."""
  start = jnp.full((inputs.shape[0], 1), cfg.decoder_start_id, jnp.int32)
  dec = jnp.concatenate([start, new_tokens[:, :-1]], axis=1)
  logp = jax.nn.log_softmax(full_forward(cfg)(params, inputs, dec))
  return jnp.take_along_axis(logp, new_tokens[..., None], axis=-1)[..., 0].sum(-1)


@pytest.mark.parametrize('name', ['t5_tiny', 't5_1_1_tiny', 'decoder_tiny'])
def test_greedy_equals_argmax_of_full_forwards(name):
  cfg, params, inputs = setup(name)
  out = decode.greedy(params, cfg, inputs, T, stop_at_eos=False)
  assert out.tokens.shape == (B, T) and out.lengths.tolist() == [T] * B
  np.testing.assert_array_equal(np.asarray(out.tokens), reference_greedy(cfg, params, inputs, T))
  if cfg.is_encdec:   # the reported score is the sequence's log-probability
    np.testing.assert_allclose(out.scores, sequence_logprob(cfg, params, inputs, out.tokens),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', ['t5_tiny', 'decoder_tiny'])
def test_prepared_params_decode_identically(name):
  cfg, params, inputs = setup(name)
  prepared = decode.prepare_params(cfg, params, backend='xla')
  assert 'layers' not in prepared['decoder']['stack']
  assert sorted(prepared['decoder']['stack']) == [f'group_{g}' for g in range(
      cfg.num_decoder_layers)]
  assert decode.prepare_params(cfg, prepared) is not None   # idempotent
  a = decode.greedy(params, cfg, inputs, T, stop_at_eos=False)
  b = decode.greedy(prepared, cfg, inputs, T, stop_at_eos=False)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def test_beam_size_one_equals_greedy():
  cfg, params, inputs = setup('t5_tiny')
  greedy = decode.greedy(params, cfg, inputs, T, stop_at_eos=False)
  beam = decode.beam_search(params, cfg, inputs, T, num_beams=1, alpha=0.0, stop_at_eos=False)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-4, atol=1e-4)


def test_beam_search_scores_are_those_of_its_sequences():
  cfg, params, inputs = setup('t5_tiny')
  beam = decode.beam_search(params, cfg, inputs, T, num_beams=4, alpha=0.0, stop_at_eos=False)
  greedy = decode.greedy(params, cfg, inputs, T, stop_at_eos=False)
  np.testing.assert_allclose(beam.scores, sequence_logprob(cfg, params, inputs, beam.tokens),
                             rtol=1e-4, atol=1e-4)
  # Four beams find a sequence at least as likely as greedy's on these inputs.
  assert bool(jnp.all(beam.scores >= greedy.scores - 1e-4))


def test_beam_search_rejects_decoder_only():
  cfg, params, inputs = setup('decoder_tiny')
  with pytest.raises(ValueError, match='encoder-decoder'):
    decode.beam_search(params, cfg, inputs, T)


def test_rows_stop_at_their_own_eos():
  """With EOS set to the token greedy emits second in row 0, row 0 stops there (zeros after) and
  row 1 runs on unchanged."""
  cfg, params, inputs = setup('t5_tiny')
  free = np.asarray(decode.greedy(params, cfg, inputs, T, stop_at_eos=False).tokens)
  eos = int(free[0, 1])
  assert eos not in free[1].tolist() and eos != free[0, 0], 'pick inputs where EOS is unambiguous'
  out = decode.greedy(params, cfg.replace(eos_id=eos), inputs, T)
  assert out.lengths.tolist() == [2, T]
  assert np.asarray(out.tokens)[0].tolist() == free[0, :2].tolist() + [0] * (T - 2)
  np.testing.assert_array_equal(np.asarray(out.tokens)[1], free[1])


def test_sampling_limits_and_determinism():
  cfg, params, inputs = setup('t5_tiny')
  greedy = decode.greedy(params, cfg, inputs, T, stop_at_eos=False).tokens
  key = jax.random.key(0)
  for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=1), dict(top_p=1e-6)):
    out = decode.sample(params, cfg, inputs, T, key, stop_at_eos=False, **kw)
    np.testing.assert_array_equal(out.tokens, greedy, err_msg=str(kw))
  a = decode.sample(params, cfg, inputs, T, key, temperature=1.5, stop_at_eos=False)
  b = decode.sample(params, cfg, inputs, T, key, temperature=1.5, stop_at_eos=False)
  c = decode.sample(params, cfg, inputs, T, jax.random.key(1), temperature=1.5, stop_at_eos=False)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert not np.array_equal(a.tokens, c.tokens)   # 12 draws at temperature 1.5 over 32k tokens


def test_filter_logits():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda **kw: (decode.filter_logits(logits, kw.pop('t', 1.0), kw.pop('k', 0),
                                            kw.pop('p', 1.0)) > -1e30).tolist()[0]
  assert keep(k=2) == [True, True, False, False]
  assert keep(p=0.5) == [True, False, False, False]      # 0.5 alone reaches 0.5
  assert keep(p=0.79) == [True, True, False, False]
  assert keep(p=0.81) == [True, True, True, False]
  assert keep() == [True] * 4


def test_argmax_and_token_logprob_helpers():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.normal(size=(5, 300)), jnp.float32)
  x = x.at[2, 7].set(9.0).at[2, 200].set(9.0)   # a tie: the lowest index wins, as jnp.argmax
  np.testing.assert_array_equal(decode.argmax(x), jnp.argmax(x, axis=-1))
  assert int(decode.argmax(x)[2]) == 7
  tok = jnp.asarray([3, 0, 7, 299, 10])
  expected = jnp.take_along_axis(jax.nn.log_softmax(x), tok[:, None], axis=1)[:, 0]
  np.testing.assert_allclose(decode.token_logprob(x, tok), expected, rtol=1e-6, atol=1e-6)


def test_per_layer_layout_gives_the_same_step_logits():
  """decode_step on (stacked weights, stacked cache) and, through the backend, on the decoding
  layout agree, for shared layer groups too; a per-layer cache with stacked weights is a clear
  error."""
  be = backend_lib.XLA
  for cfg in (get_variant('t5_tiny'), get_variant('decoder_tiny', num_decoder_layers=4,
                                                  shared_layer_groups=2)):
    params = random_params(cfg, seed=1, embed_std=0.3, std=0.2)
    model = build_model(cfg)
    step = jit(lambda p, t, c: model.apply({'params': p}, t, c, method='decode_step'))

    def be_step(p, t, c):
      with be.attached():
        return model.apply({'params': p}, t, c, method='decode_step')
    be_step = jit(be_step)
    cache = init_cache(cfg, B, 4, S)
    if cfg.is_encdec:
      enc = jnp.asarray(np.random.RandomState(2).randint(2, cfg.vocab_size, (B, S)), jnp.int32)
      cache = jit(lambda p, e, c: model.apply({'params': p}, e, c, method='prefill'))(
          params, enc, cache)
    tok = jnp.asarray([[0], [0]], jnp.int32)
    ref, ref_cache = step(params, tok, cache)
    flat_params, flat_cache = be.layout(cfg, params), be.decoding_cache(cache)
    got, got_cache = be_step(flat_params, tok, flat_cache)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.stack(got_cache['self_k']), ref_cache['self_k'], atol=1e-6)
    # A second step from each carries on equally.
    ref2, _ = step(params, tok + 5, ref_cache)
    got2, _ = be_step(flat_params, tok + 5, got_cache)
    np.testing.assert_allclose(got2, ref2, rtol=1e-5, atol=1e-5)
    assert backend_lib.split_layers(cfg, flat_params) is flat_params
    with pytest.raises(ValueError, match='per-layer weights'):
      be_step(params, tok, flat_cache)
