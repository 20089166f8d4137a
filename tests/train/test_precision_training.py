"""Mixed-precision policies end to end, through the trainer's own sharded `train_step`.

- 'bf16' (f32 master weights and optimizer state, bf16 compute): after 200 steps on t5_tiny
  (a noisy copy task, a fresh batch each step) the loss is within 3% of 'f32''s (mean of the
  last 10 steps, and of the second half of the curve);
- 'pure_bf16': bf16 parameters, the first moment in `OptimConfig.mu_dtype`;
- 'fp16': an injected inf gradient skips the update (parameters and optimizer state unchanged)
  and halves the loss scale; finite steps grow it after `period` steps; the scale is saved in and
  restored from the checkpoint with the rest of the train state.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like import precision
from t5like.config import MeshConfig, OptimConfig, get_variant
from t5like.optim import make_optimizer, make_schedule
from t5like.parallel.mesh import get_rules, make_mesh
from t5like.train import checkpoint as ckpt_lib
from t5like.train import state as state_lib
from t5like.train import step as step_lib
from t5like.models import build_model

B, S, T = 8, 16, 16
STEPS = 200
TASK_VOCAB = 48          # tokens drawn from ids [2, TASK_VOCAB): learnable within 200 steps


def make_batches(num=8, seed=0, noise=0.0):
  """Copy-task batches: the decoder reproduces the encoder input, except that a `noise` fraction
  of the targets are random tokens (an irreducible loss, so the curve levels off above 0)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    enc = rng.integers(2, TASK_VOCAB, (B, S)).astype(np.int32)
    tgt = enc[:, :T].copy()
    flip = rng.random((B, T)) < noise
    tgt[flip] = rng.integers(2, TASK_VOCAB, int(flip.sum()))
    dec = np.concatenate([np.zeros((B, 1), np.int32), tgt[:, :-1]], axis=1)
    out.append({'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
                'decoder_target_tokens': tgt})
  return out


class Setup:
  """Model, optimizer, one-device mesh, sharded state and the jitted train step of a policy."""

  def __init__(self, policy, optim=None, model_wrapper=None, num_steps=STEPS):
    self.cfg = get_variant('t5_tiny', precision=policy)
    self.optim = optim or OptimConfig(name='adamw', learning_rate=3e-3, schedule='cosine',
                                      warmup_steps=10)
    self.mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    self.rules = get_rules('dp')
    self.tx = make_optimizer(self.optim, None, num_steps)
    self.schedule = make_schedule(self.optim, num_steps)
    with step_lib.mesh_context(self.mesh, self.rules):
      self.state, self.shardings = state_lib.create_train_state(self.cfg, self.tx, self.mesh,
                                                                self.rules, seed=0)
    self.batch_sh = step_lib.batch_shardings(self.mesh, make_batches(1)[0])
    self.model = build_model(self.cfg)

  def step_fn(self, model=None):
    return step_lib.jit_train_step(model=model or self.model, tx=self.tx,
                                   state_shardings=self.shardings, batch_shardings=self.batch_sh,
                                   mesh=self.mesh, schedule=self.schedule)

  def run(self, fn, state, batch):
    with step_lib.mesh_context(self.mesh, self.rules):
      return fn(state, batch)


def loss_curve(policy):
  s = Setup(policy)
  fn = s.step_fn()
  batches = make_batches(STEPS, noise=0.5)        # a fresh batch every step
  state, losses = s.state, []
  for i in range(STEPS):
    state, m = s.run(fn, state, batches[i])
    losses.append(m['loss'])
  return np.asarray(jax.device_get(losses), np.float64), state


@pytest.mark.slow
def test_bf16_loss_curve_within_3_percent_of_f32():
  f32, f32_state = loss_curve('f32')
  bf16, bf16_state = loss_curve('bf16')
  # 'bf16' keeps f32 master weights and f32 optimizer state.
  for leaf in jax.tree.leaves(bf16_state.params) + jax.tree.leaves(bf16_state.opt_state):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert np.all(np.isfinite(f32)) and np.all(np.isfinite(bf16))
  # The task is learnt, so the comparison is not between two flat curves.
  assert f32[-10:].mean() < 0.8 * f32[:5].mean(), (f32[:5], f32[-10:])
  curves = {p: np.round(c.reshape(-1, 10).mean(1), 3).tolist() for p, c in (('f32', f32),
                                                                            ('bf16', bf16))}
  for lo, hi in ((STEPS - 10, STEPS), (STEPS // 2, STEPS)):   # after 200 steps; second half
    a, b = f32[lo:hi].mean(), bf16[lo:hi].mean()
    assert abs(b - a) / a < 0.03, f'steps {lo}-{hi}: f32 {a:.4f}, bf16 {b:.4f}; {curves}'


@pytest.mark.slow
@pytest.mark.parametrize('mu_dtype', ['float32', 'bfloat16'])
def test_pure_bf16_params_and_configurable_moments(mu_dtype):
  s = Setup('pure_bf16', OptimConfig(name='adamw', learning_rate=3e-3, schedule='constant',
                                     warmup_steps=0, mu_dtype=mu_dtype), num_steps=10)
  params0 = jax.device_get(s.state.params)
  for leaf in jax.tree.leaves(params0):
    assert leaf.dtype == jnp.bfloat16
  state, m = s.run(s.step_fn(), s.state, make_batches(1)[0])
  assert np.isfinite(float(m['loss']))
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == jnp.bfloat16
  adam = [x for x in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, 'mu'))
          if hasattr(x, 'mu')]
  assert len(adam) == 1
  for leaf in jax.tree.leaves(adam[0].mu):
    assert leaf.dtype == jnp.dtype(mu_dtype)
  for leaf in jax.tree.leaves(adam[0].nu):           # second moment: as the parameters
    assert leaf.dtype == jnp.bfloat16
  changed = [not np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
             for a, b in zip(jax.tree.leaves(params0), jax.tree.leaves(state.params))]
  assert any(changed)


