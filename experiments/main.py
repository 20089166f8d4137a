"""Trains a T5-style model: the main job of the README.

  python experiments/main.py [--config=experiments/configs/<file>.py:<arg>] [--config.a.b=value]
                             [--workdir=runs/<config name>]

The ml_collections config is converted once into `t5like.config.TrainConfig` (unknown keys are an
error naming the valid ones). A workdir that already has checkpoints is resumed from the latest.

Several processes (a TPU pod slice, GPU hosts): the job joins `jax.distributed` itself before
anything else (t5like.parallel.distributed: auto-detected on Cloud TPU VMs, GKE, SLURM and Open MPI;
--coordinator_address / --num_processes / --process_id, or T5LIKE_COORDINATOR /
T5LIKE_NUM_PROCESSES / T5LIKE_PROCESS_ID, otherwise). One process never waits for a coordinator.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from t5like import config as config_lib

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                              'shakespeare.py')
_CONFIG = config_flags.DEFINE_config_file('config', DEFAULT_CONFIG, 'Experiment config file[:arg].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; default ./runs/<config name>.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', '',
                                   'host:port of process 0, for a multi-process job that JAX '
                                   'cannot auto-detect (with --num_processes and --process_id)')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the job')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "this process's index in the job")


_USER_ERRORS: tuple = ()


def config_name(flag_value: str) -> str:
  path, _, arg = flag_value.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  return f'{stem}_{arg or "default"}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  from t5like.parallel import distributed
  try:  # before anything touches a jax backend
    distributed.maybe_initialize(coordinator_address=_COORDINATOR.value,
                                 num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  except config_lib.ConfigError as e:
    print(f'error: ConfigError: {e}', file=sys.stderr)
    sys.exit(1)
  import jax
  # Compiled programs are cached across runs (a resumed run skips most compilation).
  jax.config.update('jax_compilation_cache_dir', os.environ.get(
      'T5LIKE_COMPILATION_CACHE', os.path.expanduser('~/.cache/t5like/jax')))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  # The library is imported only now, after jax.distributed is joined: importing it may touch a
  # jax backend, which initialize() must precede.
  from t5like.data import corpus, objectives, pipeline, tokenizer
  from t5like.train import checkpoint, loop, metrics
  global _USER_ERRORS
  _USER_ERRORS = (config_lib.ConfigError, corpus.CorpusError, tokenizer.TokenizerError,
                  objectives.ObjectiveError, pipeline.PipelineError, checkpoint.CheckpointError,
                  metrics.NonFiniteLossError)
  try:
    cfg = config_lib.from_dict(config_lib.TrainConfig, _CONFIG.value.to_dict())
  except config_lib.ConfigError as e:
    print(f'error: ConfigError: {e}', file=sys.stderr)
    sys.exit(1)
  workdir = _WORKDIR.value or os.path.join('runs', config_name(flags.FLAGS['config'].serialize()
                                                               .partition('=')[2] or DEFAULT_CONFIG))
  writer = jax.process_index() == 0   # one process of a multi-process job prints progress
  try:
    summary = loop.train(cfg, workdir, print_fn=print if writer else lambda line: None)
  except _USER_ERRORS as e:  # bad config, data or checkpoint: one clear line, exit status 1
    print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(1)
  if not writer:
    return
  print()
  for prompt, text in summary.get('samples', []):
    print(f'  prompt: {prompt}\n  model:  {text}\n')
  if summary.get('final_val_loss') is not None:
    print(f'validation loss: step 0 {summary["initial_val_loss"]:.4f} -> step '
          f'{summary["final_step"]} {summary["final_val_loss"]:.4f} '
          f'(accuracy {summary["final_val_accuracy"]:.3f})')
  print(f'wall time {summary["wall_s"]:.0f} s ({summary["timings"]})')
  for key in ('workdir', 'config_file', 'checkpoint_dir', 'metrics_file', 'tensorboard_dir', 'plot'):
    print(f'{key:>16}: {summary[key]}')
  if summary.get('interrupted'):
    print(f'interrupted by {summary["interrupted"]} at step {summary["final_step"]}: rerun the same '
          'command to resume')


if __name__ == '__main__':
  app.run(main)
