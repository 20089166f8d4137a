"""Frozen configuration dataclasses and the table of model variants.

The library only takes these dataclasses. Experiment files (ml_collections) are converted once, at
the entry point, through `from_dict`, which rejects unknown keys by name.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Mapping

from t5like import precision


class ConfigError(ValueError):
  """A configuration value or key is invalid; the message names it."""


def _check_choice(name: str, value: Any, choices: tuple) -> None:
  if value not in choices:
    raise ConfigError(f'{name}={value!r} is not valid; choose one of {list(choices)}')


QUANT_WEIGHTS = ('none', 'int8', 'int4')
QUANT_ACTIVATIONS = ('none', 'dynamic', 'static')
QUANT_GROUP_SIZES = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Quantisation of a model's layers (t5like/models/quant.py picks the layers from it).

  weights: the scheme the parameters are stored in ('none', 'int8' per output channel, 'int4'
  per `group_size` contraction elements; compress/quantize.py converts float params);
  activations: 'none', 'dynamic' (each token's row to int8 at run time, integer matmuls) or
  'static' (calibrated input scales stored with quantised weights); qat: fake quantisation
  (straight-through estimator) of float weights in training: 'none', 'int8', 'int4'.
  """
  weights: str = 'none'
  group_size: int = 128
  activations: str = 'none'
  qat: str = 'none'

  def __post_init__(self):
    _check_choice('model.quant.weights', self.weights, QUANT_WEIGHTS)
    _check_choice('model.quant.activations', self.activations, QUANT_ACTIVATIONS)
    _check_choice('model.quant.qat', self.qat, QUANT_WEIGHTS)
    if self.group_size <= 0:
      raise ConfigError(f'model.quant.group_size must be positive, got {self.group_size}')

  @property
  def active(self) -> bool:
    """Whether any quantisation is on (else the model is a float model)."""
    return (self.weights, self.activations, self.qat) != ('none', 'none', 'none')


# The flat ModelConfig fields QuantConfig replaced: still read from saved configs and accepted by
# `from_dict` / `ModelConfig.replace`, mapped to `quant`.
_LEGACY_QUANT_KEYS = {'weight_quant': 'weights', 'weight_quant_group_size': 'group_size',
                      'activation_quant': 'activations', 'qat': 'qat'}


def _map_legacy_quant(values: Mapping[str, Any], prefix: str = 'model',
                      base: QuantConfig | None = None) -> dict:
  """`values` with old flat quantisation keys moved into `quant` (over `base`, if given; an error
  names a clash with a `quant` given alongside)."""
  legacy = {k: v for k, v in values.items() if k in _LEGACY_QUANT_KEYS}
  if not legacy:
    return dict(values)
  out = {k: v for k, v in values.items() if k not in legacy}
  quant = out.get('quant', base or {})
  quant = dataclasses.asdict(quant) if isinstance(quant, QuantConfig) else dict(quant)
  for old, value in legacy.items():
    new = _LEGACY_QUANT_KEYS[old]
    if 'quant' in values and new in quant and quant[new] != value:
      raise ConfigError(f'{prefix}.{old}={value!r} (an old name of {prefix}.quant.{new}) '
                        f'conflicts with {prefix}.quant.{new}={quant[new]!r}; keep only quant')
    quant[new] = value
  out['quant'] = quant
  return out


