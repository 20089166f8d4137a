"""The command-line surface shared by experiments/evaluate.py, predict.py and score.py: their common
absl flags, loading the model named by --workdir, and user errors as one line on stderr."""
import sys

from absl import flags, logging

from t5like.config import ConfigError
from t5like.data.tasks import MetricError, Registry, TaskError
from t5like.data.tokenizer import TokenizerError
from t5like.models.convert import ConversionError
from t5like.train import evaluation, init_from
from t5like.train.checkpoint import CheckpointError
from t5like.train.init_from import InitFromError

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


USER_ERRORS = (ConfigError, TaskError, MetricError, TokenizerError, ConversionError,
               CheckpointError, InitFromError)


def load():
  """(Pretrained, lengths, Registry, saved settings) of --workdir."""
  saved = evaluation.saved_settings(WORKDIR.value)
  pre = init_from.load_pretrained(WORKDIR.value, STEP.value)
  S = INPUTS_LENGTH.value or saved.get('inputs_length') or 128
  T = TARGETS_LENGTH.value or saved.get('targets_length') or 128
  lengths = {'encoder': S, 'decoder': T} if pre.cfg.is_encdec else {'decoder': S + T}
  files = list(dict.fromkeys(saved.get('task_files', []) + TASK_FILES.value))
  return pre, lengths, Registry(files), saved


def run_main(body):
  """Runs `body()`, turning a user error into one line on stderr and exit status 1."""
  logging.set_verbosity(logging.WARNING)
  try:
    body()
  except USER_ERRORS as e:
    print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
    sys.exit(1)
