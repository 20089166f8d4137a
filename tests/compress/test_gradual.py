"""Gradual pruning: the polynomial schedule and masked weights that stay exactly zero in training."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from t5like.compress import gradual, prune
from t5like.config import ConfigError, OptimConfig, get_variant
from prune_testutil import lm_batch, random_params


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')
from t5like.optim.optimizers import make_optimizer


def test_polynomial_schedule_matches_zhu_gupta():
  cfg = prune.PruneConfig(sparsity=0.8, initial_sparsity=0.1, begin_step=10, end_step=50,
                          update_every=10)
  want = lambda t: 0.8 + (0.1 - 0.8) * (1 - (t - 10) / 40) ** 3
  got = [float(gradual.polynomial_sparsity(t, cfg)) for t in (0, 10, 15, 20, 30, 50, 90)]
  np.testing.assert_allclose(got, [0.0, want(10), want(10), want(20), want(30), 0.8, 0.8],
                             rtol=1e-6)
  assert [bool(gradual.is_update_step(t, cfg)) for t in (5, 10, 15, 40, 50, 60)] == \
      [False, True, False, True, True, False]


@pytest.mark.parametrize('method,optim', [('magnitude', 'adamw'), ('structured', 'sgd')])
def test_masked_weights_stay_zero_through_training(method, optim):
  mcfg = get_variant('t5_tiny', num_encoder_layers=1, num_decoder_layers=1, vocab_size=128)
  params = random_params(mcfg)
  loss_fn = prune.model_loss_fn(mcfg)
  batch = lm_batch(mcfg, B=4)
  pcfg = prune.PruneConfig(method=method, sparsity=0.5, begin_step=1, end_step=5, update_every=2)
  ocfg = OptimConfig(name=optim, weight_decay=0.1, momentum=0.9, warmup_steps=0,
                     learning_rate=1e-2)
  tx = gradual.prune_during_training(make_optimizer(ocfg, params, 10), pcfg)
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  names = prune.prunable(params, pcfg)
  seen, losses = [], []
  for t in range(6):
    params, state, loss = step(params, state)
    losses.append(float(loss))
    masks = gradual.masks_of(state)
    seen.append(prune.sparsity(masks, names)['total'])
    pf, mf = _flat(params), _flat(masks)
    for k in names:
      assert np.all(np.asarray(pf[k])[~np.asarray(mf[k])] == 0.0), (t, k)
  assert seen[0] == 0.0 and seen == sorted(seen)
  assert seen[-1] == pytest.approx(0.5)
  assert losses[-1] < losses[0]
  # masks only grow: the final masks contain every earlier pruning
  if method == 'structured':
    units = prune.unit_masks_of(params, gradual.masks_of(state))
    assert all(int(np.asarray(v).sum(1).max()) == np.asarray(v).shape[1] // 2
               for v in units.values())


def test_needs_params_and_a_supported_method():
  tx = gradual.prune_during_training(optax.sgd(0.1), prune.PruneConfig())
  params = {'a': {'stack': {'layers': {'layer': {'w': {'kernel': jnp.ones((2, 4))}}}}}}
  state = tx.init(params)
  with pytest.raises(ValueError, match='needs params'):
    tx.update(params, state)
  with pytest.raises(ConfigError, match="'magnitude' or 'structured'"):
    gradual.prune_during_training(optax.sgd(0.1), prune.PruneConfig(method='taylor'))


def test_keep_masks_holds_zeros_with_momentum_and_weight_decay():
  params = {'encoder': {'stack': {'layers': {'layer': {'mlp': {'wo': {'kernel': jnp.arange(
      1.0, 17.0).reshape(2, 8)}}}}}}}
  masks = prune.compute_masks(params, prune.PruneConfig(sparsity=0.5))
  tx = gradual.keep_masks(optax.adamw(0.1, weight_decay=0.5), masks)
  state = tx.init(params)
  p = prune.apply_masks(params, masks)
  for _ in range(3):
    g = jax.tree.map(jnp.ones_like, p)            # a gradient that would move every weight
    u, state = tx.update(g, state, p)
    p = optax.apply_updates(p, u)
  w = np.asarray(p['encoder']['stack']['layers']['layer']['mlp']['wo']['kernel'])
  m = np.asarray(gradual.masks_of(state)['encoder']['stack']['layers']['layer']['mlp']['wo']
                 ['kernel'])
  assert (w[~m] == 0.0).all() and (w[m] != np.arange(1.0, 17.0).reshape(2, 8)[m]).all()
  assert (~m).sum() == 8
