"""Task metrics: BLEU and chrF (sacrebleu), exact match, accuracy, macro-F1; confidence intervals,
paired significance and trivial baselines.

Every metric takes predictions and references (lists of strings, already postprocessed) and
returns a score in [0, 100]. BLEU and chrF are sacrebleu's corpus scores (default tokenisation and
settings, one reference). Their 95% confidence intervals are sacrebleu's bootstrap
(`n_bootstrap` resamples; reported as `low`/`high` = bootstrap mean -/+ sacrebleu's half-width);
the others use a percentile bootstrap over examples with the same number of resamples. Paired
significance (`paired_significance`) is sacrebleu's paired bootstrap test for BLEU / chrF and the
same test, written here, for the example-level metrics.
"""
from __future__ import annotations

import collections
from typing import Callable, Mapping, Sequence

import numpy as np
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu import significance

METRICS = ('bleu', 'chrf', 'exact_match', 'accuracy', 'macro_f1')
SACREBLEU_METRICS = ('bleu', 'chrf')
BOOTSTRAP_SEED = 12345  # sacrebleu's default seed for its own bootstrap


class MetricError(ValueError):
  """A metric name or its inputs are invalid; the message names them."""


def _check(preds: Sequence[str], refs: Sequence[str]) -> None:
  if len(preds) != len(refs):
    raise MetricError(f'{len(preds)} predictions for {len(refs)} references; they must pair up')
  if not refs:
    raise MetricError('no examples to score (empty predictions and references)')


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
  _check(preds, refs)
  return 100.0 * float(np.mean([p == r for p, r in zip(preds, refs)]))


def macro_f1(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None = None) -> float:
  """Unweighted mean over the reference labels (or `labels`) of each label's F1, in [0, 100]."""
  _check(preds, refs)
  labels = sorted(set(refs)) if labels is None else list(labels)
  f1s = []
  for lab in labels:
    tp = sum(p == lab and r == lab for p, r in zip(preds, refs))
    fp = sum(p == lab and r != lab for p, r in zip(preds, refs))
    fn = sum(p != lab and r == lab for p, r in zip(preds, refs))
    f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
  return 100.0 * float(np.mean(f1s))


def bleu(preds: Sequence[str], refs: Sequence[str]) -> float:
  _check(preds, refs)
  return float(BLEU().corpus_score(list(preds), [list(refs)]).score)


def chrf(preds: Sequence[str], refs: Sequence[str]) -> float:
  _check(preds, refs)
  return float(CHRF().corpus_score(list(preds), [list(refs)]).score)


_FNS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    'bleu': bleu, 'chrf': chrf, 'exact_match': exact_match, 'accuracy': exact_match,
    'macro_f1': macro_f1}


def check_metric_names(names: Sequence[str], where: str = 'metrics') -> None:
  bad = [n for n in names if n not in METRICS]
  if bad:
    raise MetricError(f'{where}: unknown metric(s) {bad}; choose from {list(METRICS)}')


def compute(names: Sequence[str], preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
  """{name: score} for each metric name."""
  check_metric_names(names)
  return {n: _FNS[n](preds, refs) for n in names}


def _sacrebleu_metric(name: str):
  return BLEU() if name == 'bleu' else CHRF()


def with_confidence(names: Sequence[str], preds: Sequence[str], refs: Sequence[str],
                    n_bootstrap: int = 1000) -> dict[str, dict[str, float]]:
  """{name: {'score', 'low', 'high'}}: the score and its 95% bootstrap interval."""
  check_metric_names(names)
  _check(preds, refs)
  out = {}
  for n in names:
    if n in SACREBLEU_METRICS:
      s = _sacrebleu_metric(n).corpus_score(list(preds), [list(refs)], n_bootstrap=n_bootstrap)
      out[n] = {'score': float(s.score), 'low': float(s._mean - s._ci),
                'high': float(s._mean + s._ci)}
    else:
      fn = _FNS[n]
      rng = np.random.default_rng(BOOTSTRAP_SEED)
      idx = rng.integers(0, len(refs), size=(n_bootstrap, len(refs)))
      samples = [fn([preds[i] for i in row], [refs[i] for i in row]) for row in idx]
      low, high = np.percentile(samples, [2.5, 97.5])
      out[n] = {'score': fn(preds, refs), 'low': float(low), 'high': float(high)}
  return out


def paired_significance(names: Sequence[str], system: Sequence[str], baseline: Sequence[str],
                        refs: Sequence[str], n_samples: int = 1000) -> dict[str, dict[str, float]]:
  """{name: {'p_value', 'delta'}}: paired bootstrap test of `system` against `baseline`.

  p is the probability, over resamples of the examples, that the difference is not in favour of
  the system (sacrebleu's `paired_bs` for BLEU / chrF; the same recipe for the others).
  """
  check_metric_names(names)
  _check(system, refs)
  _check(baseline, refs)
  out = {}
  sb = [n for n in names if n in SACREBLEU_METRICS]
  if sb:
    test = significance.PairedTest([('baseline', list(baseline)), ('system', list(system))],
                                   {n: _sacrebleu_metric(n) for n in sb}, [list(refs)],
                                   test_type='bs', n_samples=n_samples)
    _, results = test()
    scored = [v for k, v in results.items() if k != 'System']   # keyed 'BLEU', 'chrF2', in order
    for n, (base, sys_) in zip(sb, scored):
      out[n] = {'p_value': float(sys_.p_value), 'delta': float(sys_.score - base.score)}
  for n in names:
    if n in SACREBLEU_METRICS:
      continue
    fn = _FNS[n]
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, len(refs), size=(n_samples, len(refs)))
    delta = fn(system, refs) - fn(baseline, refs)
    # sacrebleu's recipe: centre the resampled differences, count those at least as large.
    diffs = np.array([fn([system[i] for i in r], [refs[i] for i in r])
                      - fn([baseline[i] for i in r], [refs[i] for i in r]) for r in idx])
    p = (np.sum(np.abs(diffs - diffs.mean()) >= abs(delta)) + 1) / (n_samples + 1)
    out[n] = {'p_value': float(p), 'delta': float(delta)}
  return out


def copy_baseline(inputs: Sequence[str]) -> list[str]:
  """Predictions of the copy baseline: the input itself."""
  return list(inputs)


def majority_baseline(train_targets: Sequence[str], n: int) -> list[str]:
  """`n` predictions of the most frequent training target (ties: the smallest string)."""
  if not train_targets:
    raise MetricError('majority baseline needs training targets; the training split is empty')
  counts = collections.Counter(train_targets)
  top = max(counts.values())
  return [min(t for t, c in counts.items() if c == top)] * n


def summarize(values: Mapping[str, float]) -> str:
  return ', '.join(f'{k} {v:.2f}' for k, v in values.items())
