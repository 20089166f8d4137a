"""Scores given targets for given inputs: log p(target | input) per example (T5X's score mode).

  python experiments/score.py --workdir=runs/folio_pretrained --input=pairs.jsonl \
      --output=scores.jsonl [--task=folio_modernize]

Each line of --input holds string fields `input` and `target` (--input_field, --target_field);
with --task the task's prefix is put before each input. The output has the same objects with
`log_likelihood` (natural log, summed over the target's tokens and EOS) and `target_tokens`.
"""
from absl import app, flags

from t5like.train import eval_cli as common

TASK = flags.DEFINE_string('task', '', 'Optional task whose preprocessing applies to the inputs.')
INPUT = flags.DEFINE_string('input', None, 'JSONL file of (input, target) pairs.', required=True)
OUTPUT = flags.DEFINE_string('output', None, 'JSONL file to write.', required=True)
INPUT_FIELD = flags.DEFINE_string('input_field', 'input', 'Field holding the input text.')
TARGET_FIELD = flags.DEFINE_string('target_field', 'target', 'Field holding the target text.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')

  def body():
    from t5like.train import evaluation
    records = evaluation.read_jsonl(INPUT.value, [INPUT_FIELD.value, TARGET_FIELD.value])
    pre, lengths, registry, _ = common.load()
    prep = registry.get_task(TASK.value).preprocess if TASK.value else (lambda s: s)
    inputs = [prep(r[INPUT_FIELD.value]) for r in records]
    targets = [r[TARGET_FIELD.value] for r in records]
    scores = evaluation.score(pre.params, pre.cfg, pre.tokenizer, inputs, targets,
                              lengths=lengths, batch_size=common.BATCH_SIZE.value, print_fn=print)
    n_tokens = [len(t) + 1 for t in pre.tokenizer.encode_batch(targets)]
    evaluation.write_jsonl(OUTPUT.value, [
        {**r, 'log_likelihood': float(s), 'target_tokens': n}
        for r, s, n in zip(records, scores, n_tokens)])
    print(f'wrote {len(records)} scores to {OUTPUT.value}')
  common.run_main(body)


if __name__ == '__main__':
  app.run(main)
