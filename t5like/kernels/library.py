"""Builds and loads the CPU kernels (the *.cc files here) and says when models may use them.

The sources are compiled together into one shared library with the system C++ compiler on first
use and cached (T5LIKE_KERNEL_CACHE, default ~/.cache/t5like/kernels), keyed by the sources,
jaxlib, compiler, flags and CPU. Where that fails, or T5LIKE_CPU_KERNELS=0, `available()` is False
with a warning naming why, and callers keep XLA's own ops.

Nothing here decides where the kernels run: the CPU decode backend (t5like/infer/backend.py)
attaches them to a decoding step, and `usable()` says whether they can run in the current trace.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

HERE = Path(__file__).parent
SOURCES = ('cpu_matmul.cc', 'cpu_matmul_q.cc', 'decode_attention.cc', 'token_pick.cc')
HEADERS = ('parallel_for.h', 'vector_math.h')
TARGETS = ('t5like_matmul_packed', 't5like_matmul_q8', 't5like_matmul_q4',
           't5like_decode_attention', 't5like_decode_attention_cached',
           't5like_prefill_attention', 't5like_greedy_pick')
_state: dict = {}


def _cpu_flags() -> str:
  try:
    for line in Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('flags'):
        return line
  except OSError:
    pass
  return platform.processor()


def _compile() -> Path:
  """Builds the library (or reuses a cached build for this source, jaxlib and CPU)."""
  import jaxlib
  compiler = os.environ.get('CXX') or shutil.which('c++') or shutil.which('g++')
  if not compiler:
    raise RuntimeError('no C++ compiler found (set CXX)')
  include = jax.ffi.include_dir()
  flags = ['-O3', '-march=native', '-std=c++17', '-shared', '-fPIC', '-fopenmp-simd',
           f'-I{include}']
  texts = [(HERE / f).read_text() for f in SOURCES + HEADERS]
  key = hashlib.sha256('\n'.join([*texts, jaxlib.__version__, compiler, *flags,
                                  platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
  cache = Path(os.environ.get('T5LIKE_KERNEL_CACHE',
                              Path.home() / '.cache' / 't5like' / 'kernels'))
  lib = cache / f't5like_kernels-{key}.so'
  if lib.exists():
    return lib
  cache.mkdir(parents=True, exist_ok=True)
  # Build beside the target and rename: concurrent builders never see a partial file.
  fd, tmp = tempfile.mkstemp(suffix='.so', dir=cache)
  os.close(fd)
  try:
    proc = subprocess.run([compiler, *flags, *(str(HERE / f) for f in SOURCES), '-o', tmp],
                          capture_output=True, text=True)
    if proc.returncode != 0:
      raise RuntimeError(f'{compiler} failed on {" ".join(SOURCES)}:\n{proc.stderr[-2000:]}')
    os.replace(tmp, lib)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return lib


def available() -> bool:
  """Whether the kernels are built and registered with XLA for the CPU (built on first call)."""
  if 'ok' not in _state:
    _state['ok'] = False
    if os.environ.get('T5LIKE_CPU_KERNELS', '1') == '0':
      _state['why'] = 'disabled by T5LIKE_CPU_KERNELS=0'
      return False
    try:
      lib = ctypes.cdll.LoadLibrary(str(_compile()))
      for target in TARGETS:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)),
                                    platform='cpu')
      _state['lib'] = lib
      _state['ok'] = True
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
      _state['why'] = str(e)
      logging.warning('t5like CPU decoding kernels unavailable, using XLA ops: %s', e)
  return _state['ok']


def unavailable_reason() -> str | None:
  return None if available() else _state.get('why')


def usable() -> bool:
  """Whether a trace here may call the kernels: no mesh in context (the custom calls have no
  sharding rule), a CPU backend, and the library built (built on first call, CPU only)."""
  if not jax.sharding.get_abstract_mesh().empty or jax.default_backend() != 'cpu':
    return False
  return available()
