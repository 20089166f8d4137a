"""The folio_modernize headline table: (a) fine-tuned from the pretrained checkpoint, (b) from
scratch, (c) the copy baseline, on the held-out test plays.

  python experiments/folio_report.py [--pretrained=runs/folio_pretrained]
      [--scratch=runs/folio_scratch] [--out=experiments/results/folio] [--stride=1]

Each system's best checkpoint (by validation chrF) decodes the test split greedily. Writes
<out>/metrics.json (BLEU / chrF / exact match with sacrebleu's 95% bootstrap intervals, paired
bootstrap significance of (a) vs (b) and of (a) vs copy, the test plays, the alignment counts,
the runs' settings) and <out>/predictions_<system>.jsonl (input, target, prediction, play).
--stride=k scores every k-th test pair (the same pairs for every system) to save time.
"""
import json
import os
import time

from absl import app, flags


PRETRAINED = flags.DEFINE_string('pretrained', 'runs/folio_pretrained', 'Workdir of run (a).')
SCRATCH = flags.DEFINE_string('scratch', 'runs/folio_scratch', 'Workdir of run (b).')
OUT = flags.DEFINE_string('out', 'experiments/results/folio', 'Output folder.')
STRIDE = flags.DEFINE_integer('stride', 1, 'Score every k-th test pair.')
N_BOOTSTRAP = flags.DEFINE_integer('n_bootstrap', 1000, 'Bootstrap resamples.')
METRICS = ('bleu', 'chrf', 'exact_match')


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from t5like.data import folio
  from t5like.data.tasks import Registry
  from t5like.data.tasks import metrics as metrics_lib
  from t5like.train import evaluation, init_from

  from t5like.train import metrics as train_metrics
  cache = os.path.join(PRETRAINED.value, 'tasks')   # the runs' alignment cache
  task = Registry(cache_dir=cache).get_task('folio_modernize')
  examples = task.examples('test')[::STRIDE.value]
  refs = [e.target for e in examples]
  systems = {'copy': [e.meta['raw_input'] for e in examples]}
  runs = {}
  for name, workdir in (('pretrained', PRETRAINED.value), ('scratch', SCRATCH.value)):
    settings = evaluation.saved_settings(workdir)
    pre = init_from.load_pretrained(workdir, 'best')
    lengths = {'encoder': settings['inputs_length'], 'decoder': settings['targets_length']}
    t0 = time.time()
    preds = evaluation.generate(pre.params, pre.cfg, pre.tokenizer, [e.input for e in examples],
                                max_input_length=lengths['encoder'],
                                max_decode_length=lengths['decoder'], batch_size=64,
                                print_fn=print)
    systems[name] = [task.postprocess_text(p) for p in preds]
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
    runs[name] = {'workdir': workdir, 'checkpoint': os.path.relpath(pre.source), 'decode_s': time.time() - t0,
                  'train_wall_s': summary.get('wall_s'), 'steps': summary.get('final_step')}
  out = {'task': 'folio_modernize', 'split': 'test', 'test_plays': list(folio.TEST_PLAYS),
         'validation_plays': list(folio.VALIDATION_PLAYS), 'examples': len(examples),
         'stride': STRIDE.value, 'alignment': {}, 'runs': runs, 'systems': {}}
  for split in folio.SPLITS:
    pairs, stats = folio.split_pairs(split, cache)
    out['alignment'][split] = {'pairs': len(pairs), **stats.__dict__}
  for name, preds in systems.items():
    out['systems'][name] = metrics_lib.with_confidence(METRICS, preds, refs, N_BOOTSTRAP.value)
  out['significance'] = {
      'pretrained_vs_scratch': metrics_lib.paired_significance(
          METRICS, systems['pretrained'], systems['scratch'], refs, N_BOOTSTRAP.value),
      'pretrained_vs_copy': metrics_lib.paired_significance(
          METRICS, systems['pretrained'], systems['copy'], refs, N_BOOTSTRAP.value)}
  os.makedirs(OUT.value, exist_ok=True)
  # The copy baseline on the validation examples the runs decoded at each evaluation.
  n_val = json.load(open(os.path.join(PRETRAINED.value, 'config.json')))['task']['eval_examples']
  val = task.examples('validation')[:n_val or None]
  out['copy_validation'] = metrics_lib.compute(METRICS, [e.meta['raw_input'] for e in val],
                                               [e.target for e in val])
  for name, preds in systems.items():
    evaluation.write_jsonl(os.path.join(OUT.value, f'predictions_{name}.jsonl'), [
        {'input': e.meta['raw_input'], 'target': e.target, 'prediction': p, 'play': e.meta['play']}
        for e, p in zip(examples, preds)])
  out['curves'] = {name: [{k: r[k] for k in ('step', 'loss', 'task/chrf', 'task/bleu') if k in r}
                          for r in train_metrics.read_jsonl(
                              os.path.join(runs[name]['workdir'], 'metrics.jsonl'))
                          if r.get('split') == 'eval']
                   for name in runs}
  with open(os.path.join(OUT.value, 'metrics.json'), 'w') as f:
    json.dump(out, f, indent=2)
  _plot(out['curves'], out['copy_validation']['chrf'], os.path.join(OUT.value, 'curves.png'))
  for name, m in out['systems'].items():
    print(f'{name:>10}: ' + ', '.join(f'{k} {v["score"]:.2f} [{v["low"]:.2f}, {v["high"]:.2f}]'
                                      for k, v in m.items()))
  print(json.dumps(out['significance'], indent=2))


def _plot(curves, copy_chrf, path):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name, rows in curves.items():
    steps = [r['step'] for r in rows]
    axes[0].plot(steps, [r['loss'] for r in rows], marker='o', label=name)
    axes[1].plot(steps, [r.get('task/chrf', float('nan')) for r in rows], marker='o', label=name)
  axes[1].axhline(copy_chrf, color='gray', linestyle='--', label='copy baseline')
  axes[0].set(xlabel='step', ylabel='validation loss', title='folio_modernize: validation loss')
  axes[1].set(xlabel='step', ylabel='chrF', title='validation chrF (decoded examples)')
  for ax in axes:
    ax.legend()
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == '__main__':
  app.run(main)
