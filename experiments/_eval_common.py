"""Flags and model loading shared by evaluate.py, predict.py and score.py (kept out of the library:
it is the command-line surface only)."""
import os
import sys

from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKDIR = flags.DEFINE_string('workdir', None, 'A t5like training workdir, an exported bundle or '
                              'a Hugging Face T5 folder (config.json + model.safetensors + '
                              'spiece.model).', required=True)
STEP = flags.DEFINE_string('step', 'latest', "Workdir checkpoint: 'latest', 'best' (by the run's "
                           "selection metric) or a step number.")
TASK_FILES = flags.DEFINE_multi_string('task_file', [], 'JSON task files registering tasks '
                                       '(the workdir\'s own are added).')
BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Examples per decoding / scoring batch.')
INPUTS_LENGTH = flags.DEFINE_integer('inputs_length', 0, 'Encoder length S; 0: the run\'s '
                                     'data.inputs_length, else 128.')
TARGETS_LENGTH = flags.DEFINE_integer('targets_length', 0, 'Decoder length T; 0: the run\'s '
                                      'data.targets_length, else 128.')


def user_errors():
  from t5like.config import ConfigError
  from t5like.data.tasks import MetricError, TaskError
  from t5like.data.tokenizer import TokenizerError
  from t5like.models.convert import ConversionError
  from t5like.train.checkpoint import CheckpointError
  from t5like.train.init_from import InitFromError
  return (ConfigError, TaskError, MetricError, TokenizerError, ConversionError, CheckpointError,
          InitFromError)


def load():
  """(Pretrained, lengths, Registry, saved settings) of --workdir."""
  from t5like.data.tasks import Registry
  from t5like.train import evaluation, init_from
  saved = evaluation.saved_settings(WORKDIR.value)
  pre = init_from.load_pretrained(WORKDIR.value, STEP.value)
  S = INPUTS_LENGTH.value or saved.get('inputs_length') or 128
  T = TARGETS_LENGTH.value or saved.get('targets_length') or 128
  lengths = {'encoder': S, 'decoder': T} if pre.cfg.is_encdec else {'decoder': S + T}
  files = list(dict.fromkeys(saved.get('task_files', []) + TASK_FILES.value))
  return pre, lengths, Registry(files), saved


def run_main(body):
  """Runs `body()`, turning a user error into one line on stderr and exit status 1."""
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  errors = user_errors()
  try:
    body()
  except errors as e:
    print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(1)
