"""Predicts outputs for raw inputs with a task's preprocessing and postprocessing.

  python experiments/predict.py --workdir=runs/folio_pretrained --task=folio_modernize \
      --input=in.jsonl --output=out.jsonl [--decode=beam]

Each line of --input is a JSON object with a string field `input` (--input_field); the output has
the same objects with `prediction` added.
"""
from absl import app, flags

from t5like.train import eval_cli as common

TASK = flags.DEFINE_string('task', None, 'Registered task name (its prefix and postprocessing).',
                           required=True)
INPUT = flags.DEFINE_string('input', None, 'JSONL file of inputs.', required=True)
OUTPUT = flags.DEFINE_string('output', None, 'JSONL file to write.', required=True)
INPUT_FIELD = flags.DEFINE_string('input_field', 'input', 'Field holding the raw input text.')
DECODE = flags.DEFINE_enum('decode', 'greedy', ['greedy', 'beam'], 'Decoding method.')
NUM_BEAMS = flags.DEFINE_integer('num_beams', 4, 'Beams for --decode=beam.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')

  def body():
    from t5like.train import evaluation
    records = evaluation.read_jsonl(INPUT.value, [INPUT_FIELD.value])
    pre, lengths, registry, _ = common.load()
    task = registry.get_task(TASK.value)
    texts = [task.preprocess(r[INPUT_FIELD.value]) for r in records]
    preds = evaluation.generate(
        pre.params, pre.cfg, pre.tokenizer, texts,
        max_input_length=lengths.get('encoder', lengths['decoder']),
        max_decode_length=common.TARGETS_LENGTH.value or lengths['decoder'],
        batch_size=common.BATCH_SIZE.value, method=DECODE.value, num_beams=NUM_BEAMS.value,
        print_fn=print)
    evaluation.write_jsonl(OUTPUT.value, [{**r, 'prediction': task.postprocess_text(p)}
                                          for r, p in zip(records, preds)])
    print(f'wrote {len(records)} predictions to {OUTPUT.value}')
  common.run_main(body)


if __name__ == '__main__':
  app.run(main)
