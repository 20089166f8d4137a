"""Pruning scores and masks: exact sparsity, N:M groups, errors, gradient scores."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from t5like.compress import prune
from t5like.config import ConfigError, get_variant
from prune_testutil import lm_batch, random_params


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


@pytest.fixture(scope='module')
def params():
  return random_params(get_variant('t5_1_1_tiny'))


def test_prunable_selection_defaults_and_regex(params):
  names = prune.prunable(params)
  assert 'encoder/stack/layers/layer/attention/query/kernel' in names
  assert 'decoder/stack/layers/layer/mlp/wi_0/kernel' in names
  assert not any('norm' in n or 'rel_embedding' in n or 'embedding' in n or 'lm_head' in n
                 for n in names)
  cfg = prune.PruneConfig(include=(r'kernel$', r'embedding$', r'rel_embedding'),
                          exclude=(r'cross_attention',))
  names = prune.prunable(params, cfg)
  assert 'decoder/lm_head/kernel' in names and 'shared_embedding/embedding' in names
  assert not any('cross_attention' in n or 'rel_embedding' in n for n in names)
  with pytest.raises(ConfigError, match='select no parameter'):
    prune.prunable(params, prune.PruneConfig(include=('nothing_matches',)))


@pytest.mark.parametrize('fraction', [0.3, 0.5, 0.9])
def test_layerwise_magnitude_exact_per_parameter_and_layer(params, fraction):
  cfg = prune.PruneConfig(sparsity=fraction)
  masks = prune.compute_masks(params, cfg)
  flat, mflat = _flat(params), _flat(masks)
  for k in prune.prunable(params, cfg):
    m = np.asarray(mflat[k]).reshape(flat[k].shape[0], -1)
    w = np.abs(np.asarray(flat[k])).reshape(m.shape)
    for row_m, row_w in zip(m, w):
      assert (~row_m).sum() == round(fraction * row_m.size), k
      assert row_w[~row_m].max() <= row_w[row_m].min()      # the smallest weights went
  for k in set(flat) - set(prune.prunable(params, cfg)):
    assert np.asarray(mflat[k]).all(), k


def test_global_magnitude_exact_and_one_threshold(params):
  cfg = prune.PruneConfig(sparsity=0.7, scope='global', norm='l2')
  masks = prune.compute_masks(params, cfg)
  names = prune.prunable(params, cfg)
  flat, mflat = _flat(params), _flat(masks)
  w = np.concatenate([np.abs(np.asarray(flat[k])).ravel() for k in names])
  m = np.concatenate([np.asarray(mflat[k]).ravel() for k in names])
  assert (~m).sum() == round(0.7 * m.size)
  assert w[~m].max() <= w[m].min()
  per = prune.sparsity(masks, names)
  assert len({round(per[k], 2) for k in names}) > 1           # global: layers differ


def test_apply_masks_jits_and_zeroes(params):
  masks = prune.compute_masks(params, prune.PruneConfig(sparsity=0.5))
  pruned = jax.jit(prune.apply_masks)(params, masks)
  for p, m, q in zip(*(jax.tree.leaves(t) for t in (params, masks, pruned))):
    np.testing.assert_array_equal(np.asarray(q), np.where(np.asarray(m), np.asarray(p), 0))


@pytest.mark.parametrize('nm', ['2:4', '1:4', '4:8'])
def test_nm_pattern_in_every_group(params, nm):
  n, m = prune.parse_nm(nm)
  cfg = prune.PruneConfig(nm=nm, include=(r'/stack/layers/layer/.*/kernel$', r'lm_head'))
  masks = prune.compute_masks(params, cfg)
  flat, mflat = _flat(params), _flat(masks)
  for k in prune.prunable(params, cfg):
    axes = prune.nm_input_axes(k, flat[k].ndim)
    rest = [a for a in range(flat[k].ndim) if a not in axes]
    g = np.transpose(np.asarray(mflat[k]), rest + list(axes))
    g = g.reshape(-1, m)
    assert (g.sum(-1) == n).all(), k
    w = np.abs(np.transpose(np.asarray(flat[k]), rest + list(axes))).reshape(-1, m)
    assert (np.where(g, w, np.inf).min(-1) >= np.where(g, -np.inf, w).max(-1)).all(), k
  assert prune.sparsity(masks, prune.prunable(params, cfg))['total'] == pytest.approx(1 - n / m)


def test_nm_indivisible_names_the_parameter(params):
  with pytest.raises(ValueError, match=r"parameter '[a-z_/]+/kernel' .* not divisible by M=3"):
    prune.compute_masks(params, prune.PruneConfig(nm='1:3'))
  with pytest.raises(ConfigError, match='needs 0 < N < M'):
    prune.PruneConfig(nm='4:2')


def test_structured_layerwise_removes_whole_units_uniformly(params):
  cfg = prune.PruneConfig(method='structured', norm='l2', sparsity=0.5)
  masks = prune.compute_masks(params, cfg)
  units = prune.unit_masks_of(params, masks)
  scores = prune.unit_scores(params, cfg)
  for mod, present in units.items():
    present = np.asarray(present)
    assert (present.sum(1) == present.shape[1] // 2).all(), mod
    if mod.endswith(('encoder/stack/layers/layer/attention', '/self_attention')):
      assert (present == present[:1]).all(), mod            # tied to the shared relpos table
      s = np.asarray(scores[mod]).sum(0)
      assert s[~present[0]].max() <= s[present[0]].min()
    else:
      s = np.asarray(scores[mod])
      for l in range(s.shape[0]):
        assert s[l][~present[l]].max() <= s[l][present[l]].min()
  # a removed unit is zero in every kernel it spans; no partial units
  assert prune.sparsity(masks, prune.prunable(params, cfg))['total'] == pytest.approx(0.5)


def test_structured_global_counts(params):
  cfg = prune.PruneConfig(method='structured', sparsity=0.5, scope='global', tie_relpos_heads=False)
  masks = prune.compute_masks(params, cfg)
  units = {k: np.asarray(v) for k, v in prune.unit_masks_of(params, masks).items()}
  heads = sum((~v).sum() for k, v in units.items() if k.endswith('attention'))
  neurons = sum((~v).sum() for k, v in units.items() if k.endswith('mlp'))
  assert heads == round(0.5 * 3 * 2 * 4) and neurons == round(0.5 * 2 * 2 * 128)


def test_gradient_scores_taylor_snip(params):
  mcfg = get_variant('t5_1_1_tiny')
  loss_fn = prune.model_loss_fn(mcfg)
  batches = [lm_batch(mcfg, 1), lm_batch(mcfg, 2)]
  cfg = prune.PruneConfig(method='taylor', sparsity=0.5)
  grad = jax.jit(jax.grad(loss_fn))
  scores = prune.gradient_scores(params, loss_fn, batches, cfg, grad)
  k = 'encoder/stack/layers/layer/mlp/wo/kernel'
  w = _flat(params)[k]
  g1, g2 = (_flat(grad(params, b))[k] for b in batches)
  np.testing.assert_allclose(scores[k], jnp.abs(w * g1) + jnp.abs(w * g2), rtol=1e-4, atol=1e-7)
  snip = prune.gradient_scores(params, loss_fn, batches, prune.PruneConfig(method='snip'), grad)
  np.testing.assert_allclose(snip[k], jnp.abs(w * (g1 + g2) / 2), rtol=1e-4, atol=1e-7)
  masks = prune.unstructured_masks(params, scores, 0.5, cfg)
  assert prune.sparsity(masks, prune.prunable(params, cfg))['total'] == pytest.approx(0.5, abs=1e-4)
  scfg = prune.PruneConfig(method='taylor', structured_gradients=True, sparsity=0.25)
  us = prune.gradient_scores(params, loss_fn, batches[:1], scfg, grad)
  assert us['decoder/stack/layers/layer/cross_attention'].shape == (2, 4)
  assert (np.asarray(us['encoder/stack/layers/layer/mlp']) >= 0).all()
  um = prune.structured_unit_masks(params, us, 0.25, scfg)
  masks = prune.expand_unit_masks(params, um)
  assert prune.sparsity(masks, prune.prunable(params, scfg))['total'] == pytest.approx(0.25)
  with pytest.raises(ValueError, match='needs loss_fn'):
    prune.compute_masks(params, cfg)
