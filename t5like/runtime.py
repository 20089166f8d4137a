"""Process housekeeping for long runs that compile many programs (a study of many variants, a
test suite in one process).

Each compiled XLA executable holds about a dozen memory mappings until its jit cache entry is
dropped. Linux caps a process's mappings (vm.max_map_count, 65530 by default); past it the
compiler's next mmap fails and the process aborts. `free_compiled_programs` drops the jit caches
once the process holds a good share of that cap (programs still referenced stay; the rest are
compiled again when next called).
"""
from __future__ import annotations

import gc

import jax

_MAPS = '/proc/self/maps'
_MAX_MAP_COUNT = '/proc/sys/vm/max_map_count'


def map_count_and_limit() -> tuple[int, int] | None:
  """(memory mappings this process holds, the kernel's cap), or None where there is no such cap
  to read (not Linux)."""
  try:
    with open(_MAPS) as f:
      count = sum(1 for _ in f)
    with open(_MAX_MAP_COUNT) as f:
      return count, int(f.read())
  except (OSError, ValueError):
    return None


def free_compiled_programs(share: float = 1 / 3, force: bool = False) -> bool:
  """Drops every jit cache (and collects garbage) when the process holds more than `share` of its
  mapping cap, or always with `force`; returns whether it did."""
  counts = map_count_and_limit()
  if not force and (counts is None or counts[0] <= share * counts[1]):
    return False
  jax.clear_caches()
  gc.collect()
  return True
