"""LARS: the per-layer trust ratio and momentum of make_optimizer('lars') against a hand computation.

LARS (You et al. 2017), as optax.lars: per parameter tensor p with gradient g,
  u = g + wd * p                 (wd only where the decay mask allows)
  r = tc * ||p|| / ||u||         (1 where either norm is 0)
  m_t = -lr * r * u + momentum * m_{t-1};   p += m_t
An optimizer without the trust ratio (r = 1) or with one global ratio fails these tests: the
fixture's tensors have norms and gradient norms that differ by orders of magnitude.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5like.config import OptimConfig
from t5like.optim import make_optimizer

LR, TC, WD, MOM = 2.0, 1e-3, 0.01, 0.9


def fixture():
  rng = np.random.default_rng(0)
  params = {'encoder': {'dense': {'kernel': 3.0 * rng.standard_normal((6, 4))},
                        'proj': {'kernel': 0.02 * rng.standard_normal((4, 5))},
                        'pre_norm': {'scale': 1.0 + 0.1 * rng.standard_normal(4)}},
            'zero': {'kernel': np.zeros((3,))}}
  grads = [{'encoder': {'dense': {'kernel': 1e-3 * rng.standard_normal((6, 4))},
                        'proj': {'kernel': 5.0 * rng.standard_normal((4, 5))},
                        'pre_norm': {'scale': 0.3 * rng.standard_normal(4)}},
            'zero': {'kernel': np.zeros((3,))}} for _ in range(2)]
  cast = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)
  return cast(params), [cast(g) for g in grads]


def hand_lars(params, grads):
  """Two LARS steps in numpy; returns (params after each step, trust ratios of step 1)."""
  decays = {'encoder/dense/kernel': True, 'encoder/proj/kernel': True,
            'encoder/pre_norm/scale': False, 'zero/kernel': True}
  flat = lambda t: {'/'.join(str(k.key) for k in path): np.asarray(x, np.float64)
                    for path, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  p, m, out, ratios = flat(params), None, [], {}
  for step, g in enumerate(grads):
    g = flat(g)
    new_m = {}
    for k in p:
      u = g[k] + (WD * p[k] if decays[k] else 0.0)
      pn, un = np.linalg.norm(p[k]), np.linalg.norm(u)
      r = 1.0 if pn == 0 or un == 0 else TC * pn / un
      if step == 0:
        ratios[k] = r
      new_m[k] = -LR * r * u + (MOM * m[k] if m is not None else 0.0)
    m = new_m
    p = {k: p[k] + m[k] for k in p}
    out.append(dict(p))
  return out, ratios


@pytest.fixture(scope='module')
def runs():
  params, grads = fixture()
  config = OptimConfig(name='lars', learning_rate=LR, schedule='constant', warmup_steps=0,
                       momentum=MOM, weight_decay=WD, clip_grad_norm=0.0,
                       lars_trust_coefficient=TC)
  tx = make_optimizer(config, params, total_steps=2)
  state = tx.init(params)
  got, p = [], params
  for g in grads:
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    got.append({'/'.join(str(k.key) for k in path): np.asarray(x)
                for path, x in jax.tree_util.tree_flatten_with_path(p)[0]})
  want, ratios = hand_lars(params, grads)
  return params, got, want, ratios


def test_trust_ratio_per_layer_matches_hand_computation(runs):
  params, got, want, ratios = runs
  # The fixture varies: the per-layer ratios span orders of magnitude (a global ratio or none
  # could not match all of them).
  r = [v for k, v in ratios.items() if k != 'zero/kernel']
  assert max(r) / min(r) > 100, ratios
  assert ratios['zero/kernel'] == 1.0
  for step in range(2):
    for k in want[step]:
      np.testing.assert_allclose(got[step][k], want[step][k], rtol=2e-5, atol=1e-7,
                                 err_msg=f'step {step + 1}, {k}')


def test_first_step_moves_each_layer_by_lr_times_trust_coefficient(runs):
  """The defining property: ||delta p|| / ||p|| = lr * tc for every (non-zero) layer, whatever
  its gradient's scale."""
  params, got, _, _ = runs
  for path, p0 in jax.tree_util.tree_flatten_with_path(params)[0]:
    k = '/'.join(str(x.key) for x in path)
    if k == 'zero/kernel':
      continue
    rel = np.linalg.norm(got[0][k] - p0) / np.linalg.norm(p0)
    np.testing.assert_allclose(rel, LR * TC, rtol=1e-4, err_msg=k)
