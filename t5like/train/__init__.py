"""Training: state, pure steps with a pluggable loss, the one trainer, checkpoints, metrics.

  state.TrainState, state.create_train_state(model_cfg, tx, mesh, rules, seed)
  step.train_step(state, batch, extra=None, *, model, tx, loss=None, ...),
  step.eval_step(params, batch, *, model), step.Loss, step.cross_entropy_loss(...)
  step.jit_train_step(...), step.jit_eval_step(...), step.mesh_context(mesh, rules, mesh_cfg)
  loop.train(config, workdir, technique=None) -> summary dict; loop.Technique
  checkpoint.Checkpointer, checkpoint.CheckpointError, checkpoint.restore_params(workdir, step)
  metrics.MetricsWriter, metrics.measure_peak_flops, metrics.NonFiniteLossError
"""
from t5like.train.checkpoint import CheckpointError, Checkpointer, restore_params
from t5like.train.loop import Technique, train
from t5like.train.metrics import NonFiniteLossError, measure_peak_flops
from t5like.train.state import TrainState, create_train_state
from t5like.train.step import (Loss, cross_entropy_loss, eval_step, jit_eval_step, jit_train_step,
                               mesh_context, train_step)

__all__ = ['CheckpointError', 'Checkpointer', 'Loss', 'NonFiniteLossError', 'Technique',
           'TrainState', 'create_train_state', 'cross_entropy_loss', 'eval_step', 'jit_eval_step',
           'jit_train_step', 'measure_peak_flops', 'mesh_context', 'restore_params', 'train',
           'train_step']
