"""Benchmarks, one JSON object each on stdout:

  python scripts/bench.py train    # t5_small training step: tokens/s, model FLOPs, MFU
  python scripts/bench.py decode   # greedy decoding: new tokens/s at batch 1 and 8
  python scripts/bench.py quant    # decoding with int8 / int4 / dynamic int8 against f32
  python scripts/bench.py prune    # forward and decode speed of surgically pruned models

Each subcommand lives in scripts/bench_<name>.py; `--help` after the name lists its options.
Speed is measured here, never asserted in tests; report ratios measured in one run.
"""
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

SUBCOMMANDS = ('train', 'decode', 'quant', 'prune')


def main(argv):
  if not argv or argv[0] not in SUBCOMMANDS:
    print(__doc__, file=sys.stderr)
    sys.exit(f'choose a benchmark: {", ".join(SUBCOMMANDS)}')
  module = importlib.import_module(f'bench_{argv[0]}')
  sys.argv = [f'bench_{argv[0]}.py'] + list(argv[1:])   # each main parses sys.argv
  module.main()


if __name__ == '__main__':
  main(sys.argv[1:])
