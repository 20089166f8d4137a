"""Greedy unit removal takes out the least important unit first (constructed case)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.compress import greedy, prune
from t5like.config import ConfigError, get_variant
from prune_testutil import random_params
from t5like.models import build_model


def test_greedy_removes_known_least_important_units_first():
  cfg = get_variant('t5_tiny', num_encoder_layers=1, num_decoder_layers=1)
  params = random_params(cfg)
  enc = 'encoder/stack/layers/layer'
  # Head 2 of the encoder's attention barely contributes (out scaled by 1e-4); neurons 0..31 of
  # the encoder FFN a little more (their wi columns and wo rows scaled by 0.1: relu is
  # homogeneous, so their output is scaled by 1e-2, and they are the weakest by L2 norm, so they
  # form the first neuron group). Loss: squared distance to the
  # original model's logits, so every removal costs >= 0 and these two cost least, in that order.
  out = params['encoder']['stack']['layers']['layer']['attention']['out']['kernel']
  params['encoder']['stack']['layers']['layer']['attention']['out']['kernel'] = \
      out.at[:, 2].multiply(1e-4)
  mlp = params['encoder']['stack']['layers']['layer']['mlp']
  mlp['wo']['kernel'] = mlp['wo']['kernel'].at[:, :32].multiply(0.1)
  mlp['wi']['kernel'] = mlp['wi']['kernel'].at[:, :, :32].multiply(0.1)
  model = build_model(cfg)
  tok = jax.random.randint(jax.random.key(1), (2, 8), 2, cfg.vocab_size)
  ref = model.apply({'params': params}, tok, tok)
  loss_fn = lambda p, b: jnp.mean(jnp.square(model.apply({'params': p}, b, b) - ref))
  pcfg = prune.PruneConfig(method='greedy', include=(f'{enc}/.*/kernel$',),
                           greedy_neuron_group=32, tie_relpos_heads=False)
  units = greedy.candidate_units(params, pcfg)
  assert len(units) == 4 + 128 // 32
  unit_params = 4 * 64 * 16 * 4 + 2 * 64 * 128
  masks, history = greedy.greedy_unit_masks(params, loss_fn, [tok], [0.1, 0.25], pcfg, units)
  assert history[0]['unit'] == f'{enc}/attention[layer 0] head 2'
  assert history[1]['unit'] == f'{enc}/mlp[layer 0] neurons 32 from 0'
  assert history[0]['loss'] <= history[1]['loss']
  # the 0.1 target (1638 weights) is met by the first removal (one head, 4096 weights)
  assert np.asarray(masks[0][f'{enc}/attention']).tolist() == [[True, True, False, True]]
  assert np.asarray(masks[0][f'{enc}/mlp']).all()
  assert not np.asarray(masks[1][f'{enc}/mlp'])[0, :32].any()
  assert history[1]['fraction'] == (4096 + 32 * 128) / unit_params
  # The parameter masks of one run to 0.1: the same unit masks, expanded; compute_masks points
  # 'greedy' at it.
  pmasks = greedy.greedy_masks(params, loss_fn, [tok], pcfg, fraction=0.1)
  want = prune.expand_unit_masks(params, masks[0])
  for a, b in zip(jax.tree.leaves(pmasks), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ConfigError, match='greedy_masks'):
    prune.compute_masks(params, pcfg, loss_fn=loss_fn, batches=[tok])