POISON_ID = 1    # EOS: never in the copy-task inputs; as the first encoder token it injects inf


@jax.custom_vjp
def _poison_grad(x, poison):
  return x


def _poison_fwd(x, poison):
  return x, poison


def _poison_bwd(poison, g):
  return jnp.where(poison, jnp.full_like(g, jnp.inf), g), None


_poison_grad.defvjp(_poison_fwd, _poison_bwd)


class InjectInfModel:
  """The same model; when the batch's first encoder token is POISON_ID, every gradient flowing
  back from the logits is +inf (an overflow), so one compiled step serves clean and poisoned
  batches."""

  def __init__(self, model):
    self.model, self.cfg = model, model.cfg

  def apply(self, variables, encoder_input_tokens, *args, **kwargs):
    logits = self.model.apply(variables, encoder_input_tokens, *args, **kwargs)
    return _poison_grad(logits, encoder_input_tokens[0, 0] == POISON_ID)


def poisoned(batch):
  enc = batch['encoder_input_tokens'].copy()
  enc[0, 0] = POISON_ID
  return {**batch, 'encoder_input_tokens': enc}


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_fp16_inf_gradient_skips_the_step_and_halves_the_scale(tmp_path):
  s = Setup('fp16', OptimConfig(name='adamw', learning_rate=1e-3, schedule='constant',
                                warmup_steps=0), num_steps=100)
  # A small initial scale so that the clean steps do not overflow; grow after 2 finite steps.
  # `period` is static (pytree metadata), so the state's shardings get the new loss scale's tree.
  ls0 = precision.DynamicLossScale.create(initial_scale=2.0 ** 10, period=2)
  s.shardings = s.shardings.replace(loss_scale=jax.tree.map(lambda _: s.shardings.step, ls0))
  state = s.state.replace(loss_scale=jax.device_put(ls0, s.shardings.loss_scale))
  step = s.step_fn(InjectInfModel(s.model))
  batches = make_batches(4)

  # 1. A finite step: the update is applied, the scale is kept and the counter advances.
  before = host(state)
  state, m = s.run(step, state, batches[0])
  assert int(m['skipped']) == 0 and np.isfinite(float(m['grad_norm']))
  assert float(m['loss_scale']) == 2.0 ** 10
  assert float(state.loss_scale.loss_scale) == 2.0 ** 10 and int(state.loss_scale.counter) == 1
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(before.params), jax.tree.leaves(host(state.params))))

  # 2. The injected inf gradient: parameters and optimizer state untouched, the scale halved.
  before = host(state)
  state, m = s.run(step, state, poisoned(batches[1]))
  assert not np.isfinite(float(m['grad_norm']))
  assert np.isfinite(float(m['loss']))            # the forward pass was fine
  assert int(m['skipped']) == 1
  assert_trees_equal(before.params, host(state.params))
  assert_trees_equal(before.opt_state, host(state.opt_state))
  assert float(state.loss_scale.loss_scale) == 2.0 ** 9
  assert int(state.loss_scale.counter) == 0 and int(state.loss_scale.skipped) == 1
  assert int(state.step) == int(before.step) + 1

  # 3. Training goes on; after `period` = 2 finite steps the scale doubles again.
  state, m = s.run(step, state, batches[2])
  assert float(state.loss_scale.loss_scale) == 2.0 ** 9 and int(state.loss_scale.counter) == 1
  state, m = s.run(step, state, batches[3])
  assert int(m['skipped']) == 1                   # still the one overflow
  assert float(state.loss_scale.loss_scale) == 2.0 ** 10 and int(state.loss_scale.counter) == 0
  for leaf in jax.tree.leaves(state.params):      # master weights stay f32
    assert leaf.dtype == jnp.float32

  # 4. The loss scale is part of the checkpointed train state.
  saved = host(state)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / 'ckpt'), keep=1, keep_best=0, async_save=False)
  try:
    ckpt.save(4, state, {'position': 4}, {'model': {'precision': 'fp16'}})
    ckpt.wait()
    abstract, _ = state_lib.abstract_train_state(s.cfg, s.tx, s.mesh, s.rules)
    restored, data_state, _ = ckpt.restore(4, abstract)
  finally:
    ckpt.close()
  assert isinstance(restored.loss_scale, precision.DynamicLossScale)
  assert float(restored.loss_scale.loss_scale) == 2.0 ** 10
  assert int(restored.loss_scale.skipped) == 1 and int(restored.loss_scale.counter) == 0
  assert data_state == {'position': 4}
  assert_trees_equal(saved.params, host(restored.params))
