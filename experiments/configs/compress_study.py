"""The compression study (t5like/compress/study.py): every technique on one fine-tuned model.

  python experiments/main.py --config=experiments/configs/folio.py:pretrained \
      --workdir=runs/folio_pretrained                   # the teacher (once)
  python experiments/compress_study.py --config=experiments/configs/compress_study.py:default
  python experiments/compress_study.py --config=experiments/configs/compress_study.py:full \
      --teacher_workdir=runs/folio_pretrained --out=runs/compress_study_full

Rerunning the same command resumes: variants and measurements already in <out>/results.json are
kept and skipped.

Args:
  default  this 2-core CPU in about 25 minutes (idle): the teacher is runs/folio_pretrained's
           best checkpoint when present; else one is fine-tuned here first (from the main job's
           checkpoint, runs/shakespeare_default, when present; else a fresh t5_tiny); 20-step
           stages, 192 test pairs
  full     an accelerator: a longer teacher fine-tune (or --teacher_workdir), 400-step stages,
           the whole test split
  tiny     a t5_tiny smoke run (tests)
"""
import dataclasses
import os

import ml_collections

from t5like.compress import study_spec

MAIN_JOB = 'runs/shakespeare_default'
FOLIO_TEACHER = 'runs/folio_pretrained'


def get_config(arg: str = 'default') -> ml_collections.ConfigDict:
  if arg not in ('default', 'full', 'tiny'):
    raise ValueError(f'unknown compress_study config {arg!r}; choose default, full or tiny')
  cfg = ml_collections.ConfigDict(dataclasses.asdict(study_spec.StudyConfig()))
  if arg in ('default', 'full') and os.path.isdir(os.path.join(FOLIO_TEACHER, 'checkpoints')):
    cfg.teacher = FOLIO_TEACHER
  if arg in ('default', 'full') and os.path.isdir(os.path.join(MAIN_JOB, 'checkpoints')):
    cfg.teacher_init = MAIN_JOB
  cfg.teacher_learning_rate = 3e-2    # experiments/configs/folio.py's
  cfg.learning_rate = 5e-3
  if arg == 'default':
    cfg.teacher_steps = 400
    cfg.batch_size = 16
    cfg.inputs_length = 48
    cfg.targets_length = 48
    cfg.finetune_steps = 20
    cfg.calibration_batches = 1
    cfg.test_examples = 192
    cfg.eval_batch_size = 8
    cfg.validation_batches = 4
    cfg.timing_rounds = 3
    cfg.n_bootstrap = 300
    cfg.serve_requests = 8
    cfg.serve_max_tokens = 24
  elif arg == 'full':
    cfg.teacher_steps = 2000
    cfg.finetune_steps = 400
    cfg.calibration_batches = 8
    cfg.test_examples = 0
    cfg.eval_batch_size = 64
    cfg.validation_batches = 0
    cfg.timing_rounds = 5
    cfg.serve_requests = 64
    cfg.serve_max_tokens = 64
  else:
    cfg.teacher_model = 't5_tiny'
    cfg.teacher_steps = 4
    cfg.tokenizer_vocab_size = 400
    cfg.batch_size = 8
    cfg.inputs_length = 32
    cfg.targets_length = 32
    cfg.finetune_steps = 2
    cfg.calibration_batches = 1
    cfg.test_examples = 16
    cfg.validation_batches = 1
    cfg.timing_rounds = 1
    cfg.n_bootstrap = 20
    cfg.serve = False
  return cfg
