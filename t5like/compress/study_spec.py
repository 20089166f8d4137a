"""What the compression study runs: its settings (`StudyConfig`) and its variants, each built by
one technique from a parent variant (t5like.compress.study builds, scores and reports them)."""
from __future__ import annotations

import dataclasses
import fnmatch

from t5like.config import ConfigError

FAMILIES = ('reference', 'distil', 'prune', 'dynamic', 'share', 'quant', 'combined')


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What the study runs (experiments/configs/compress_study.py sets it)."""
  task: str = 'folio_modernize'
  task_files: tuple[str, ...] = ()
  # The teacher: a fine-tuned workdir or bundle. '' fine-tunes one first, for `teacher_steps`,
  # from `teacher_init` (a pretrained workdir / bundle) or, if that is '' too, from a fresh
  # `teacher_model` with a tokenizer trained on the corpus (`tokenizer_vocab_size` pieces).
  teacher: str = ''
  teacher_step: str = 'best'
  teacher_init: str = ''
  teacher_model: str = 't5_tiny'
  teacher_steps: int = 300
  teacher_learning_rate: float = 1e-2
  tokenizer_vocab_size: int = 2000
  inputs_length: int = 64
  targets_length: int = 64
  batch_size: int = 32
  optimizer: str = 'adafactor'
  learning_rate: float = 1e-3           # every extra training stage
  finetune_steps: int = 60              # steps per training stage, the same for every variant
  sparsities: tuple[float, ...] = (0.3, 0.5, 0.7)
  nm_patterns: tuple[str, ...] = ('3:4', '2:4', '1:4')
  calibration_batches: int = 2          # Taylor and greedy scores
  student_layer_stride: int = 2
  student_ffn_fraction: float = 0.5
  distill_alpha: float = 0.5
  distill_temperature: float = 2.0
  share_groups: int = 1
  int4_group_size: int = 64
  combined_sparsity: float = 0.5
  test_examples: int = 256              # test pairs scored (evenly spaced over the split); 0: all
  eval_batch_size: int = 8
  validation_batches: int = 8
  timing_rounds: int = 3
  n_bootstrap: int = 1000
  serve: bool = True
  serve_requests: int = 16
  serve_max_tokens: int = 32
  serve_prompt_len: int = 16
  only: tuple[str, ...] = ()            # only these variants (names or globs, e.g. 'prune_*')
  build_budget_s: float = 0.0           # stop building new variants after this long (0: never);
                                        # the rest measure and report; a rerun builds the others
  seed: int = 0

  def __post_init__(self):
    for f in ('teacher_steps', 'finetune_steps', 'batch_size', 'eval_batch_size',
              'timing_rounds', 'inputs_length', 'targets_length',
              'student_layer_stride', 'calibration_batches'):
      if getattr(self, f) <= 0:
        raise ConfigError(f'study.{f} must be positive, got {getattr(self, f)}')
    if len(self.sparsities) != 3 or not all(0 < s < 1 for s in self.sparsities):
      raise ConfigError(f'study.sparsities must be three fractions in (0, 1), got {self.sparsities}')
    if not 0 < self.student_ffn_fraction < 1:
      raise ConfigError('study.student_ffn_fraction must be in (0, 1)')
    if isinstance(self.only, str) or isinstance(self.task_files, str):
      raise ConfigError('study.only and study.task_files must be sequences, not strings')


@dataclasses.dataclass(frozen=True)
class Variant:
  """One row of the study: built by `technique` with `options` from variant `parent`."""
  name: str
  family: str
  technique: str
  options: tuple = ()
  parent: str = 'teacher'
  label: str = ''

  def opt(self, key, default=None):
    return dict(self.options).get(key, default)


def variants(cfg: StudyConfig) -> list[Variant]:
  """Every variant of the study, parents before children."""
  V = Variant
  out = [V('teacher', 'reference', 'teacher', label='teacher f32'),
         V('control', 'reference', 'control', label='teacher + same extra steps')]
  for size in ('a', 'b'):
    for kind in ('soft', 'hard', 'sequence'):
      out.append(V(f'student_{size}_{kind}', 'distil', 'distil',
                   (('size', size), ('kind', kind)), label=f'student {size.upper()}, {kind}'))
  pct = lambda s: int(round(100 * s))
  for method in ('magnitude', 'structured', 'taylor', 'greedy'):
    for s in cfg.sparsities:
      out.append(V(f'prune_{method}_{pct(s)}', 'prune', 'prune',
                   (('method', method), ('sparsity', s)), label=f'{method} {pct(s)}%'))
  for nm in cfg.nm_patterns:
    n, m = (int(x) for x in nm.split(':'))
    out.append(V(f'prune_nm_{n}of{m}', 'prune', 'prune', (('method', 'magnitude'), ('nm', nm)),
                 label=f'N:M {nm}'))
  for s in cfg.sparsities:
    out.append(V(f'dynamic_ffn_{pct(s)}', 'dynamic', 'dynamic', (('sparsity', s),),
                 label=f'dynamic FFN top-k, {pct(s)}% off'))
  out += [V('share_layers', 'share', 'share', (('groups', cfg.share_groups),),
            label=f'{cfg.share_groups} shared layer group(s)'),
          V('tie_embeddings', 'share', 'tie', label='output layer tied to embedding'),
          V('int8', 'quant', 'quant', (('scheme', 'int8'),), label='int8 per channel'),
          V('int4', 'quant', 'quant', (('scheme', 'int4'),), label=f'int4 g{cfg.int4_group_size}'),
          V('int8_dynamic_act', 'quant', 'quant', (('scheme', 'int8'), ('act', 'dynamic')),
            label='int8 + dynamic int8 activations'),
          V('int4_qat', 'quant', 'quant', (('scheme', 'int4'), ('qat', True)),
            label='int4 after QAT'),
          V('student_a_pruned_int8', 'combined', 'prune_int8',
            (('sparsity', cfg.combined_sparsity),), parent='student_a_soft',
            label='distil -> structured prune -> int8'),
          V('student_a_int4_qat', 'combined', 'quant', (('scheme', 'int4'), ('qat', True)),
            parent='student_a_soft', label='distil -> int4 QAT')]
  return out


def selected(cfg: StudyConfig) -> list[Variant]:
  """The variants `cfg.only` selects, with every parent they need (the teacher always)."""
  all_v = variants(cfg)
  if not cfg.only:
    return all_v
  by_name = {v.name: v for v in all_v}
  want = {v.name for v in all_v
          if v.name == 'teacher' or any(fnmatch.fnmatchcase(v.name, o) for o in cfg.only)}
  if want == {'teacher'} and 'teacher' not in cfg.only:
    raise ConfigError(f'study.only={cfg.only} selects no variant; names: {sorted(by_name)}')
  for v in list(want):
    while by_name[v].parent in by_name and by_name[v].parent not in want:
      v = by_name[v].parent
      want.add(v)
  return [v for v in all_v if v.name in want]
