"""Distillation on Shakespeare: a teacher, then a student a quarter of its size trained from scratch
and distilled with each loss (soft, hard, sequence-level), equal steps and data.

  .venv/bin/python experiments/distill.py --workdir=runs/distill --teacher_steps=600 --student_steps=300

Writes experiments/results/distill.json (per run: validation-loss curve, final loss, parameters)
and experiments/results/distill.png. The teacher is trained with the trainer
(`t5like.train.loop.train`) and reused from `<workdir>/teacher` if its checkpoint exists;
experiments/quantize.py evaluates the quantised teacher.
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags

from t5like.compress import distill
from t5like.config import DataConfig, DistillConfig, OptimConfig, TrainConfig, get_variant
from t5like.models import param_count
from t5like.train import loop, metrics

FLAGS = flags.FLAGS

def define_flags():
  """This script's flags (defined only when it runs, so experiments/quantize.py can import it)."""
  flags.DEFINE_string('workdir', 'runs/distill', 'where the teacher and students train')
  flags.DEFINE_string('results', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'),
                      'where distill.json / distill.png go')
  flags.DEFINE_integer('teacher_steps', 600, 'teacher training steps')
  flags.DEFINE_integer('student_steps', 300, 'steps of every student run')
  flags.DEFINE_list('kinds', ['scratch', 'soft', 'hard', 'sequence'], 'student runs')
  flags.DEFINE_float('alpha', 0.5, 'weight of the distillation loss')
  flags.DEFINE_float('temperature', 2.0, 'soft-target temperature')


DATA = DataConfig(corpus='shakespeare', vocab_size=2000, inputs_length=64, batch_size=16, pack=False)


def teacher_config(steps: int) -> TrainConfig:
  model = get_variant('t5_tiny', d_model=128, num_heads=4, head_dim=32, d_ff=512,
                      num_encoder_layers=3, num_decoder_layers=3)
  return TrainConfig(model=model, data=DATA, num_steps=steps, log_every=50, eval_every=100,
                     eval_batches=8, checkpoint_every=100, num_samples=0,
                     optim=OptimConfig(name='adamw', learning_rate=3e-3, warmup_steps=50))


def student_config(steps: int) -> TrainConfig:
  model = get_variant('t5_tiny', d_model=64, num_heads=4, head_dim=16, d_ff=256,
                      num_encoder_layers=2, num_decoder_layers=2)
  return TrainConfig(model=model, data=DATA, num_steps=steps, log_every=50,
                     eval_every=max(steps // 6, 1), eval_batches=8, checkpoint_every=steps,
                     num_samples=0, seed=1,
                     optim=OptimConfig(name='adamw', learning_rate=3e-3, warmup_steps=30))


def load_teacher(workdir: str, steps: int):
  """(params, ModelConfig) of the trained teacher: trained with the trainer unless checkpointed."""
  return loop.trained_params(teacher_config(steps), os.path.join(workdir, 'teacher'))


def main(argv):
  del argv
  teacher, tcfg = load_teacher(FLAGS.workdir, FLAGS.teacher_steps)
  teacher_evals = [r for r in metrics.read_jsonl(os.path.join(FLAGS.workdir, 'teacher', 'metrics.jsonl'))
                   if r.get('split') == 'eval']
  results = {'teacher': {'params': param_count(teacher), 'steps': FLAGS.teacher_steps,
                         'val_loss': teacher_evals[-1]['loss'],
                         'curve': [(r['step'], r['loss']) for r in teacher_evals],
                         'model': dataclasses.asdict(tcfg)},
             'alpha': FLAGS.alpha, 'temperature': FLAGS.temperature, 'students': {}}
  config = student_config(FLAGS.student_steps)
  for kind in FLAGS.kinds:
    technique = None if kind == 'scratch' else distill.technique(
        DistillConfig(kind, alpha=FLAGS.alpha, temperature=FLAGS.temperature), teacher, tcfg)
    summary = loop.train(config, os.path.join(FLAGS.workdir, f'student_{kind}'),
                         technique=technique)
    evals, n = summary['evals'], summary['parameters']
    results['students'][kind] = {'params': n, 'val_loss': evals[-1][1], 'curve': evals,
                                 'size_vs_teacher': n / results['teacher']['params']}
    print(f'{kind}: validation loss {evals[-1][1]:.4f}', flush=True)
    _write(results)
  _write(results, plot=True)


def _write(results, plot=False):
  os.makedirs(FLAGS.results, exist_ok=True)
  with open(os.path.join(FLAGS.results, 'distill.json'), 'w') as f:
    json.dump(results, f, indent=1)
  if not plot:
    return
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for kind, r in results['students'].items():
    steps, losses = zip(*r['curve'])
    ax.plot(steps, losses, marker='o', label=f'student {kind} ({r["val_loss"]:.3f})')
  ax.axhline(results['teacher']['val_loss'], color='k', ls='--',
             label=f'teacher ({results["teacher"]["val_loss"]:.3f})')
  ax.set_xlabel('step'); ax.set_ylabel('validation loss'); ax.set_ylim(top=min(
      ax.get_ylim()[1], 1.5 * max(r['val_loss'] for r in results['students'].values())))
  ax.set_title('Distillation on Shakespeare (span corruption)')
  ax.legend(); fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.results, 'distill.png'), dpi=100)


if __name__ == '__main__':
  define_flags()
  app.run(main)
