"""One real training step on a tiny config; grad accumulation equals the big-batch step; losses."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from t5like.config import MeshConfig, OptimConfig, get_variant
from t5like.models import build_model
from t5like.optim import make_optimizer, make_schedule
from t5like.parallel.mesh import get_rules, make_mesh
from t5like.train import state as state_lib
from t5like.train import step as step_lib


def _batch(B=8, S=12, T=6, V=512, seed=0):
  rng = np.random.default_rng(seed)
  w = np.ones((B, T), np.float32)
  w[:, -2:] = 0.0
  return dict(encoder_input_tokens=rng.integers(2, V, (B, S)).astype(np.int32),
              decoder_input_tokens=rng.integers(2, V, (B, T)).astype(np.int32),
              decoder_target_tokens=rng.integers(2, V, (B, T)).astype(np.int32),
              decoder_loss_weights=w)


def _setup(accum=1, seed=0, opt='adamw'):
  cfg = get_variant('t5_tiny')
  mesh = make_mesh(MeshConfig(), jax.devices()[:1])
  rules = get_rules('dp')
  ocfg = OptimConfig(name=opt, warmup_steps=1, learning_rate=1e-2,
                     weight_decay=0.01 if opt == 'adamw' else 0.0)
  tx = make_optimizer(ocfg, None, 10)
  state, sh = state_lib.create_train_state(cfg, tx, mesh, rules, seed)
  batch = _batch()
  fn = step_lib.jit_train_step(model=build_model(cfg), tx=tx, state_shardings=sh,
                               batch_shardings=step_lib.batch_shardings(mesh, batch), mesh=mesh,
                               schedule=make_schedule(ocfg, 10), grad_accum_steps=accum)
  return cfg, mesh, rules, state, fn, batch


def test_real_train_step_lowers_loss():
  cfg, mesh, rules, state, fn, batch = _setup()
  with step_lib.mesh_context(mesh, rules):
    losses = []
    for _ in range(4):
      state, m = fn(state, batch)
      losses.append(float(m['loss']))
  assert int(state.step) == 4
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert float(m['tokens']) == 8 * 4  # loss weights sum
  assert 0 <= float(m['accuracy']) <= 1 and float(m['grad_norm']) > 0
  assert float(m['learning_rate']) > 0


def test_grad_accumulation_equals_big_batch():
  # SGD: the update is linear in the gradient, so parameters compare at f32 rounding.
  _, mesh, rules, s1, f1, batch = _setup(accum=1, opt='sgd')
  _, _, _, s4, f4, _ = _setup(accum=4, opt='sgd')
  with step_lib.mesh_context(mesh, rules):
    for _ in range(2):
      s1, m1 = f1(s1, batch)
      s4, m4 = f4(s4, batch)
  np.testing.assert_allclose(float(m1['loss']), float(m4['loss']), rtol=1e-5)
  np.testing.assert_allclose(float(m1['grad_norm']), float(m4['grad_norm']), rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_cross_entropy_matches_optax_and_smoothing():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((2, 5, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
  w = jnp.ones((2, 5))
  ce, zl, _ = step_lib.cross_entropy_sums(logits, targets, w)
  ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum()
  np.testing.assert_allclose(float(ce), float(ref), rtol=1e-5)
  assert float(zl) == 0.0
  ls = 0.1
  soft = jax.nn.one_hot(targets, 11) * (1 - ls) + (1 - jax.nn.one_hot(targets, 11)) * ls / 10
  const = -((1 - ls) * np.log(1 - ls) + ls * np.log(ls / 10))
  ref_ls = optax.softmax_cross_entropy(logits, soft).sum() - 10 * const
  ce_ls, _, _ = step_lib.cross_entropy_sums(logits, targets, w, label_smoothing=ls)
  np.testing.assert_allclose(float(ce_ls), float(ref_ls), rtol=1e-5)
  _, zl, _ = step_lib.cross_entropy_sums(logits, targets, w, z_loss=1e-2)
  np.testing.assert_allclose(float(zl), float(1e-2 * (jax.nn.logsumexp(logits, -1) ** 2).sum()),
                             rtol=1e-5)


def test_eval_step_sums():
  cfg, mesh, rules, state, _, batch = _setup()
  with step_lib.mesh_context(mesh, rules):
    out = step_lib.eval_step(state.params, batch, model=build_model(cfg))
  assert float(out['weight_sum']) == 32.0
  assert np.isfinite(float(out['loss_sum'])) and float(out['loss_sum']) > 0
