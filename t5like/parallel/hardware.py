"""Published per-chip peaks of known accelerators: the denominator of MFU figures that compare
with other frameworks (MaxText, PaLM's MFU), and the memory an AOT compile is checked against.

  spec = hardware.lookup(jax.devices()[0].device_kind)   # None for a CPU or an unknown chip
  spec.peak_flops('bfloat16'), spec.memory_bytes

The project also keeps the matmul peak measured on the machine itself (t5like.train.metrics
`measure_peak_flops`): the only denominator a CPU has, and the one that shows what this machine
reaches now. The published peak is the one other papers use.

`detect_platform()` / `jax_requirement()` name the jax build a machine needs ('jax[tpu]==0.10.2'),
for scripts/install_jax.sh and the Colab notebook's install cell:
  python -m t5like.parallel.hardware jax-requirement [auto|cpu|cuda|tpu]

Figures are dense (no 2:4 sparsity), per chip as JAX sees it (one device = one TensorCore pair on
v4 / v5p, one chip on v5e / v6e, one GPU), from the vendors' data sheets:

  device            bf16 TFLOP/s   f32 TFLOP/s   tf32 TFLOP/s   memory
  TPU v4                 275          (275)           -         32 GiB HBM
  TPU v5e                197          (197)           -         16 GiB HBM
  TPU v5p                459          (459)           -         95 GiB HBM
  TPU v6e                918          (918)           -         32 GiB HBM
  A100 (SXM / PCIe)      312           19.5          156        40 or 80 GB HBM
  H100 SXM               989           67            495        80 GB HBM
  H100 PCIe              756           51            378        80 GB HBM
  H200                   989           67            495        141 GB HBM

TPUs have no published f32 figure: the MXU multiplies bf16, and at JAX's default matmul precision
XLA:TPU runs an f32 matmul as one bf16 pass, so the f32 column repeats the bf16 peak (at
precision='highest' it takes six passes: expect at most ~1/6 of it). On GPUs the f32 column is the
IEEE f32 (non-tensor-core) rate; XLA:GPU uses TF32 tensor cores for f32 matmuls at the default
precision, which is what the tf32 column is for.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import subprocess
import sys
from typing import Mapping, Sequence

TFLOPS = 1e12
GiB = 1 << 30
GB = 10 ** 9


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  name: str
  bf16_flops: float
  f32_flops: float
  tf32_flops: float | None
  memory_bytes: int

  def peak_flops(self, dtype: str) -> float:
    """Peak FLOP/s for matmuls in `dtype` ('bfloat16' / 'bf16', 'float32' / 'f32', 'tf32')."""
    key = {'bfloat16': 'bf16', 'bf16': 'bf16', 'float32': 'f32', 'f32': 'f32',
           'tf32': 'tf32'}.get(str(dtype))
    if key is None:
      raise ValueError(f'no published peak for dtype {dtype!r}; use one of bf16, f32, tf32')
    value = {'bf16': self.bf16_flops, 'f32': self.f32_flops, 'tf32': self.tf32_flops}[key]
    if value is None:
      raise ValueError(f'{self.name} has no {key} peak (TPUs have no TF32 mode); use bf16 or f32')
    return value


# (substrings of jax's device_kind, lower case, all of which must occur; spec). The first match
# wins, so the more specific rows come first ('tpu v5 lite' before 'tpu v5').
_TABLE: tuple[tuple[tuple[str, ...], ChipSpec], ...] = (
    (('tpu v4',), ChipSpec('TPU v4', 275 * TFLOPS, 275 * TFLOPS, None, 32 * GiB)),
    (('tpu v5 lite',), ChipSpec('TPU v5e', 197 * TFLOPS, 197 * TFLOPS, None, 16 * GiB)),
    (('tpu v5e',), ChipSpec('TPU v5e', 197 * TFLOPS, 197 * TFLOPS, None, 16 * GiB)),
    (('tpu v5p',), ChipSpec('TPU v5p', 459 * TFLOPS, 459 * TFLOPS, None, 95 * GiB)),
    (('tpu v5',), ChipSpec('TPU v5p', 459 * TFLOPS, 459 * TFLOPS, None, 95 * GiB)),
    (('tpu v6 lite',), ChipSpec('TPU v6e', 918 * TFLOPS, 918 * TFLOPS, None, 32 * GiB)),
    (('tpu v6e',), ChipSpec('TPU v6e', 918 * TFLOPS, 918 * TFLOPS, None, 32 * GiB)),
    (('a100', '40gb'), ChipSpec('A100 40GB', 312 * TFLOPS, 19.5 * TFLOPS, 156 * TFLOPS, 40 * GB)),
    (('a100',), ChipSpec('A100 80GB', 312 * TFLOPS, 19.5 * TFLOPS, 156 * TFLOPS, 80 * GB)),
    (('h100', 'pcie'), ChipSpec('H100 PCIe', 756 * TFLOPS, 51 * TFLOPS, 378 * TFLOPS, 80 * GB)),
    (('h100',), ChipSpec('H100 SXM', 989 * TFLOPS, 67 * TFLOPS, 494.5 * TFLOPS, 80 * GB)),
    (('h200',), ChipSpec('H200', 989 * TFLOPS, 67 * TFLOPS, 494.5 * TFLOPS, 141 * GB)),
)

KNOWN = tuple(sorted({spec.name for _, spec in _TABLE}))


def lookup(device_kind: str) -> ChipSpec | None:
  """The published spec of a device kind (jax's `device.device_kind`, or a table name such as
  'TPU v5e' or 'H100'), or None when it is not in the table (a CPU, an unknown chip)."""
  kind = device_kind.lower()
  for keys, spec in _TABLE:
    if all(k in kind for k in keys):
      return spec
  return None


def require(device_kind: str) -> ChipSpec:
  """`lookup`, but an unknown kind is an error naming the known ones."""
  spec = lookup(device_kind)
  if spec is None:
    raise ValueError(f'no published figures for device kind {device_kind!r}; known: '
                     f'{list(KNOWN)}')
  return spec


def published_mfu(model_flops_per_s: float, device_kind: str, dtype: str,
                  num_devices: int = 1) -> float | None:
  """Model FLOP/s as a fraction of `num_devices` chips' published peak at `dtype`; None when the
  device kind is not in the table (then only the measured-peak MFU applies)."""
  spec = lookup(device_kind)
  if spec is None:
    return None
  return model_flops_per_s / (spec.peak_flops(dtype) * num_devices)


# --- Which jax build a machine needs (used by scripts/install_jax.sh and the Colab notebook) ---

PLATFORMS = ('cpu', 'cuda', 'tpu')
_JAX_EXTRA = {'cpu': '', 'cuda': '[cuda12]', 'tpu': '[tpu]'}


def detect_platform(environ: Mapping[str, str] | None = None, dev: str = '/dev',
                    which=shutil.which) -> str:
  """'tpu' on a TPU VM (its /dev/accel* or /dev/vfio/N devices, or Colab's TPU variables), 'cuda'
  where nvidia-smi lists a GPU, else 'cpu'. Looks only at the machine, never imports jax."""
  environ = os.environ if environ is None else environ
  if environ.get('COLAB_TPU_ADDR') or environ.get('TPU_ACCELERATOR_TYPE'):
    return 'tpu'
  try:
    names = os.listdir(dev)
  except OSError:
    names = []
  vfio = os.path.join(dev, 'vfio')
  if any(n.startswith('accel') for n in names) or (
      os.path.isdir(vfio) and any(n.isdigit() for n in os.listdir(vfio))):
    return 'tpu'
  smi = which('nvidia-smi')
  if smi:
    try:
      listed = subprocess.run([smi, '-L'], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      return 'cpu'
    if listed.returncode == 0 and 'GPU' in listed.stdout:
      return 'cuda'
  return 'cpu'


def jax_requirement(platform: str, version: str) -> str:
  """The pip requirement of jax `version` for `platform` ('cpu', 'cuda', 'tpu'); the CUDA and TPU
  runtimes come as wheels (only the NVIDIA driver must be on the host)."""
  if platform not in PLATFORMS:
    raise ValueError(f'platform {platform!r} is not one of {list(PLATFORMS)}')
  return f'jax{_JAX_EXTRA[platform]}=={version}'


def main(argv: Sequence[str]) -> None:
  """python -m t5like.parallel.hardware jax-requirement [auto|cpu|cuda|tpu]: prints
  '<platform> <requirement>' for the installed jax version."""
  if len(argv) not in (1, 2) or argv[0] != 'jax-requirement':
    raise SystemExit('usage: python -m t5like.parallel.hardware jax-requirement '
                     '[auto|cpu|cuda|tpu]')
  platform = argv[1] if len(argv) == 2 else 'auto'
  if platform == 'auto':
    platform = detect_platform()
  if platform not in PLATFORMS:
    raise SystemExit(f'platform {platform!r} is not one of auto, {", ".join(PLATFORMS)}')
  print(platform, jax_requirement(platform, importlib.metadata.version('jax')))


if __name__ == '__main__':
  main(sys.argv[1:])
