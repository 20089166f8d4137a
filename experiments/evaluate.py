"""Evaluates a model on a task split: metrics JSON and predictions JSONL.

  python experiments/evaluate.py --workdir=runs/folio_pretrained --task=folio_modernize \
      --split=test [--step=best] [--decode=beam --num_beams=4] [--confidence] [--output_dir=...]

--workdir may also be an exported bundle or a Hugging Face T5 folder. Writes
<output_dir>/metrics_<task>_<split>.json (metrics, 95% bootstrap CIs with --confidence, the copy or
majority baseline, rank-classification metrics with --rank_classification) and
<output_dir>/predictions_<task>_<split>.jsonl (input, target, prediction, and the example's
metadata such as `play`). Progress with ETA on stdout.
"""
import json
import os

from absl import app, flags

from t5like.train import eval_cli as common

TASK = flags.DEFINE_string('task', None, 'Registered task name.', required=True)
SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'validation', 'test'], 'Split to evaluate.')
DECODE = flags.DEFINE_enum('decode', 'greedy', ['greedy', 'beam'], 'Decoding method.')
NUM_BEAMS = flags.DEFINE_integer('num_beams', 4, 'Beams for --decode=beam.')
MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 0, 'Evaluate the first N examples; 0: all.')
RANK = flags.DEFINE_bool('rank_classification', False, 'Also classify by the log-likelihood of '
                         'each label (classification tasks).')
CONFIDENCE = flags.DEFINE_bool('confidence', False, '95% bootstrap confidence intervals.')
OUTPUT_DIR = flags.DEFINE_string('output_dir', '', 'Default: <workdir>/eval.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')

  def body():
    from t5like.train import evaluation
    pre, lengths, registry, _ = common.load()
    task = registry.get_task(TASK.value)
    res = evaluation.evaluate_task(
        pre.params, pre.cfg, pre.tokenizer, task, SPLIT.value, lengths=lengths,
        batch_size=common.BATCH_SIZE.value, method=DECODE.value, num_beams=NUM_BEAMS.value,
        max_examples=MAX_EXAMPLES.value, rank_classification=RANK.value,
        confidence=CONFIDENCE.value, print_fn=print)
    out_dir = OUTPUT_DIR.value or os.path.join(common.WORKDIR.value, 'eval')
    os.makedirs(out_dir, exist_ok=True)
    stem = f'{task.name}_{SPLIT.value}'
    preds = res.pop('predictions')
    res.update(model=pre.source, lengths=lengths, task_spec=task.describe())
    with open(os.path.join(out_dir, f'metrics_{stem}.json'), 'w') as f:
      json.dump(res, f, indent=2)
    evaluation.write_jsonl(os.path.join(out_dir, f'predictions_{stem}.jsonl'), preds)
    print(json.dumps({k: res[k] for k in ('task', 'split', 'examples', 'metrics', 'baselines')
                      if k in res}, indent=2))
    print(f'wrote {out_dir}/metrics_{stem}.json and predictions_{stem}.jsonl')
  common.run_main(body)


if __name__ == '__main__':
  app.run(main)