ARCHS = ('encdec', 'decoder')
FFN_ACTIVATIONS = ('relu', 'gated-gelu', 'gelu', 'swiglu')
POSITIONS = ('relative', 'rope')
PRECISIONS = tuple(precision.POLICIES)
REMAT_POLICIES = ('none', 'full', 'dots', 'dots_with_no_batch_dims',
                  'save_nothing_but_params')           # t5like.models.layers.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of one model. `arch` is 'encdec' (T5) or 'decoder' (decoder-only)."""
  name: str = 'custom'
  arch: str = 'encdec'
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  head_dim: int = 64
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  ffn_activation: str = 'relu'          # 'relu' (T5 1.0) or 'gated-gelu' (T5 1.1)
  tie_embeddings: bool = True           # 1.0: logits = h @ E^T * d_model**-0.5
  position: str = 'relative'            # 'relative' (T5 buckets) or 'rope' (decoder-only)
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  rope_max_wavelength: float = 10_000.0
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  precision: str = 'f32'                # one of PRECISIONS (t5like.precision.POLICIES)
  remat_policy: str = 'none'            # see t5like.models.layers.REMAT_POLICIES
  # Cross-layer parameter sharing (ALBERT): layers are split into this many groups of consecutive
  # layers; each group shares one set of weights. 0 means no sharing.
  shared_layer_groups: int = 0
  quant: QuantConfig = QuantConfig()     # stored / run-time / fake quantisation
  pad_id: int = 0
  eos_id: int = 1
  decoder_start_id: int = 0

  def __post_init__(self):
    _check_choice('model.arch', self.arch, ARCHS)
    _check_choice('model.ffn_activation', self.ffn_activation, FFN_ACTIVATIONS)
    _check_choice('model.position', self.position, POSITIONS)
    if not isinstance(self.quant, QuantConfig):
      raise ConfigError(f'model.quant must be a QuantConfig, got {type(self.quant).__name__}')
    _check_choice('model.precision', self.precision, PRECISIONS)
    _check_choice('model.remat_policy', self.remat_policy, REMAT_POLICIES)
    for f in ('vocab_size', 'd_model', 'num_heads', 'head_dim', 'd_ff'):
      if getattr(self, f) <= 0:
        raise ConfigError(f'model.{f} must be positive, got {getattr(self, f)}')
    if self.arch == 'encdec' and self.num_encoder_layers <= 0:
      raise ConfigError('model.num_encoder_layers must be positive for arch=encdec')
    if self.num_decoder_layers <= 0:
      raise ConfigError('model.num_decoder_layers must be positive')
    if self.position == 'rope' and self.arch != 'decoder':
      raise ConfigError("model.position='rope' is only supported for arch='decoder'")
    if self.position == 'rope' and self.head_dim % 2:
      raise ConfigError(f'model.head_dim must be even for RoPE, got {self.head_dim}')
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ConfigError(f'model.dropout_rate must be in [0, 1), got {self.dropout_rate}')
    if self.shared_layer_groups < 0:
      raise ConfigError('model.shared_layer_groups must be >= 0')
    for n in ([self.num_encoder_layers] if self.arch == 'encdec' else []) + [self.num_decoder_layers]:
      if self.shared_layer_groups and n % self.shared_layer_groups:
        raise ConfigError(f'model.shared_layer_groups={self.shared_layer_groups} must divide the '
                          f'number of layers ({n})')

  @property
  def is_encdec(self) -> bool:
    return self.arch == 'encdec'

  def replace(self, **kw) -> 'ModelConfig':
    if any(k in _LEGACY_QUANT_KEYS for k in kw):
      kw = _map_legacy_quant(kw, base=self.quant)
      kw['quant'] = QuantConfig(**kw['quant'])
    return dataclasses.replace(self, **kw)

  def with_quant(self, **kw) -> 'ModelConfig':
    """This config with QuantConfig fields replaced (weights=, group_size=, activations=, qat=)."""
    return dataclasses.replace(self, quant=dataclasses.replace(self.quant, **kw))


_T5_1_0 = dict(ffn_activation='relu', tie_embeddings=True, vocab_size=32128, dropout_rate=0.1)
_T5_1_1 = dict(ffn_activation='gated-gelu', tie_embeddings=False, vocab_size=32128, dropout_rate=0.0)
_DEC = dict(arch='decoder', ffn_activation='gated-gelu', tie_embeddings=False, position='rope',
            num_encoder_layers=0, dropout_rate=0.0, vocab_size=32128)


def _row(d_model, num_heads, head_dim, d_ff, layers, **kw):
  return dict(d_model=d_model, num_heads=num_heads, head_dim=head_dim, d_ff=d_ff,
              num_encoder_layers=layers, num_decoder_layers=layers, **kw)


