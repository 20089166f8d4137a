"""Training metrics: JSONL + TensorBoard writer, progress line with ETA, curves PNG, peak FLOP/s.

- `MetricsWriter(workdir)`: one JSON object per line in `<workdir>/metrics.jsonl`
  (`{"step": ..., "split": "train" | "eval", ...}`) and TensorBoard event files under
  `<workdir>/tensorboard/` (tensorboardX: no TensorFlow). Resuming at step s drops JSONL records
  beyond s (written after the checkpoint the run resumes from), so the file has each step once.
  The workdir may be a cloud URI (`gs://bucket/run`, through etils.epath; an object cannot be
  appended to, so there the file is rewritten whole at each write, and TensorBoard's event files
  are uploaded whole at each flush). In a multi-process job only process 0 writes (the others'
  writers are disabled), so a shared workdir has one metrics file and one set of event files.
- `ProgressLine`: 'step 120/600 [20%] loss 3.214 lr 1.0e-03 | 2.3k tok/s MFU 31.0% | 1m02s
  elapsed, ETA 4m08s'.
- `plot_curves(jsonl, png)`: training and validation loss, learning rate and throughput vs step
  (matplotlib, Agg backend).
- `measure_peak_flops()`: the f32 matmul FLOP/s this machine reaches now (the MFU denominator).
- `check_finite(step, metrics)`: raises `NonFiniteLossError` naming the step.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from t5like import paths

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'
PLOT_FILE = 'curves.png'


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite; the message names the step."""


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
  loss = float(metrics['loss'])
  if not math.isfinite(loss):
    raise NonFiniteLossError(
        f'training loss is {loss} at step {step} (grad norm {float(metrics.get("grad_norm", "nan"))}'
        '); the run was stopped. Lower optim.learning_rate, enable optim.clip_grad_norm, or use '
        'model.precision=f32; the last good checkpoint is kept')


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
  out = {}
  for k, v in metrics.items():
    v = np.asarray(v)
    if v.ndim == 0 and np.issubdtype(v.dtype, np.number):
      out[k] = v.item()
  return out


class _EpathRecordWriter:
  """A tensorboardX event file on cloud storage through epath: the bytes are kept and the whole
  object is uploaded at each flush (object stores cannot append), as tensorboardX's own GCS
  writer does, but through the same filesystem layer as every other workdir file."""

  def __init__(self, path: str):
    self._path, self._buffer = epath.Path(path), bytearray()

  def write(self, data: bytes) -> None:
    self._buffer += data

  def flush(self) -> None:
    self._path.write_bytes(bytes(self._buffer))

  def close(self) -> None:
    self.flush()


class _EpathWriterFactory:
  def open(self, path: str) -> _EpathRecordWriter:
    return _EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_tensorboard_gcs() -> None:
  from tensorboardX import record_writer
  record_writer.register_writer_factory('gs', _EpathWriterFactory())


