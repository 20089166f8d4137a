"""A quantised bundle serves exactly the tokens of direct quantised greedy decoding.

The int4 fixture is chosen so that quantisation changes the greedy output of at least one prompt
(asserted): a server that decoded with the float weights, or dropped the quantised layers, fails.
"""
import threading

import numpy as np
import pytest

from t5like.compress.quantize import quantize_params
from t5like.infer import decode
from t5like.infer.engine import Request, SamplingParams
from t5like.serve import bundle
from t5like.serve.registry import AVAILABLE, ModelRegistry
from tests.serve.conftest import ENGINE_KW, PROMPTS, tiny_params

NEW = 8


def direct(params, cfg):
  out = []
  for p in PROMPTS:
    res = decode.greedy(params, cfg, np.asarray([p], np.int32), NEW)
    toks = np.asarray(res.tokens)[0, :int(np.asarray(res.lengths)[0])].tolist()
    out.append(toks)
  return out


def served(mv, prompt):
  done, tokens = threading.Event(), []

  def on_event(kind, value):
    tokens.extend(value) if kind == 'tokens' else done.set()

  mv.engine.submit(Request(list(prompt), SamplingParams(max_tokens=NEW, temperature=0),
                           on_event))
  assert done.wait(120)
  return tokens


@pytest.mark.slow   # two engines compiled
@pytest.mark.parametrize('scheme', ['int8', 'int4'])
def test_quantised_bundle_serves_direct_quantised_decoding(tmp_path, serve_tokenizer, scheme):
  params, cfg = tiny_params('t5_tiny', 5)
  qparams, qcfg = quantize_params(params, cfg, scheme, group_size=32)
  want = direct(qparams, qcfg)
  # The fixture varies: prompts decode differently, and (int4) quantisation changes the output.
  assert len({tuple(w) for w in want}) == len(PROMPTS), want
  if scheme == 'int4':
    assert want != direct(params, cfg), 'int4 quantisation left every greedy output unchanged'
  bundle.export_bundle(qparams, qcfg, serve_tokenizer, str(tmp_path / 'q' / '1'))
  registry = ModelRegistry(str(tmp_path), engine_kwargs=ENGINE_KW)
  registry.reload()
  try:
    mv = registry.get('q')
    assert mv.state == AVAILABLE
    for p, w in zip(PROMPTS, want):
      got = served(mv, p)
      # The engine streams new tokens and stops at EOS (which it does not emit as a token).
      w = w[:w.index(1)] if 1 in w else w
      got = [t for t in got if t != 1]
      assert got == w, (p, got, w)
  finally:
    registry.close()
