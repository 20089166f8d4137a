"""Training: state, pure steps, the loop, checkpoints, metrics.

  state.TrainState, state.create_train_state(model_cfg, tx, mesh, rules, seed)
  step.train_step(state, batch, *, model, tx, ...), step.eval_step(params, batch, *, model)
  step.jit_train_step(...), step.jit_eval_step(...), step.mesh_context(mesh, rules)
  loop.train(config, workdir) -> summary dict
  checkpoint.Checkpointer, checkpoint.CheckpointError
  metrics.MetricsWriter, metrics.measure_peak_flops, metrics.NonFiniteLossError
"""
from t5like.train.checkpoint import CheckpointError, Checkpointer
from t5like.train.loop import train
from t5like.train.metrics import NonFiniteLossError, measure_peak_flops
from t5like.train.state import TrainState, create_train_state
from t5like.train.step import eval_step, jit_eval_step, jit_train_step, mesh_context, train_step

__all__ = ['CheckpointError', 'Checkpointer', 'NonFiniteLossError', 'TrainState',
           'create_train_state', 'eval_step', 'jit_eval_step', 'jit_train_step',
           'measure_peak_flops', 'mesh_context', 'train', 'train_step']
