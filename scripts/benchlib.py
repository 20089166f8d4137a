"""Timing helpers shared by the subcommands of scripts/bench.py."""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import numpy as np


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int) -> list[float]:
  """Wall seconds of `repeats` calls of `fn` after `warmup` untimed ones (fn must block)."""
  for _ in range(warmup):
    fn()
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    out.append(time.perf_counter() - t)
  return out


def median(xs) -> float:
  return float(np.median(np.asarray(xs, np.float64)))


def emit(record: dict) -> None:
  """The one JSON object a subcommand prints."""
  print(json.dumps(record, sort_keys=True), flush=True)
