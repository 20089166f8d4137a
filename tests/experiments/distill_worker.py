"""One process of the distillation runs in test_multiprocess_main.py (not a test itself).

  python tests/experiments/distill_worker.py WORKDIR [--coordinator_address=host:port
      --num_processes=N --process_id=i]

A t5_tiny student distilled (soft targets) from a fixed random-init teacher through the shared
trainer (`t5like.train.loop.train` with `t5like.compress.distill.technique`), joining
jax.distributed as experiments/main.py does. Process 0 prints the summary's losses as JSON.
"""
import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from t5like.parallel import distributed  # noqa: E402

_COORDINATOR = flags.DEFINE_string('coordinator_address', '', 'host:port of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'processes in the job')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, "this process's index")
STEPS = 6


def main(argv):
  workdir = argv[1]
  distributed.maybe_initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  import jax
  from t5like.compress import distill
  from t5like.config import DataConfig, DistillConfig, OptimConfig, TrainConfig, get_variant
  from t5like.models import transformer
  from t5like.train import loop
  jax.config.update('jax_default_matmul_precision', 'highest')
  student = TrainConfig(
      model=get_variant('t5_tiny'),
      data=DataConfig(vocab_size=600, tokenizer_max_sentences=20_000, inputs_length=64,
                      batch_size=8),
      optim=OptimConfig(learning_rate=3e-3, warmup_steps=2), num_steps=STEPS, log_every=3,
      eval_every=STEPS, eval_batches=2, checkpoint_every=STEPS, num_samples=0,
      async_checkpointing=False)
  # The student's vocabulary is the tokenizer's: 600 pieces + 100 sentinels, rounded up to 768.
  teacher_cfg = get_variant('t5_tiny', d_model=96, num_heads=4, head_dim=24, vocab_size=768)
  teacher = jax.device_get(transformer.init_params(teacher_cfg, jax.random.PRNGKey(7)))
  summary = loop.train(student, workdir,
                       technique=distill.technique(DistillConfig(kind='soft'), teacher,
                                                   teacher_cfg),
                       print_fn=print if jax.process_index() == 0 else lambda line: None)
  if jax.process_index() == 0:
    print(json.dumps({k: summary[k] for k in ('final_step', 'final_train_loss',
                                              'final_val_loss')}))


if __name__ == '__main__':
  app.run(main)
