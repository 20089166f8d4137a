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
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _eval_common  # noqa: E402,F401  (puts the repository on sys.path)

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

  task = Registry().get_task('folio_modernize')
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
    runs[name] = {'workdir': workdir, 'checkpoint': pre.source, 'decode_s': time.time() - t0,
                  'train_wall_s': summary.get('wall_s'), 'steps': summary.get('final_step')}
  out = {'task': 'folio_modernize', 'split': 'test', 'test_plays': list(folio.TEST_PLAYS),
         'validation_plays': list(folio.VALIDATION_PLAYS), 'examples': len(examples),
         'stride': STRIDE.value, 'alignment': {}, 'runs': runs, 'systems': {}}
  for split in folio.SPLITS:
    pairs, stats = folio.split_pairs(split)
    out['alignment'][split] = {'pairs': len(pairs), **stats.__dict__}
  for name, preds in systems.items():
    out['systems'][name] = metrics_lib.with_confidence(METRICS, preds, refs, N_BOOTSTRAP.value)
  out['significance'] = {
      'pretrained_vs_scratch': metrics_lib.paired_significance(
          METRICS, systems['pretrained'], systems['scratch'], refs, N_BOOTSTRAP.value),
      'pretrained_vs_copy': metrics_lib.paired_significance(
          METRICS, systems['pretrained'], systems['copy'], refs, N_BOOTSTRAP.value)}
  os.makedirs(OUT.value, exist_ok=True)
  with open(os.path.join(OUT.value, 'metrics.json'), 'w') as f:
    json.dump(out, f, indent=2)
  for name, preds in systems.items():
    evaluation.write_jsonl(os.path.join(OUT.value, f'predictions_{name}.jsonl'), [
        {'input': e.meta['raw_input'], 'target': e.target, 'prediction': p, 'play': e.meta['play']}
        for e, p in zip(examples, preds)])
  for name, m in out['systems'].items():
    print(f'{name:>10}: ' + ', '.join(f'{k} {v["score"]:.2f} [{v["low"]:.2f}, {v["high"]:.2f}]'
                                      for k, v in m.items()))
  print(json.dumps(out['significance'], indent=2))


if __name__ == '__main__':
  app.run(main)
