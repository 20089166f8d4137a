"""Exports the decode step of a served bundle with jax.export (t5like/infer/export.py).

  python scripts/export_decode_step.py --bundle=models/tiny/1 --out=step.jaxexp --batch=8
"""
from __future__ import annotations

import argparse

from t5like.infer import export
from t5like.serve.bundle import load_bundle


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description='Export the decode step of a bundle with jax.export.')
  p.add_argument('--bundle', required=True)
  p.add_argument('--out', required=True)
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--max_decode_len', type=int, default=129)
  p.add_argument('--encoder_len', type=int, default=256)
  p.add_argument('--platforms', default='',
                 help='comma-separated, e.g. cpu,cuda (default: this one)')
  a = p.parse_args(argv)
  b = load_bundle(a.bundle)
  exp = export.export_decode_step(b.cfg, batch=a.batch, max_decode_len=a.max_decode_len,
                                  encoder_len=a.encoder_len if b.cfg.is_encdec else 0,
                                  params=b.params,
                                  platforms=tuple(a.platforms.split(',')) if a.platforms else None)
  export.save(exp, a.out)
  print(f'{a.out}: platforms {exp.platforms}, {len(exp.in_avals)} inputs')


if __name__ == '__main__':
  main()
