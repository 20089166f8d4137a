"""AGD against an independent NumPy transcription of the paper's update rule (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5like.optim import agd as agd_lib

STEPS = 50


def numpy_agd(params, grads_seq, lr, b1=0.9, b2=0.999, delta=1e-5, weight_decay=0.0,
              amsgrad=False, clip=None):
  """The paper's Algorithm 1 in bias-corrected form, one leaf (dict of arrays) at a time.

  Returns the final params and, per step and leaf, a bool array: where the delta floor was active
  (the SGD-like branch).
  """
  p = {k: np.array(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  b = {k: np.zeros_like(v) for k, v in p.items()}
  b_max = {k: np.zeros_like(v) for k, v in p.items()}
  m_hat_prev = {k: np.zeros_like(v) for k, v in p.items()}
  floors = []
  for t, grads in enumerate(grads_seq, start=1):
    floor_t = {}
    for k in p:
      g = np.asarray(grads[k], np.float64)
      m[k] = b1 * m[k] + (1 - b1) * g
      m_hat = m[k] / (1 - b1 ** t)
      s = m_hat if t == 1 else m_hat - m_hat_prev[k]
      m_hat_prev[k] = m_hat
      b[k] = b2 * b[k] + (1 - b2) * s * s
      second = b[k]
      if amsgrad:
        b_max[k] = np.maximum(b_max[k], b[k])
        second = b_max[k]
      b_hat = second / (1 - b2 ** t)
      floor_t[k] = np.sqrt(b_hat) < delta
      u = m_hat / np.maximum(np.sqrt(b_hat), delta)
      if clip is not None:
        # The reference clips m_t / max(sqrt(b_t), delta sqrt(1 - b2^t)), i.e. u before the
        # factor sqrt(1 - b2^t) / (1 - b1^t).
        factor = np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        u = np.clip(u / factor, -clip, clip) * factor
      p[k] = p[k] - lr * (u + weight_decay * p[k])
    floors.append(floor_t)
  return p, floors


def make_grads(rng, mode):
  """Gradient sequences for three leaves.

  'adaptive': ordinary random gradients. 'tiny_then_large' starts with gradients of 1e-8 (below the
  delta floor: SGD-like) and turns to O(1) gradients at step 25 (adaptive). 'large_then_const'
  (used with b2 = 0.5) has random O(1) gradients, then a constant tiny gradient from step 10, whose
  stepwise differences vanish, so the preconditioner decays below delta: adaptive -> SGD-like.
  """
  shapes = {'adaptive': (3, 4), 'tiny_then_large': (5,), 'large_then_const': (2, 3)}
  seq = []
  const = rng.normal(size=shapes['large_then_const']) * 1e-4
  for t in range(STEPS):
    g = {'adaptive': rng.normal(size=shapes['adaptive'])}
    g['tiny_then_large'] = rng.normal(size=shapes['tiny_then_large']) * (1e-8 if t < 25 else 1.0)
    g['large_then_const'] = rng.normal(size=shapes['large_then_const']) if t < 10 else const
    seq.append(g)
  return seq


def run_jax(tx, params, grads_seq):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads_seq:
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), g)
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


@pytest.mark.parametrize('kwargs', [
    dict(),
    dict(amsgrad=True),
    dict(weight_decay=0.1),
    dict(clip=0.5, amsgrad=True),
    dict(b1=0.5, b2=0.5),
    dict(b1=0.5, b2=0.5, amsgrad=True),
], ids=['default', 'amsgrad', 'weight_decay', 'clip_amsgrad', 'fast_betas', 'fast_betas_amsgrad'])
def test_agd_matches_numpy_paper_rule(kwargs):
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = {k: rng.normal(size=s) for k, s in
              (('adaptive', (3, 4)), ('tiny_then_large', (5,)), ('large_then_const', (2, 3)))}
    grads_seq = make_grads(rng, None)
    lr = 1e-2
    expected, floors = numpy_agd(params, grads_seq, lr, **kwargs)
    tx = agd_lib.agd(lr, **kwargs)
    got = run_jax(tx, jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params), grads_seq)
    for k in expected:
      assert got[k].dtype == jnp.float64
      np.testing.assert_allclose(np.asarray(got[k]), expected[k], rtol=1e-6, atol=1e-6,
                                 err_msg=f'leaf {k}')
  # The delta floor (SGD-like branch) was hit, and AGD switched between the branches.
  tiny = np.array([f['tiny_then_large'].all() for f in floors])
  assert tiny[:25].all() and not tiny[25:].any(), tiny
  assert not any(f['adaptive'].any() for f in floors)
  if kwargs.get('b2') == 0.5 and not kwargs.get('amsgrad'):
    # Adaptive while the gradient moves, SGD-like once its stepwise differences have vanished.
    const = np.array([f['large_then_const'].all() for f in floors])
    assert not const[:10].any() and const[-5:].all(), const


def test_agd_step_size_in_sgd_branch():
  """Below the floor the step is lr / delta times the bias-corrected momentum (SGD + momentum)."""
  with jax.enable_x64(True):
    g = {'w': jnp.full((3,), 1e-9, jnp.float64)}
    params = {'w': jnp.zeros((3,), jnp.float64)}
    tx = agd_lib.agd(0.1, delta=1e-5)
    state = tx.init(params)
    updates, _ = tx.update(g, state, params)
    np.testing.assert_allclose(np.asarray(updates['w']), -0.1 * 1e-9 / 1e-5, rtol=1e-12)


def test_agd_defaults_and_mask():
  tx = agd_lib.agd(1e-3)
  params = {'a': jnp.ones(2), 'b': jnp.ones(2)}
  state = tx.init(params)
  scale_state = state[0]
  assert scale_state.nu_max is None       # amsgrad off by default
  # Weight decay respects a mask: 'b' excluded, zero gradients -> only 'a' decays.
  tx = agd_lib.agd(0.1, weight_decay=0.5, weight_decay_mask={'a': True, 'b': False})
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(np.asarray(updates['a']), -0.05, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(updates['b']), 0.0)


def test_agd_mu_dtype():
  tx = agd_lib.agd(1e-3, mu_dtype=jnp.bfloat16)
  params = {'w': jnp.ones((4,), jnp.float32)}
  state = tx.init(params)
  assert state[0].mu['w'].dtype == jnp.bfloat16
  _, state = tx.update(params, state, params)
  assert state[0].mu['w'].dtype == jnp.bfloat16


@pytest.mark.parametrize('kwargs', [dict(b1=1.0), dict(b2=-0.1), dict(delta=-1.0), dict(clip=0.0),
                                    dict(weight_decay=-1.0)])
def test_agd_rejects_bad_hyperparameters(kwargs):
  with pytest.raises(ValueError, match='agd: '):
    agd_lib.agd(1e-3, **kwargs)
