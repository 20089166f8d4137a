"""Validation loss of the trained Shakespeare teacher under each quantisation scheme, and bytes.

  .venv/bin/python experiments/quantize.py --workdir=runs/distill --teacher_steps=400

Uses the teacher that experiments/distill.py trains (trained here first if it is missing). Writes
experiments/results/quant.json (per scheme: validation loss, relative change against f32, weight
bytes and their ratio to f32, also for t5_small's shapes) and experiments/results/quant.png.
Targets: int8 weight-only within 1% of f32, int4 group-wise within 5%.
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import app, flags
from ml_collections import config_flags

_TEACHER = config_flags.DEFINE_config_file(
    'teacher', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs', 'distill.py')
    + ':teacher', 'the teacher of experiments/distill.py')
flags.DEFINE_string('workdir', 'runs/distill', 'workdir of experiments/distill.py')
flags.DEFINE_string('results', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results'),
                    'where quant.json / quant.png go')
flags.DEFINE_integer('teacher_steps', 600, 'teacher training steps (as for distill.py)')
flags.DEFINE_integer('eval_batches', 0, 'validation batches (0: the whole split)')
FLAGS = flags.FLAGS

# name: (scheme or None, group size, activation quantisation, scale dtype)
SCHEMES = {
    'f32': (None, 0, 'none', ''),
    'int8': ('int8', 0, 'none', 'float32'),
    'int8_bf16_scales': ('int8', 0, 'none', 'bfloat16'),
    'int8_dynamic': ('int8', 0, 'dynamic', 'float32'),
    'int8_static': ('int8', 0, 'static', 'float32'),
    'f32_dynamic': (None, 0, 'dynamic', ''),
    'int4_g32': ('int4', 32, 'none', 'float32'),
    'int4_g64': ('int4', 64, 'none', 'float32'),
    'int4_g128': ('int4', 128, 'none', 'float32'),
    'int4_g128_bf16_scales': ('int4', 128, 'none', 'bfloat16'),
    'int4_g64_dynamic': ('int4', 64, 'dynamic', 'float32'),
}


def main(argv):
  del argv
  import jax
  from t5like.compress import quantize
  from t5like.config import TrainConfig, from_dict, get_variant
  from t5like.data import pipeline
  from t5like.models import build_model
  from t5like.parallel.mesh import make_mesh
  from t5like.train import loop, step as step_lib

  config = dataclasses.replace(from_dict(TrainConfig, _TEACHER.value.to_dict()),
                               num_steps=FLAGS.teacher_steps)
  params, cfg = loop.trained_params(config, os.path.join(FLAGS.workdir, 'teacher'))
  train_iter, eval_batches, _ = pipeline.make_datasets(
      config.data, cfg.arch, os.path.join(FLAGS.workdir, 'teacher'), seed=config.seed)
  calib = {k: jax.numpy.asarray(v) for k, v in next(train_iter).items()}
  mesh = make_mesh(config.mesh)
  f32_bytes = quantize.weight_bytes(params)
  out = {'model': cfg.name, 'parameters': int(sum(x.size for x in jax.tree.leaves(params))),
         'teacher_steps': FLAGS.teacher_steps, 'schemes': {}}
  for name, (scheme, group, act, sdt) in SCHEMES.items():
    if scheme is None:
      p, c = params, cfg.with_quant(activations=act)
    else:
      p, c = quantize.quantize_params(params, cfg, scheme, group_size=group or None,
                                      activation_quant=act, scale_dtype=sdt,
                                      calibration_inputs=calib if act == 'static' else None)
    eval_fn = jax.jit(lambda pp, b, m=build_model(c): step_lib.eval_step(pp, b, model=m))
    val = loop.evaluate(eval_fn, p, eval_batches, mesh, FLAGS.eval_batches)
    out['schemes'][name] = {'val_loss': val['loss'], 'val_accuracy': val['accuracy'],
                            'weight_bytes': quantize.weight_bytes(p),
                            'bytes_vs_f32': quantize.weight_bytes(p) / f32_bytes}
    print(f'{name}: validation loss {val["loss"]:.4f}', flush=True)
  base = out['schemes']['f32']['val_loss']
  for r in out['schemes'].values():
    r['val_loss_rel_change'] = r['val_loss'] / base - 1.0
  small = get_variant('t5_small')
  from t5like.models import transformer
  small_f32 = quantize.weight_bytes(transformer.abstract_params(small))
  out['t5_small_bytes_vs_f32'] = {
      'int8': quantize.weight_bytes(quantize.abstract_quantized_params(small, 'int8')) / small_f32,
      'int8_bf16_scales': quantize.weight_bytes(quantize.abstract_quantized_params(
          small, 'int8', scale_dtype='bfloat16')) / small_f32,
      'int4_g128': quantize.weight_bytes(quantize.abstract_quantized_params(
          small, 'int4', group_size=128)) / small_f32,
      'int4_g64': quantize.weight_bytes(quantize.abstract_quantized_params(
          small, 'int4', group_size=64)) / small_f32}
  s = out['schemes']
  out['checks'] = {'int8_within_1pct': abs(s['int8']['val_loss_rel_change']) <= 0.01,
                   'int4_g128_within_5pct': abs(s['int4_g128']['val_loss_rel_change']) <= 0.05,
                   't5_small_int8_bytes_le_0.27': out['t5_small_bytes_vs_f32']['int8'] <= 0.27,
                   't5_small_int4_bytes_le_0.15': out['t5_small_bytes_vs_f32']['int4_g128'] <= 0.15}
  os.makedirs(FLAGS.results, exist_ok=True)
  with open(os.path.join(FLAGS.results, 'quant.json'), 'w') as f:
    json.dump(out, f, indent=1)
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, r in s.items():
    ax.scatter(r['bytes_vs_f32'], r['val_loss'])
    ax.annotate(name, (r['bytes_vs_f32'], r['val_loss']), fontsize=7)
  ax.set_xlabel('weight bytes / f32 bytes'); ax.set_ylabel('validation loss')
  ax.set_title(f'Quantised Shakespeare teacher ({out["parameters"]:,} parameters)')
  fig.tight_layout()
  fig.savefig(os.path.join(FLAGS.results, 'quant.png'), dpi=100)


if __name__ == '__main__':
  app.run(main)
