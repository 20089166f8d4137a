"""make_optimizer: every optimizer decreases a quadratic; weight-decay masks; errors; dtypes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5like.config import OPTIMIZER_NAMES, ConfigError, OptimConfig
from t5like.optim import decay_mask, make_optimizer, param_path


def fake_params():
  return {'encoder': {'layers': {'pre_attention_norm': {'scale': jnp.full((4,), 1.5)},
                                 'attention': {'query': {'kernel': jnp.full((4, 3), 0.5)}}},
                      'relpos_bias': {'rel_embedding': jnp.full((8, 4), -0.5)}}}


def quadratic(params):
  target = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
  return sum(jnp.sum((p - t) ** 2) for p, t in zip(jax.tree.leaves(params),
                                                     jax.tree.leaves(target)))


# Learning rates at which each optimizer makes visible progress in 30 steps.
LRS = {'sgd': 0.05, 'adam': 0.05, 'adamw': 0.05, 'lars': 20.0, 'lamb': 0.05, 'adafactor': 0.05,
       'agd': 0.05}


def run(config, steps=30, params=None):
  params = fake_params() if params is None else params
  tx = make_optimizer(config, params, total_steps=steps)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(quadratic)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return params, state, losses


@pytest.mark.parametrize('name', OPTIMIZER_NAMES)
def test_every_optimizer_decreases_a_quadratic(name):
  config = OptimConfig(name=name, learning_rate=LRS[name], schedule='constant', warmup_steps=0,
                       weight_decay=0.0 if name == 'adam' else 1e-4, clip_grad_norm=10.0)
  _, _, losses = run(config)
  assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])


def test_sgd_nesterov_and_no_momentum():
  for kw in (dict(momentum=0.9, nesterov=True, learning_rate=0.05),
             dict(momentum=0.0, learning_rate=0.2)):
    config = OptimConfig(name='sgd', schedule='constant', warmup_steps=0,
                         weight_decay=0.0, **kw)
    _, _, losses = run(config, steps=20)
    assert losses[-1] < 0.5 * losses[0], kw
  with pytest.raises(ConfigError, match='nesterov'):
    make_optimizer(OptimConfig(name='sgd', momentum=0.0, nesterov=True), fake_params(), 1000)


def test_default_decay_mask_on_fake_tree():
  mask = decay_mask(OptimConfig().weight_decay_exclude)(fake_params())
  assert mask == {'encoder': {'layers': {'pre_attention_norm': {'scale': False},
                                         'attention': {'query': {'kernel': True}}},
                              'relpos_bias': {'rel_embedding': False}}}
  # The rules are a config field.
  mask = decay_mask(('query',))(fake_params())
  assert mask['encoder']['layers']['attention']['query']['kernel'] is False
  assert mask['encoder']['layers']['pre_attention_norm']['scale'] is True
  assert mask['encoder']['relpos_bias']['rel_embedding'] is True


def test_param_path_names():
  paths = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      {'a': [jnp.zeros(1), {'b': jnp.zeros(1)}]})]
  assert paths == ['a/0', 'a/1/b']


def test_decay_mask_keeps_flax_boxes():
  boxed = {'mlp': {'wi': {'kernel': nn.LogicallyPartitioned(jnp.ones((2, 3)), ('embed', 'mlp'))}},
           'final_norm': {'scale': nn.LogicallyPartitioned(jnp.ones((2,)), ('embed',))}}
  mask = decay_mask(('norm', 'scale$'))(boxed)
  assert jax.tree.structure(mask) == jax.tree.structure(boxed)
  assert jax.tree.leaves(mask) == [False, True]   # leaves sorted: final_norm, mlp
  # The whole optimizer runs on boxed params (the state is then boxed the same way).
  tx = make_optimizer(OptimConfig(name='sgd', schedule='constant', warmup_steps=0), boxed, 10)
  state = tx.init(boxed)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, boxed), state, boxed)
  assert jax.tree.structure(updates) == jax.tree.structure(boxed)


@pytest.mark.parametrize('name', ['sgd', 'adamw', 'lars', 'lamb', 'adafactor', 'agd'])
def test_weight_decay_skips_masked_params(name):
  """With zero gradients only decay moves params: norms and the relative bias must not move."""
  params = fake_params()
  config = OptimConfig(name=name, learning_rate=0.1, schedule='constant', warmup_steps=0,
                       weight_decay=0.5, clip_grad_norm=0.0)
  tx = make_optimizer(config, params, 10)
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  enc = updates['encoder']
  np.testing.assert_array_equal(np.asarray(enc['layers']['pre_attention_norm']['scale']), 0.0)
  np.testing.assert_array_equal(np.asarray(enc['relpos_bias']['rel_embedding']), 0.0)
  kernel = np.asarray(enc['layers']['attention']['query']['kernel'])
  assert (kernel < 0).all(), (name, kernel)     # kernel = 0.5 decays towards 0
  if name == 'lamb':       # the trust ratio rescales the decay step to lr * ||p||
    np.testing.assert_allclose(np.linalg.norm(kernel), 0.1 * np.linalg.norm(np.full((4, 3), .5)),
                               rtol=1e-5)
  elif name != 'lars':     # decoupled: p -= lr * weight_decay * p (lars: through the trust ratio)
    np.testing.assert_allclose(kernel, -0.1 * 0.5 * 0.5, rtol=1e-5)


def test_adafactor_equals_optax_without_decay():
  params = {'w': jnp.linspace(-1, 1, 12).reshape(3, 4), 'big': jnp.ones((130, 129)) * 0.1}
  grads = jax.tree.map(lambda p: jnp.cos(p * 3.0), params)
  config = OptimConfig(name='adafactor', learning_rate=0.01, schedule='constant', warmup_steps=0,
                       weight_decay=0.0, clip_grad_norm=0.0)
  ours = make_optimizer(config, params, 10)
  ref = optax.adafactor(0.01, decay_rate=0.8, multiply_by_parameter_scale=True,
                        clipping_threshold=1.0, momentum=None, factored=True)
  s1, s2 = ours.init(params), ref.init(params)
  update1, update2 = jax.jit(ours.update), jax.jit(ref.update)
  for _ in range(2):
    u1, s1 = update1(grads, s1, params)
    u2, s2 = update2(grads, s2, params)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_clipping_bounds_the_first_sgd_step():
  params = {'w': jnp.zeros((4,))}
  config = OptimConfig(name='sgd', learning_rate=1.0, schedule='constant', warmup_steps=0,
                       weight_decay=0.0, momentum=0.0, clip_grad_norm=0.5)
  tx = make_optimizer(config, params, 10)
  updates, _ = tx.update({'w': jnp.full((4,), 100.0)}, tx.init(params), params)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(updates['w'])), 0.5, rtol=1e-5)


@pytest.mark.parametrize('name', ['sgd', 'adam', 'adamw', 'lars', 'lamb', 'agd'])
def test_mu_dtype_reaches_the_moments(name):
  params = {'w': jnp.ones((4,), jnp.bfloat16)}
  config = OptimConfig(name=name, mu_dtype='float32', weight_decay=0.0, warmup_steps=1)
  state = make_optimizer(config, params, 10).init(params)
  dtypes = {x.dtype for x in jax.tree.leaves(state) if x.shape == (4,)}
  assert jnp.dtype(jnp.float32) in dtypes, (name, dtypes)


def test_errors_list_valid_names():
  with pytest.raises(ConfigError, match=r"optim.name='adagrad' is not valid; choose one of "
                                        r"\['sgd', 'adam'"):
    OptimConfig(name='adagrad')
  with pytest.raises(ConfigError, match='optim.mu_dtype'):
    OptimConfig(mu_dtype='float16')
  with pytest.raises(ConfigError, match='optim.grad_lr_scaling'):
    OptimConfig(grad_lr_scaling='magic')
  with pytest.raises(ConfigError, match="optim.name='adam' has no weight decay"):
    make_optimizer(OptimConfig(name='adam', weight_decay=0.1), fake_params(), 1000)
  with pytest.raises(ConfigError, match='adafactor'):
    make_optimizer(OptimConfig(name='adafactor', mu_dtype='bfloat16'), fake_params(), 1000)
  with pytest.raises(ConfigError, match='invalid regex'):
    make_optimizer(OptimConfig(weight_decay_exclude=('(',)), fake_params(), 1000)
  with pytest.raises(ConfigError, match='weight_decay_exclude'):
    OptimConfig(weight_decay_exclude='norm')
  with pytest.raises(ConfigError, match='total_steps'):
    make_optimizer(OptimConfig(), fake_params(), 0)
  # A config mutated past its validation still fails at build time, listing the names.
  bad = OptimConfig()
  object.__setattr__(bad, 'name', 'adagrad')
  with pytest.raises(ConfigError, match='choose one of'):
    make_optimizer(bad, fake_params(), 1000)
