"""Dynamic per-token FFN top-k: dense at k = d_ff, exact top-k semantics, same in decode."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from t5like.compress import dynamic
from t5like.config import get_variant
from prune_testutil import random_params
from t5like.models import build_model, init_cache
from t5like.models.layers import MLP


def test_topk_mlp_matches_reference_and_dense_at_full_k():
  cfg = get_variant('t5_1_1_tiny')
  mlp = MLP(cfg)
  x = jax.random.normal(jax.random.key(0), (2, 5, cfg.d_model))
  variables = nn.unbox(mlp.init(jax.random.key(1), x, True))
  dense = mlp.apply(variables, x, True)
  with dynamic.ffn_topk(cfg.d_ff):
    np.testing.assert_allclose(mlp.apply(variables, x, True), dense, atol=1e-6)
  p = variables['params']
  h = jax.nn.gelu(x @ p['wi_0']['kernel']) * (x @ p['wi_1']['kernel'])
  thresh = jnp.sort(jnp.abs(h), axis=-1)[..., -16][..., None]
  want = jnp.where(jnp.abs(h) >= thresh, h, 0) @ p['wo']['kernel']
  for shape in [(2, 5), (1, 1)]:                 # dense-sparse path, gather path (1 * 16 < 128)
    xs = x[:shape[0], :shape[1]]
    with dynamic.ffn_topk(16):
      got = mlp.apply(variables, xs, True)
    np.testing.assert_allclose(got, want[:shape[0], :shape[1]], atol=1e-5)


def test_topk_decode_matches_full_forward():
  cfg = get_variant('t5_tiny')
  params = random_params(cfg)
  model = build_model(cfg)
  tok = jax.random.randint(jax.random.key(1), (1, 6), 2, cfg.vocab_size)

  @jax.jit
  def full(p):
    with dynamic.ffn_topk(8):
      return model.apply({'params': p}, tok, tok)

  @jax.jit
  def steps(p):
    with dynamic.ffn_topk(8):
      cache = model.apply({'params': p}, tok, init_cache(cfg, 1, 6, 6), method=model.prefill)
      out = []
      for t in range(6):                          # one token a step: the gather path
        logits, cache = model.apply({'params': p}, tok[:, t:t + 1], cache,
                                    method=model.decode_step)
        out.append(logits)
      return jnp.concatenate(out, axis=1)

  want = full(params)
  np.testing.assert_allclose(steps(params), want, atol=2e-5, rtol=1e-5)
  assert not np.allclose(want, model.apply({'params': params}, tok, tok), atol=1e-3)
