"""One training step on 8 fake CPU devices equals one device, for every parallelism layout.

The step is the trainer's `train_step` (t5like/train/step.py), jitted with its explicit shardings.

Loss and gradients (f32) of the same parameters and batch must agree to 1e-5 relative, and each
device must hold the share of the parameters its mesh promises. Run with -s for the table.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5like import precision
from t5like.config import MeshConfig, get_variant
from t5like.models import transformer
from t5like.parallel import mesh as mesh_lib, partition
from t5like.train import state as state_lib, step as step_lib

CFG = get_variant('t5_tiny', num_encoder_layers=4, num_decoder_layers=4)
B, S, T = 8, 8, 8

# name: (mesh, the factor by which the big parameters must be split on each device, the largest
# fraction of the parameter bytes allowed in leaves not split that way: norm scales and the
# relative-position tables; under the pp_* presets also the embedding, which lies outside the layer
# stack and so is not split over 'stage': 9% of this tiny model with its 512-row vocabulary)
MESHES = {
    'dp8': (MeshConfig(data=8, rules='dp'), 1, 0.0),
    'fsdp8': (MeshConfig(data=1, fsdp=8, rules='fsdp'), 8, 0.01),
    'tp2xdp4': (MeshConfig(data=4, tensor=2, rules='tp'), 2, 0.01),
    'fsdp2xtp2xdp2': (MeshConfig(data=2, fsdp=2, tensor=2, rules='fsdp_tp'), 4, 0.01),
    'pp2xdp4': (MeshConfig(data=4, stage=2, rules='pp_dp', num_microbatches=2), 2, 0.10),
    'pp4xtp2': (MeshConfig(data=1, tensor=2, stage=4, rules='pp_tp', num_microbatches=4), 8,
                0.10),
    # Circular: 2 stages x 2 repeats, one layer per chunk.
    'pp2xtp2xdp2_circular': (MeshConfig(data=2, tensor=2, stage=2, rules='pp_tp', num_microbatches=2,
                                        pipeline_repeats=2), 4, 0.10),
}


def make_batch(seed=0):
  rng = np.random.default_rng(seed)
  enc = rng.integers(2, CFG.vocab_size, (B, S)).astype(np.int32)
  enc[::3, -2:] = 0                                   # some encoder padding
  dec = rng.integers(2, CFG.vocab_size, (B, T)).astype(np.int32)
  dec[:, 0] = CFG.decoder_start_id
  tgt = np.roll(dec, -1, axis=1)
  return {'encoder_input_tokens': enc, 'decoder_input_tokens': dec, 'decoder_target_tokens': tgt}


def boxed_init(rng):
  model = transformer.build_model(CFG)
  return model.init(rng, *transformer.dummy_inputs(CFG))['params']


# An "optimizer" that leaves the parameters alone and keeps this step's gradients as its state,
# so that the trainer's own `train_step` hands back exactly the gradients it computed.
KEEP_GRADS = optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def make_state(params):
  return state_lib.TrainState(step=jnp.zeros([], jnp.int32), params=params,
                              opt_state=KEEP_GRADS.init(params), rng=jax.random.PRNGKey(1),
                              loss_scale=precision.make_loss_scale(precision.get_policy('f32')))


def run_step(state, batch):
  return step_lib.train_step(state, batch, model=transformer.build_model(CFG), tx=KEEP_GRADS)


@pytest.fixture(scope='module')
def reference():
  params = jax.jit(lambda r: nn.unbox(boxed_init(r)))(jax.random.key(0))
  batch = make_batch()
  new_state, metrics = jax.jit(run_step)(make_state(params), batch)
  # Host copies: the sharded steps donate their inputs, which may alias device 0's buffers.
  return jax.device_get(params), batch, float(metrics['loss']), jax.device_get(new_state.opt_state)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


@pytest.mark.parametrize('name', list(MESHES))
def test_step_matches_one_device(name, reference):
  mesh_cfg, split, small = MESHES[name]
  params, batch, ref_loss, ref_grads = reference
  mesh = mesh_lib.make_mesh(mesh_cfg)
  rules = mesh_lib.get_rules(mesh_cfg.rules)
  mesh_lib.check_model_fits(CFG, mesh_cfg, mesh, B)
  state_shardings = state_lib.state_shardings(CFG, KEEP_GRADS, mesh, rules)
  shardings = state_shardings.params
  state = jax.device_put(make_state(params), state_shardings)
  batch_shardings = step_lib.batch_shardings(mesh, batch)
  sharded_batch = jax.device_put(batch, batch_shardings)
  step = step_lib.jit_train_step(model=transformer.build_model(CFG), tx=KEEP_GRADS,
                                 state_shardings=state_shardings, batch_shardings=batch_shardings,
                                 mesh=mesh)
  with mesh_lib.activate(mesh, rules, mesh_cfg):
    compiled = step.lower(state, sharded_batch).compile()
  sharded = state.params
  per_device = partition.per_device_bytes(sharded)   # before the step donates the state
  total = partition.total_bytes(sharded)
  not_split = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(sharded)
                  if math.prod(x.sharding.shard_shape(x.shape)) * split > math.prod(x.shape))
  new_state, metrics = compiled(state, sharded_batch)
  loss, grads = metrics['loss'], new_state.opt_state
  assert jax.tree.all(jax.tree.map(lambda g, s: g.sharding.is_equivalent_to(s, g.ndim),
                                   grads, shardings))
  loss_diff = abs(float(loss) - ref_loss)
  errs = jax.tree.map(_rel_err, grads, ref_grads)
  worst = max(jax.tree.leaves(errs))
  assert loss_diff <= 1e-5 * abs(ref_loss), (name, float(loss), ref_loss)
  assert worst <= 1e-5, (name, {k: v for k, v in
                                jax.tree_util.tree_leaves_with_path(errs) if v > 1e-5})
  if mesh_cfg.stage > 1:   # the pipeline ran: stage outputs move by collective permutes
    assert 'collective-permute' in compiled.as_text()

  # Per-device parameter bytes: at most 1/split of the total, plus the leaves not split that way.
  assert per_device <= total / split + not_split, (name, per_device, total, not_split)
  assert not_split <= small * total, (name, not_split, total)
  if split == 1:
    assert per_device == total
  print(f'\n{name:14s} loss {float(loss):.7f} |dloss| {loss_diff:.2e} max grad rel err '
        f'{worst:.2e} param bytes/device {per_device} of {total} ({per_device / total:.3f}; '
        f'not split {split}-way: {not_split / total:.3f})')


def test_sharded_init_equals_host_init(reference):
  """sharded_init (jit with out_shardings) gives the host-initialised values, already split."""
  params = reference[0]
  mesh_cfg = MESHES['fsdp8'][0]
  mesh = mesh_lib.make_mesh(mesh_cfg)
  out, shardings = partition.sharded_init(boxed_init, mesh, mesh_lib.get_rules(mesh_cfg.rules),
                                          jax.random.key(0))
  kernel = out['encoder']['stack']['layers']['layer']['mlp']['wi']['kernel']
  assert kernel.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // 8   # 'embed' -> fsdp
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), out, params))
