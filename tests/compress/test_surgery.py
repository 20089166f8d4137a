"""Surgery: structured masks -> a smaller model with the masked model's outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.compress import prune, surgery
from t5like.config import get_variant
from prune_testutil import forward, random_params
from t5like.models import build_model, init_cache, param_count


def _outputs(cfg, params, tok):
  return forward(cfg)(params, tok)


@pytest.mark.parametrize('variant,scope', [('t5_1_1_tiny', 'layer'), ('t5_tiny', 'global'),
                                           ('decoder_tiny', 'layer')])
def test_surgery_equals_masked_model(variant, scope):
  cfg = get_variant(variant)
  params = random_params(cfg)
  pcfg = prune.PruneConfig(method='structured', sparsity=0.5, scope=scope)
  masks = prune.compute_masks(params, pcfg)
  if scope == 'global':       # unstructured zeros inside kept units must survive surgery too
    masks = prune.unstructured_masks(params, prune.magnitude_scores(params), 0.7,
                                     prev_masks=masks)
  small, small_cfg, report = surgery.shrink(params, masks, cfg)
  tok = jax.random.randint(jax.random.key(1), (2, 8), 2, cfg.vocab_size)
  want = _outputs(cfg, prune.apply_masks(params, masks), tok)
  assert not np.allclose(want, _outputs(cfg, params, tok), atol=1e-3)   # the masks do something
  np.testing.assert_allclose(_outputs(small_cfg, small, tok), want, atol=2e-5, rtol=1e-5)
  assert small_cfg.num_heads < cfg.num_heads and small_cfg.d_ff < cfg.d_ff
  assert report['params'][1] == param_count(small) < param_count(params)
  if scope == 'layer':
    assert (small_cfg.num_heads, small_cfg.d_ff) == (cfg.num_heads // 2, cfg.d_ff // 2)
    assert report['padded_heads'] == report['padded_neurons'] == 0


def test_surgery_ties_relpos_heads_and_decodes_the_same():
  cfg = get_variant('t5_tiny')
  params = random_params(cfg)
  enc, dec = 'encoder/stack/layers/layer', 'decoder/stack/layers/layer'
  # Per-layer head choices that differ across layers: the encoder's self-attention then keeps the
  # union (heads 0, 1, 3) so that the shared bias table can be sliced once; cross-attention keeps
  # its own heads per layer.
  units = {f'{enc}/attention': jnp.array([[1, 1, 0, 0], [1, 0, 0, 1]], bool),
           f'{dec}/self_attention': jnp.array([[1, 1, 0, 1], [1, 1, 0, 1]], bool),
           f'{dec}/cross_attention': jnp.array([[0, 0, 1, 1], [1, 0, 1, 0]], bool)}
  masks = prune.expand_unit_masks(params, units)
  small, small_cfg, report = surgery.shrink(params, masks, cfg)
  assert small_cfg.num_heads == 3 and small_cfg.d_ff == cfg.d_ff
  np.testing.assert_array_equal(small['encoder']['relpos_bias']['rel_embedding'],
                                params['encoder']['relpos_bias']['rel_embedding'][np.array([0, 1, 3])])
  np.testing.assert_array_equal(small['decoder']['relpos_bias']['rel_embedding'],
                                params['decoder']['relpos_bias']['rel_embedding'][np.array([0, 1, 3])])
  assert report['padded_heads'] == 2 + 0 + 2     # pruned heads kept (zero) for uniformity
  tok = jax.random.randint(jax.random.key(1), (2, 6), 2, cfg.vocab_size)
  masked = prune.apply_masks(params, masks)
  np.testing.assert_allclose(_outputs(small_cfg, small, tok), _outputs(cfg, masked, tok),
                             atol=2e-5, rtol=1e-5)

  def decode(c, p):
    model = build_model(c)

    @jax.jit
    def run(p):
      cache = model.apply({'params': p}, tok, init_cache(c, 2, 6, 6), method=model.prefill)
      logits, _ = model.apply({'params': p}, tok[:, :3], cache, method=model.decode_step)
      return logits

    return run(p)

  np.testing.assert_allclose(decode(small_cfg, small), decode(cfg, masked), atol=2e-5, rtol=1e-5)


def test_surgery_with_shared_layers():
  cfg = get_variant('t5_tiny', shared_layer_groups=1)
  params = random_params(cfg)
  masks = prune.compute_masks(params, prune.PruneConfig(method='structured', sparsity=0.25))
  small, small_cfg, _ = surgery.shrink(params, masks, cfg)
  assert small_cfg.shared_layer_groups == 1 and small_cfg.num_heads == 3 and small_cfg.d_ff == 96
  tok = jax.random.randint(jax.random.key(1), (2, 8), 2, cfg.vocab_size)
  np.testing.assert_allclose(_outputs(small_cfg, small, tok),
                             _outputs(cfg, prune.apply_masks(params, masks), tok), atol=2e-5)