# One row per published T5 / T5 1.1 size (their parameter counts are checked by the tests).
VARIANTS: dict[str, dict[str, Any]] = {
    't5_tiny': _row(64, 4, 16, 128, 2, ffn_activation='relu', tie_embeddings=True, vocab_size=512,
                    dropout_rate=0.0),
    't5_1_1_tiny': _row(64, 4, 16, 128, 2, ffn_activation='gated-gelu', tie_embeddings=False,
                        vocab_size=512, dropout_rate=0.0),
    't5_small': _row(512, 8, 64, 2048, 6, **_T5_1_0),
    't5_base': _row(768, 12, 64, 3072, 12, **_T5_1_0),
    't5_large': _row(1024, 16, 64, 4096, 24, **_T5_1_0),
    't5_3b': _row(1024, 32, 128, 16384, 24, **_T5_1_0),
    't5_11b': _row(1024, 128, 128, 65536, 24, **_T5_1_0),
    't5_1_1_small': _row(512, 6, 64, 1024, 8, **_T5_1_1),
    't5_1_1_base': _row(768, 12, 64, 2048, 12, **_T5_1_1),
    't5_1_1_large': _row(1024, 16, 64, 2816, 24, **_T5_1_1),
    't5_1_1_xl': _row(2048, 32, 64, 5120, 24, **_T5_1_1),
    't5_1_1_xxl': _row(4096, 64, 64, 10240, 24, **_T5_1_1),
    'decoder_tiny': dict(d_model=64, num_heads=4, head_dim=16, d_ff=128, num_decoder_layers=2,
                         **{**_DEC, 'vocab_size': 512}),
    'decoder_small': dict(d_model=512, num_heads=8, head_dim=64, d_ff=1408, num_decoder_layers=8, **_DEC),
    'decoder_base': dict(d_model=768, num_heads=12, head_dim=64, d_ff=2048, num_decoder_layers=12,
                         **_DEC),
    'decoder_large': dict(d_model=1536, num_heads=16, head_dim=96, d_ff=4096, num_decoder_layers=24,
                          **_DEC),
}


def get_variant(name: str, **overrides) -> ModelConfig:
  """The ModelConfig of a named variant, with optional field overrides."""
  if name not in VARIANTS:
    raise ConfigError(f'unknown model variant {name!r}; known variants: {sorted(VARIANTS)}')
  return from_dict(ModelConfig, {**VARIANTS[name], 'name': name, **overrides}, prefix='model')


def from_dict(cls, values: Mapping[str, Any], prefix: str = ''):
  """Builds dataclass `cls` from a mapping, recursing into nested dataclasses.

  Unknown keys are errors that name the key and list the valid ones; values are coerced to the
  annotated scalar type (an int where a float is expected, a list where a tuple is).
  """
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  kwargs = {}
  if cls is ModelConfig:
    values = _map_legacy_quant(values, prefix or 'model')
  for key, value in values.items():
    where = f'{prefix}.{key}' if prefix else key
    if key not in fields:
      raise ConfigError(f'unknown config key {where!r}; valid keys here: {sorted(fields)}')
    kwargs[key] = _coerce(hints[key], value, where)
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ConfigError(f'{prefix or cls.__name__}: {e}') from None


def _coerce(hint, value, where):
  origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    if isinstance(value, hint):
      return value
    if not isinstance(value, Mapping):
      raise ConfigError(f'{where} must be a mapping, got {type(value).__name__}')
    return from_dict(hint, value, prefix=where)
  if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
      return None
    return _coerce(args[0], value, where) if len(args) == 1 else value
  if hint is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if origin is tuple:
    if isinstance(value, str) or not hasattr(value, '__iter__'):
      raise ConfigError(f'{where} must be a sequence, got {value!r}')
    return tuple(value)
  if hint in (int, float, str, bool) and not isinstance(value, hint):
    raise ConfigError(f'{where} must be {hint.__name__}, got {type(value).__name__} {value!r}')
  if hint is int and isinstance(value, bool):
    raise ConfigError(f'{where} must be int, got bool')
  return value


def to_dict(cfg) -> dict:
  return dataclasses.asdict(cfg)


