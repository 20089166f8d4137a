"""Parameter sharing: counts fall by the expected amount; unsharing and untying are exact."""
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from t5like.compress import prune, share
from t5like.config import ConfigError, get_variant
from prune_testutil import forward, lm_batch, random_params
from t5like.models import abstract_params, param_count


def _per_layer(cfg):
  D, N, H, F = cfg.d_model, cfg.num_heads, cfg.head_dim, cfg.d_ff
  attn, ffn = 4 * D * N * H, 2 * D * F
  return attn + ffn + 2 * D, 2 * attn + ffn + 3 * D        # encoder, decoder layer (with norms)


@pytest.mark.parametrize('groups', [1, 2])
def test_sharing_reduces_count_by_expected_amount(groups):
  cfg = get_variant('t5_tiny', num_encoder_layers=4, num_decoder_layers=4)
  params = random_params(cfg)
  shared, scfg = share.share_layers(params, cfg, groups, method='mean')
  enc, dec = _per_layer(cfg)
  assert param_count(params) - param_count(shared) == (4 - groups) * (enc + dec)
  assert share.shared_param_savings(cfg, groups) == (4 - groups) * (enc + dec)
  assert scfg.shared_layer_groups == groups
  assert param_count(shared) == param_count(abstract_params(scfg))
  q = params['encoder']['stack']['layers']['layer']['attention']['query']['kernel']
  sq = shared['encoder']['stack']['layers']['layer']['attention']['query']['kernel']
  np.testing.assert_allclose(sq, q.reshape((groups, 4 // groups) + q.shape[1:]).mean(1), rtol=1e-6)
  first, _ = share.share_layers(params, cfg, groups, method='first')
  np.testing.assert_array_equal(first['encoder']['stack']['layers']['layer']['attention']['query']
                                ['kernel'], q[::4 // groups])
  with pytest.raises(ConfigError, match='must divide'):
    share.share_layers(params, cfg, 3)


def test_unshare_is_exact_and_shared_model_trains_and_checkpoints(tmp_path):
  cfg = get_variant('t5_1_1_tiny', shared_layer_groups=1)
  params = random_params(cfg)
  tok = lm_batch(cfg)['encoder_input_tokens']
  full, fcfg = share.unshare_layers(params, cfg)
  assert fcfg.shared_layer_groups == 0
  want = forward(cfg)(params, tok)
  np.testing.assert_allclose(forward(fcfg)(full, tok), want, atol=1e-6)
  regroup, rcfg = share.share_layers(params, cfg, 2)        # shared -> unshared -> 2 groups
  assert rcfg.shared_layer_groups == 2                      # (each group = the shared layer)
  for a, b in zip(jax.tree.leaves(share.unshare_layers(regroup, rcfg)[0]), jax.tree.leaves(full)):
    np.testing.assert_array_equal(a, b)
  # one optimizer step and an orbax round trip, like any model
  loss_fn = prune.model_loss_fn(cfg)
  batch = lm_batch(cfg)
  tok = batch['encoder_input_tokens']
  tx = optax.adam(1e-2)
  g = jax.jit(jax.grad(loss_fn))(params, batch)
  u, _ = tx.update(g, tx.init(params), params)
  new = optax.apply_updates(params, u)
  loss = jax.jit(loss_fn)
  assert loss(new, batch) < loss(params, batch)
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / 'shared', new)
  ckpt.wait_until_finished()
  restored = ckpt.restore(tmp_path / 'shared', abstract_params(cfg))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)


def test_output_embedding_tying():
  cfg = get_variant('t5_tiny')
  params = random_params(cfg)
  tok = jax.random.randint(jax.random.key(1), (2, 8), 2, cfg.vocab_size)
  untied, ucfg = share.untie_output_embedding(params, cfg)
  assert param_count(untied) - param_count(params) == cfg.vocab_size * cfg.d_model
  np.testing.assert_allclose(forward(ucfg)(untied, tok), forward(cfg)(params, tok), atol=1e-5)
  tied, tcfg = share.tie_output_embedding(untied, ucfg, method='input')
  assert tcfg.tie_embeddings and 'lm_head' not in tied['decoder']
  np.testing.assert_array_equal(tied['shared_embedding']['embedding'],
                                params['shared_embedding']['embedding'])
  avg, _ = share.tie_output_embedding(untied, ucfg, method='average')
  np.testing.assert_allclose(avg['shared_embedding']['embedding'],
                             params['shared_embedding']['embedding'], rtol=1e-5, atol=1e-6)
  with pytest.raises(ConfigError, match='already True'):
    share.tie_output_embedding(params, cfg)