class MetricsWriter:
  """Appends metrics to `<workdir>/metrics.jsonl` and TensorBoard events (process 0 only, unless
  `enabled` says otherwise)."""

  def __init__(self, workdir: str, resume_step: int | None = None, enabled: bool | None = None):
    root = paths.resolve(workdir)
    self.path = paths.as_str(root / METRICS_FILE)
    self.tensorboard_dir = paths.as_str(root / TENSORBOARD_DIR)
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._remote = paths.is_remote(root)
    self._file = self._tb = None
    self._lines: list[str] = []   # cloud storage: the whole file, rewritten at each write
    if not self.enabled:
      return
    root.mkdir(parents=True, exist_ok=True)
    path = epath.Path(self.path)
    kept = []
    if resume_step is not None and path.exists():
      kept = [json.dumps(r) + '\n' for r in read_jsonl(self.path)
              if r.get('step', 0) <= resume_step]
    if self._remote:
      self._lines = kept
      path.write_text(''.join(kept))
      _register_tensorboard_gcs()
    else:
      if resume_step is not None and path.exists():
        with open(self.path, 'w') as f:
          f.writelines(kept)
      elif resume_step is None and path.exists():
        os.remove(self.path)
      self._file = open(self.path, 'a')
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(self.tensorboard_dir, purge_step=resume_step, flush_secs=10)

  def write(self, step: int, metrics: Mapping[str, Any], split: str = 'train') -> dict:
    record = {'step': int(step), 'split': split, **_scalars(metrics)}
    if not self.enabled:
      return record
    line = json.dumps(record) + '\n'
    if self._remote:
      self._lines.append(line)
      epath.Path(self.path).write_text(''.join(self._lines))
    else:
      self._file.write(line)
      self._file.flush()
    for k, v in record.items():
      if k not in ('step', 'split'):
        self._tb.add_scalar(f'{split}/{k}', v, int(step))
    return record

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics file (a local path or a cloud URI); a line cut short by a kill is
  skipped."""
  out = []
  for line in paths.resolve(path).read_text().splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def format_duration(seconds: float) -> str:
  seconds = max(0, int(round(seconds)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}h{m:02d}m{s:02d}s' if h else (f'{m}m{s:02d}s' if m else f'{s}s')


def _si(x: float) -> str:
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.1f}{unit}'
  return f'{x:.0f}'


class ProgressLine:
  """Progress lines with an ETA from the measured step rate (compile time excluded)."""

  def __init__(self, total_steps: int, start_step: int = 0):
    self.total, self.start = total_steps, start_step
    self.t0 = time.perf_counter()
    self._rate_from: tuple[int, float] | None = None   # (step, time) after the first log

  def line(self, step: int, metrics: Mapping[str, Any]) -> str:
    now = time.perf_counter()
    if self._rate_from is None:
      self._rate_from = (step, now)
      eta = float('nan')
    else:
      s0, t0 = self._rate_from
      eta = (now - t0) / max(step - s0, 1) * (self.total - step)
    m = metrics
    parts = [f'step {step}/{self.total} [{100 * step / max(self.total, 1):.0f}%]',
             f'loss {float(m["loss"]):.3f}']
    if 'learning_rate' in m:
      parts.append(f'lr {float(m["learning_rate"]):.1e}')
    if 'tokens_per_s' in m:
      parts.append(f'| {_si(float(m["tokens_per_s"]))} tok/s')
    if 'mfu' in m:
      parts.append(f'MFU {100 * float(m["mfu"]):.1f}%')
    if 'mfu_published' in m:   # against the chip's published peak (t5like.parallel.hardware)
      parts.append(f'({100 * float(m["mfu_published"]):.1f}% of published peak)')
    parts.append(f'| {format_duration(now - self.t0)} elapsed, ETA '
                 f'{"?" if math.isnan(eta) else format_duration(eta)}')
    return ' '.join(parts)


def plot_curves(jsonl_path: str, png_path: str) -> str:
  """Loss (train and validation), learning rate and tokens/s vs step, as a PNG; returns its path."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  records = read_jsonl(jsonl_path)
  train = [r for r in records if r.get('split') == 'train']
  evals = [r for r in records if r.get('split') == 'eval']
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  ax = axes[0]
  if train:
    ax.plot([r['step'] for r in train], [r['loss'] for r in train], label='train')
  if evals:
    ax.plot([r['step'] for r in evals], [r['loss'] for r in evals], 'o-', label='validation')
  ax.set(xlabel='step', ylabel='cross-entropy (nats)', title='loss')
  ax.legend()
  ax.grid(alpha=0.3)
  for ax, key, title in ((axes[1], 'learning_rate', 'learning rate'),
                         (axes[2], 'tokens_per_s', 'tokens / s')):
    pts = [(r['step'], r[key]) for r in train if key in r]
    if pts:
      ax.plot(*zip(*pts))
    ax.set(xlabel='step', title=title)
    ax.grid(alpha=0.3)
  fig.tight_layout()
  image = io.BytesIO()
  fig.savefig(image, format='png', dpi=100)
  plt.close(fig)
  paths.write_atomic(png_path, image.getvalue())   # a local file or a cloud URI
  return png_path


def measure_peak_flops(n: int = 1024, chain: int = 4, repeats: int = 5,
                       dtype=jnp.float32) -> float:
  """FLOP/s of the fastest of `repeats` runs of `chain` chained [n, n] matmuls (one jit call).

  Cheap (a few tenths of a second at ~100 GFLOP/s); measured in the same process as the run it
  is the MFU denominator of, so both see the same machine load.
  """
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)) / np.sqrt(n), dtype)

  @jax.jit
  def f(x):
    for _ in range(chain):
      x = x @ a
    return x

  f(a).block_until_ready()
  best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(repeats))
  return 2.0 * n ** 3 * chain / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def median(xs: Iterable[float]) -> float:
  return float(np.median(np.asarray(list(xs), np.float64)))
