"""What test_multihost.py and its worker processes share: config, data, the training loop."""
import dataclasses

import jax
import numpy as np
import optax

from t5like.config import MeshConfig, get_variant
from t5like.models import transformer
from t5like.parallel import mesh as mesh_lib
from t5like.train import state as state_lib, step as step_lib

CFG = get_variant('t5_tiny')
GLOBAL_BATCH, S, T, STEPS = 8, 8, 8, 3
# Two processes along 'data' (DCN: a process is a granule), each with 4 devices along 'fsdp'.
HOST_MESH = MeshConfig(data=1, fsdp=4, dcn_data=2, rules='fsdp')
# The same layout within one process of 8 devices.
SINGLE_MESH = MeshConfig(data=2, fsdp=4, rules='fsdp')


def make_tx():
  return optax.adam(1e-2)


def config_dict():
  return dataclasses.asdict(CFG)


def batch_rows(step: int, rows) -> dict[str, np.ndarray]:
  """Rows `rows` of global batch `step`; row i depends only on (step, i), so a process can
  generate its own rows and nothing else."""
  out = {'encoder_input_tokens': [], 'decoder_input_tokens': [], 'decoder_target_tokens': []}
  for i in rows:
    rng = np.random.default_rng([step, i])
    enc = rng.integers(2, CFG.vocab_size, S).astype(np.int32)
    tgt = rng.integers(2, CFG.vocab_size, T).astype(np.int32)
    dec = np.concatenate([[CFG.decoder_start_id], tgt[:-1]]).astype(np.int32)
    for k, v in zip(out, (enc, dec, tgt)):
      out[k].append(v)
  return {k: np.stack(v) for k, v in out.items()}


def train(mesh, mesh_cfg, batch_fn):
  """STEPS updates from the seed-0 state; (final state, [loss per step])."""
  rules = mesh_lib.get_rules(mesh_cfg.rules)
  tx = make_tx()
  state, shardings = state_lib.create_train_state(CFG, tx, mesh, rules, seed=0)
  losses = []
  step_fn = None
  for step in range(STEPS):
    batch = batch_fn(step)
    if step_fn is None:
      step_fn = step_lib.jit_train_step(model=transformer.build_model(CFG), tx=tx,
                                        state_shardings=shardings,
                                        batch_shardings={k: v.sharding for k, v in batch.items()},
                                        mesh=mesh)
    with mesh_lib.activate(mesh, rules, mesh_cfg):
      state, metrics = step_fn(state, batch)
    losses.append(float(jax.device_get(metrics['loss'])))
  return state, losses