OBJECTIVES = ('span_corruption', 'prefix_lm', 'causal_lm')
ON_BAD_FILE = ('error', 'skip')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Corpus, tokenizer, objective, augmentation and batching (owned by t5like/data)."""
  corpus: str = 'shakespeare'           # 'shakespeare', a folder of .txt, a .txt file or a .jsonl
  text_field: str = 'text'              # JSONL field holding the text
  on_bad_file: str = 'error'            # 'error' or 'skip' for unreadable / undecodable files
  validation_fraction: float = 0.1
  split_seed: int = 0
  tokenizer: str = ''                   # path of an existing spiece.model; '' trains one
  tokenizer_max_sentences: int = 200_000  # lines sampled (seeded) to train the tokenizer
  vocab_size: int = 8000                # SentencePiece pieces; the 100 sentinels are appended
  objective: str = 'span_corruption'    # 'span_corruption', 'prefix_lm', 'causal_lm'
  noise_density: float = 0.15
  mean_noise_span_length: float = 3.0
  inputs_length: int = 128
  targets_length: int = 0               # 0: derived (span corruption: T5's random_spans_helper;
                                        # LM objectives: inputs_length)
  pack: bool = True
  batch_size: int = 32                  # global batch
  shuffle_seed: int = 0
  # Augmentation probabilities (training split only).
  mask_prob: float = 0.0
  delete_prob: float = 0.0
  reorder_prob: float = 0.0
  reorder_window: int = 3
  swap_prob: float = 0.0                # adjacent words
  clause_swap_prob: float = 0.0         # adjacent clauses within a sentence
  drop_function_word_prob: float = 0.0
  augment_seed: int = 0
  num_workers: int = 0

  def __post_init__(self):
    _check_choice('data.on_bad_file', self.on_bad_file, ON_BAD_FILE)
    _check_choice('data.objective', self.objective, OBJECTIVES)
    if not 0.0 < self.validation_fraction < 1.0:
      raise ConfigError(f'data.validation_fraction must be in (0, 1), got {self.validation_fraction}')
    for f in ('inputs_length', 'batch_size', 'tokenizer_max_sentences', 'reorder_window'):
      if getattr(self, f) <= 0:
        raise ConfigError(f'data.{f} must be positive, got {getattr(self, f)}')
    for f in ('targets_length', 'num_workers'):
      if getattr(self, f) < 0:
        raise ConfigError(f'data.{f} must be >= 0, got {getattr(self, f)}')
    if self.vocab_size < 260:
      raise ConfigError(f'data.vocab_size must be >= 260 (3 specials + 256 byte pieces + 1), '
                        f'got {self.vocab_size}')
    if not 0.0 < self.noise_density < 1.0 or self.mean_noise_span_length < 1.0:
      raise ConfigError('data.noise_density must be in (0, 1) and data.mean_noise_span_length '
                        f'>= 1, got {self.noise_density}, {self.mean_noise_span_length}')
    for f in ('mask_prob', 'delete_prob', 'reorder_prob', 'swap_prob', 'clause_swap_prob',
              'drop_function_word_prob'):
      if not 0.0 <= getattr(self, f) <= 1.0:
        raise ConfigError(f'data.{f} must be a probability in [0, 1], got {getattr(self, f)}')


OPTIMIZER_NAMES = ('sgd', 'adam', 'adamw', 'lars', 'lamb', 'adafactor', 'agd')
SCHEDULE_NAMES = ('constant', 'linear', 'cosine', 'exponential', 'rsqrt', 'wsd')


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer, schedule and clipping (owned by t5like/optim)."""
  name: str = 'adamw'
  learning_rate: float = 1e-3
  schedule: str = 'cosine'
  warmup_steps: int = 100
  decay_steps: int = 0                  # 0: the run's total steps
  end_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.01
  momentum: float = 0.9
  nesterov: bool = False
  clip_grad_norm: float = 1.0           # 0 disables clipping
  # Decoupled weight decay skips every parameter whose '/'-joined path matches one of these regexes
  # (re.search): norm scales and T5's relative position bias by default.
  weight_decay_exclude: tuple[str, ...] = ('norm', 'scale$', 'rel_embedding')
  mu_dtype: str = ''                    # first-moment dtype: '' (as params), 'float32', 'bfloat16'
  lars_trust_coefficient: float = 0.001
  agd_delta: float = 1e-5
  agd_amsgrad: bool = False
  agd_clip: float = 0.0                 # 0: no clip of the AGD update
  adafactor_decay_rate: float = 0.8     # T5's Adafactor settings
  adafactor_clipping_threshold: float = 1.0
  adafactor_multiply_by_parameter_scale: bool = True
  adafactor_factored: bool = True
  wsd_decay_fraction: float = 0.1       # 'wsd': fraction of the horizon spent decaying
  # Reduce-on-plateau of the validation loss (t5like.optim.adaptive.observe_validation).
  plateau: bool = False
  plateau_factor: float = 0.5
  plateau_patience: int = 3             # evaluations without improvement before reducing
  plateau_rtol: float = 1e-4
  plateau_atol: float = 0.0
  plateau_cooldown: int = 0
  plateau_min_scale: float = 0.0
  # Gradient-norm statistics (EMA mean / variance of the global norm before clipping).
  grad_stats_decay: float = 0.99
  grad_lr_scaling: str = 'none'         # 'none', 'cv' (1/(1+s*std/mean)), 'ratio' (mean/norm)
  grad_lr_strength: float = 1.0
  grad_lr_min_scale: float = 0.1
  spike_k: float = 0.0                  # skip updates with norm > mean + k*std; 0 disables
  spike_min_steps: int = 20             # statistics burn-in before any skip

  def __post_init__(self):
    _check_choice('optim.name', self.name, OPTIMIZER_NAMES)
    _check_choice('optim.schedule', self.schedule, SCHEDULE_NAMES)
    _check_choice('optim.mu_dtype', self.mu_dtype, ('', 'float32', 'bfloat16'))
    _check_choice('optim.grad_lr_scaling', self.grad_lr_scaling, ('none', 'cv', 'ratio'))
    for f in ('warmup_steps', 'decay_steps', 'plateau_patience', 'plateau_cooldown',
              'spike_min_steps'):
      if getattr(self, f) < 0:
        raise ConfigError(f'optim.{f} must be >= 0, got {getattr(self, f)}')
    for f in ('learning_rate', 'weight_decay', 'clip_grad_norm', 'agd_clip', 'spike_k'):
      if getattr(self, f) < 0:
        raise ConfigError(f'optim.{f} must be >= 0, got {getattr(self, f)}')
    for f in ('b1', 'b2', 'momentum', 'grad_stats_decay'):
      if not 0.0 <= getattr(self, f) < 1.0:
        raise ConfigError(f'optim.{f} must be in [0, 1), got {getattr(self, f)}')
    for f in ('end_lr_fraction', 'wsd_decay_fraction', 'grad_lr_min_scale', 'plateau_min_scale'):
      if not 0.0 <= getattr(self, f) <= 1.0:
        raise ConfigError(f'optim.{f} must be in [0, 1], got {getattr(self, f)}')
    if self.plateau and not 0.0 < self.plateau_factor < 1.0:
      raise ConfigError(f'optim.plateau_factor must be in (0, 1), got {self.plateau_factor}')
    if isinstance(self.weight_decay_exclude, str):
      raise ConfigError('optim.weight_decay_exclude must be a sequence of regexes, got the string '
                        f'{self.weight_decay_exclude!r}; write ({self.weight_decay_exclude!r},)')



