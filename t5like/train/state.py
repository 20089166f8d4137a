"""The train state and its sharded creation.

`TrainState` holds everything a training step changes and a checkpoint must restore: the step
counter, parameters, optimizer state, the run's base rng key and the loss scale (a
`t5like.precision.DynamicLossScale` for 'fp16', a no-op otherwise). The optimizer itself (an optax
`GradientTransformation`, i.e. functions) is not state: it is rebuilt from the config and passed to
the step functions. The data-iterator position and the resolved config are saved next to the state
by `t5like.train.checkpoint`, not inside it.

Creation never materialises on one host: `jax.eval_shape` of the init
function gives the boxed (logically partitioned) tree, whose names the mesh rules turn into
NamedShardings, and the init is jitted with those `out_shardings` (`partition.sharded_init`).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from t5like import precision
from t5like.config import ModelConfig
from t5like.models import build_model
from t5like.models.transformer import dummy_inputs
from t5like.parallel import partition


@struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  rng: jax.Array           # raw uint32[2] base key; step randomness is fold_in(rng, step)
  loss_scale: Any          # precision.DynamicLossScale or precision.NoOpLossScale


def _init_boxed(model_cfg: ModelConfig, tx: optax.GradientTransformation, rng):
  """The boxed (nn.Partitioned) train state: init params, then the optimizer on them."""
  params_rng, state_rng = jax.random.split(rng)
  params = build_model(model_cfg).init(params_rng, *dummy_inputs(model_cfg))['params']
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                    rng=state_rng,
                    loss_scale=precision.make_loss_scale(precision.get_policy(model_cfg.precision)))


def boxed_state_shape(model_cfg: ModelConfig, tx: optax.GradientTransformation):
  """ShapeDtypeStructs of the boxed train state (no allocation)."""
  return jax.eval_shape(functools.partial(_init_boxed, model_cfg, tx), jax.random.PRNGKey(0))


def params_shardings(model_cfg: ModelConfig, mesh: Mesh, rules):
  """NamedShardings of a model's (unboxed) params, by their logical axis names (e.g. to place a
  frozen teacher like the model it is)."""
  boxed = jax.eval_shape(lambda rng: build_model(model_cfg).init(rng, *dummy_inputs(model_cfg)),
                         jax.random.PRNGKey(0))['params']
  return partition.logical_shardings(boxed, mesh, rules)


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules):
  """NamedShardings of every leaf of the (unboxed) train state."""
  return partition.logical_shardings(boxed_state_shape(model_cfg, tx), mesh, rules)


def create_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                       rules, seed: int):
  """(TrainState placed on `mesh` by its logical axis names, its shardings)."""
  return partition.sharded_init(functools.partial(_init_boxed, model_cfg, tx), mesh, rules,
                                jax.random.PRNGKey(seed))


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules):
  """The unboxed train state as ShapeDtypeStructs carrying their shardings (a restore target)."""
  boxed = boxed_state_shape(model_cfg, tx)
  shardings = partition.logical_shardings(boxed, mesh, rules)
  unboxed = nn.unbox(boxed)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      unboxed, shardings), shardings
