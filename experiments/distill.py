"""Distillation on Shakespeare: a teacher, then a student a quarter of its size trained from scratch
and distilled with each loss (soft, hard, sequence-level), equal steps and data.

  .venv/bin/python experiments/distill.py --workdir=runs/distill --teacher_steps=600 --student_steps=300

Writes experiments/results/distill.json (per run: validation-loss curve, final loss, parameters)
and experiments/results/distill.png. Teacher and student are experiments/configs/distill.py; the
teacher is trained with the trainer (`t5like.train.loop.trained_params`) and reused from
`<workdir>/teacher` if its checkpoint exists; the students train through the same trainer, the
distilled ones with `t5like.compress.distill.technique`. experiments/quantize.py evaluates the
quantised teacher.
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags
from ml_collections import config_flags

from t5like.compress import distill
from t5like.config import DistillConfig, TrainConfig, from_dict
from t5like.models import param_count
from t5like.train import loop, metrics

CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'distill.py')
_TEACHER = config_flags.DEFINE_config_file('teacher', f'{CONFIG}:teacher', 'teacher config')
_STUDENT = config_flags.DEFINE_config_file('student', f'{CONFIG}:student', 'student config')
flags.DEFINE_string('workdir', 'runs/distill', 'where the teacher and students train')
flags.DEFINE_string('results', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'),
                    'where distill.json / distill.png go')
flags.DEFINE_integer('teacher_steps', 600, 'teacher training steps')
flags.DEFINE_integer('student_steps', 300, 'steps of every student run')
flags.DEFINE_list('kinds', ['scratch', 'soft', 'hard', 'sequence'], 'student runs')
flags.DEFINE_float('alpha', 0.5, 'weight of the distillation loss')
flags.DEFINE_float('temperature', 2.0, 'soft-target temperature')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  teacher_cfg = dataclasses.replace(from_dict(TrainConfig, _TEACHER.value.to_dict()),
                                    num_steps=FLAGS.teacher_steps)
  teacher, tcfg = loop.trained_params(teacher_cfg, os.path.join(FLAGS.workdir, 'teacher'))
  teacher_evals = [r for r in metrics.read_jsonl(os.path.join(FLAGS.workdir, 'teacher',
                                                              'metrics.jsonl'))
                   if r.get('split') == 'eval']
  results = {'teacher': {'params': param_count(teacher), 'steps': FLAGS.teacher_steps,
                         'val_loss': teacher_evals[-1]['loss'],
                         'curve': [(r['step'], r['loss']) for r in teacher_evals],
                         'model': dataclasses.asdict(tcfg)},
             'alpha': FLAGS.alpha, 'temperature': FLAGS.temperature, 'students': {}}
  steps = FLAGS.student_steps
  config = dataclasses.replace(from_dict(TrainConfig, _STUDENT.value.to_dict()), num_steps=steps,
                               eval_every=max(steps // 6, 1), checkpoint_every=steps)
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
  app.run(main)
