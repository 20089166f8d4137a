"""The compression study as one command: distil, prune, quantise, share and their combinations on
one fine-tuned model, judged by task quality, bytes and speed in one report, each variant served.

  python experiments/compress_study.py --config=experiments/configs/compress_study.py:default
  python experiments/compress_study.py --config=...:full --teacher_workdir=runs/folio_pretrained

Writes <out>/results.json, report.md, quality_vs_bytes.png, quality_vs_speed.png, predictions/
and load_test/ (the variants' bundles under --workdir). Rerun the same command to resume.
"""
import dataclasses
import os
import shlex
import sys

from absl import app, flags, logging
from ml_collections import config_flags


from t5like import config as config_lib
from t5like.compress import study, study_spec
from t5like.serve import bundle

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
CONFIG = config_flags.DEFINE_config_file('config', None, 'Study config file (:default/full/tiny).')
OUT = flags.DEFINE_string('out', 'experiments/results/compress_study', 'Output folder.')
WORK = flags.DEFINE_string('workdir', 'runs/compress_study', 'Bundles of the variants, task cache '
                           'and tokenizer (large; not results).')
TEACHER = flags.DEFINE_string('teacher_workdir', '', 'A fine-tuned task workdir or bundle (the '
                              'teacher); empty: the config\'s (or one fine-tuned first).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  cfg = config_lib.from_dict(study_spec.StudyConfig, CONFIG.value.to_dict(), prefix='study')
  if TEACHER.value:
    cfg = dataclasses.replace(cfg, teacher=TEACHER.value)
  s = study.Study(cfg, OUT.value, WORK.value, save_fn=bundle.export_bundle,
                  command=' '.join(shlex.quote(a) for a in ['python'] + sys.argv))
  s.run(load_test_script=os.path.join(ROOT, 'scripts', 'load_test.py'))
  print(f'report: {os.path.join(OUT.value, "report.md")}')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