@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (t5like/parallel/mesh.py) and pipeline schedule (t5like/parallel/pipeline.py).

  data / fsdp / tensor / stage are the axis sizes within one slice (ICI); at most one is -1, filled
  from the devices per slice. dcn_* split the same axes across slices (DCN, multi-slice jobs, as
  MaxText's ici_* / dcn_*): mesh axis 'data' has data * dcn_data devices, and so on.
  """
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  stage: int = 1
  dcn_data: int = 1
  dcn_fsdp: int = 1
  dcn_tensor: int = 1
  dcn_stage: int = 1
  rules: str = 'dp'                     # a preset of t5like.parallel.mesh.RULES
  num_microbatches: int = 0             # pipeline microbatches; 0: 2 x stages
  pipeline_repeats: int = 1             # circular pipeline: layer chunks per stage; 1: GPipe

  def __post_init__(self):
    for f in ('data', 'fsdp', 'tensor', 'stage'):
      if getattr(self, f) == 0 or getattr(self, f) < -1:
        raise ConfigError(f'mesh.{f} must be positive or -1 (fill from devices), got '
                          f'{getattr(self, f)}')
    for f in ('dcn_data', 'dcn_fsdp', 'dcn_tensor', 'dcn_stage', 'pipeline_repeats'):
      if getattr(self, f) <= 0:
        raise ConfigError(f'mesh.{f} must be positive, got {getattr(self, f)}')
    if self.num_microbatches < 0:
      raise ConfigError(f'mesh.num_microbatches must be >= 0 (0: 2 x stages), got '
                        f'{self.num_microbatches}')


@dataclasses.dataclass(frozen=True)
class TaskConfig:
  """Training on a text-to-text task (t5like/data/tasks) and its evaluation during training.

  With `name` set, the run trains on that task (or mixture) instead of `data.corpus`'s objective;
  examples longer than data.inputs_length / data.targets_length (0: inputs_length) are dropped or
  truncated by `length_policy`, counted and logged. Every `eval_every` steps the first task's
  `eval_split` (its first `eval_examples`; 0: all) is decoded and scored with the task's metrics;
  with `best_metric` (e.g. 'chrf'; higher is better) the best checkpoints are kept by it.
  """
  name: str = ''
  files: tuple[str, ...] = ()           # JSON task files registering more tasks and mixtures
  length_policy: str = 'drop'           # 'drop' or 'truncate'
  eval_split: str = 'validation'
  eval_examples: int = 256
  decode: str = 'greedy'                # 'greedy' or 'beam'
  num_beams: int = 4
  best_metric: str = ''                 # '' keeps the best checkpoints by validation loss

  def __post_init__(self):
    _check_choice('task.length_policy', self.length_policy, ('drop', 'truncate'))
    _check_choice('task.eval_split', self.eval_split, ('train', 'validation', 'test'))
    _check_choice('task.decode', self.decode, ('greedy', 'beam'))
    if self.eval_examples < 0 or self.num_beams < 1:
      raise ConfigError(f'task.eval_examples must be >= 0 and task.num_beams >= 1, got '
                        f'{self.eval_examples}, {self.num_beams}')
    if isinstance(self.files, str):
      raise ConfigError(f'task.files must be a sequence of paths, got the string {self.files!r}')
    if self.best_metric and not self.name:
      raise ConfigError('task.best_metric needs task.name (a task whose metrics include it)')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """One experiment: what to build, what to train it on, how and for how long."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  task: TaskConfig = TaskConfig()
  # Start from pretrained parameters (t5like/train/init_from.py): a t5like workdir, an exported
  # bundle or a Hugging Face T5 folder; its tokenizer replaces data.tokenizer. Optimiser state is
  # fresh. init_step: 'latest', 'best' or a step (workdirs); init_partial: '' (every parameter) or
  # 'encoder' (encoder and embedding only); init_architecture: the model's shapes come from
  # init_from (dropout, precision and remat from this config) rather than from `model`.
  init_from: str = ''
  init_step: str = 'latest'
  init_partial: str = ''
  init_architecture: bool = True
  num_steps: int = 1000
  grad_accum_steps: int = 1
  seed: int = 0
  log_every: int = 10
  eval_every: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 3
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  keep_best_checkpoints: int = 1        # also keep this many lowest-validation-loss checkpoints
  async_checkpointing: bool = True
  vocab_from_tokenizer: bool = True     # model.vocab_size := the tokenizer's (rounded to 128)
  num_samples: int = 3                  # sampled continuations printed at the end
  sample_tokens: int = 32               # new tokens per sampled continuation
  sample_temperature: float = 0.8
  sample_top_k: int = 40

  def __post_init__(self):
    for f in ('num_steps', 'grad_accum_steps', 'log_every', 'eval_every', 'checkpoint_every',
              'keep_checkpoints', 'sample_tokens'):
      if getattr(self, f) <= 0:
        raise ConfigError(f'{f} must be positive, got {getattr(self, f)}')
    for f in ('eval_batches', 'keep_best_checkpoints', 'num_samples', 'sample_top_k'):
      if getattr(self, f) < 0:
        raise ConfigError(f'{f} must be >= 0, got {getattr(self, f)}')
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ConfigError(f'label_smoothing must be in [0, 1), got {self.label_smoothing}')
    if self.z_loss < 0 or self.sample_temperature < 0:
      raise ConfigError(f'z_loss and sample_temperature must be >= 0, got {self.z_loss}, '
                        f'{self.sample_temperature}')
    if self.data.batch_size % self.grad_accum_steps:
      raise ConfigError(f'grad_accum_steps={self.grad_accum_steps} must divide data.batch_size='
                        f'{self.data.batch_size}')
    _check_choice('init_partial', self.init_partial, ('', 'encoder'))
    if self.init_partial and self.init_architecture:
      raise ConfigError("init_partial='encoder' loads into this config's model: set "
                        'init_architecture=False')


PRUNE_METHODS = ('magnitude', 'structured', 'taylor', 'snip', 'greedy')
# Every projection kernel of the layer stacks (t5like/compress/prune.py names parameters by path).
PRUNE_DEFAULT_INCLUDE = (r'/stack/layers/layer/.*/kernel$',)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """What to prune, how, and (for gradual pruning in training) when (t5like/compress/prune.py).

  method: 'magnitude' (unstructured |w| / w^2), 'structured' (per head / neuron norm), 'taylor'
  (|w*g| over calibration batches), 'snip' (|w * mean g|), 'greedy' (one-shot, units, by loss).
  `structured_gradients` makes 'taylor' / 'snip' score units instead of single weights.
  """
  method: str = 'magnitude'
  norm: str = 'l1'                      # 'l1' or 'l2' (magnitude and structured scores)
  sparsity: float = 0.5                 # final fraction of prunable weights removed
  scope: str = 'layer'                  # 'layer': each parameter (and stacked layer) alone;
                                        # 'global': one ranking over all prunable parameters
  nm: str = ''                          # e.g. '2:4': keep N of every M along the input dim
  units: str = 'both'                   # structured: 'heads', 'neurons' or 'both'
  tie_relpos_heads: bool = True         # structured: self-attention heads of a stack that shares
                                        # one relative-bias table are kept/removed in all layers
  structured_gradients: bool = False
  greedy_neuron_group: int = 0          # greedy: FFN neurons per unit; 0: as many weights as a head
  include: tuple[str, ...] = PRUNE_DEFAULT_INCLUDE
  exclude: tuple[str, ...] = ()
  # Gradual pruning (Zhu & Gupta's schedule): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0))^power,
  # masks recomputed every `update_every` steps in [begin_step, end_step], then frozen.
  initial_sparsity: float = 0.0
  begin_step: int = 0
  end_step: int = 1000
  update_every: int = 100
  power: float = 3.0

  def __post_init__(self):
    _check_choice('prune.method', self.method, PRUNE_METHODS)
    _check_choice('prune.norm', self.norm, ('l1', 'l2'))
    _check_choice('prune.scope', self.scope, ('layer', 'global'))
    _check_choice('prune.units', self.units, ('heads', 'neurons', 'both'))
    for f in ('sparsity', 'initial_sparsity'):
      if not 0.0 <= getattr(self, f) < 1.0:
        raise ConfigError(f'prune.{f} must be in [0, 1), got {getattr(self, f)}')
    if self.nm:
      parse_nm(self.nm)
    if self.update_every <= 0 or self.begin_step < 0 or self.end_step < self.begin_step:
      raise ConfigError('prune: need update_every > 0 and 0 <= begin_step <= end_step, got '
                        f'{self.update_every}, {self.begin_step}, {self.end_step}')
    if self.greedy_neuron_group < 0:
      raise ConfigError('prune.greedy_neuron_group must be >= 0')
    for f in ('include', 'exclude'):
      if isinstance(getattr(self, f), str):
        raise ConfigError(f'prune.{f} must be a sequence of regexes, not a string')
      for p in getattr(self, f):
        try:
          re.compile(p)
        except re.error as e:
          raise ConfigError(f'prune.{f}: invalid regex {p!r}: {e}') from None


def parse_nm(nm: str) -> tuple[int, int]:
  """(N, M) of an 'N:M' sparsity pattern (keep N of every M)."""
  try:
    n, m = (int(v) for v in nm.split(':'))
  except ValueError:
    raise ConfigError(f"prune.nm={nm!r} is not 'N:M' (e.g. '2:4')") from None
  if not 0 < n < m:
    raise ConfigError(f'prune.nm={nm!r} needs 0 < N < M')
  return n, m


DISTILL_KINDS = ('soft', 'hard', 'sequence')


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """How the student learns from the teacher (t5like/compress/distill.py)."""
  kind: str = 'soft'              # 'soft', 'hard' or 'sequence'
  alpha: float = 0.5              # weight of the distillation loss; 1 - alpha on the data loss
  temperature: float = 2.0        # 'soft' only

  def __post_init__(self):
    _check_choice('distill.kind', self.kind, DISTILL_KINDS)
    if not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f'distill.alpha must be in [0, 1], got {self.alpha}')
    if self.temperature <= 0:
      raise ConfigError(f'distill.temperature must be positive, got {self.temperature}')
