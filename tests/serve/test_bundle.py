"""Bundles: export from a training checkpoint, quantised bundles served, bad bundles rejected."""
import json
import shutil
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5like import precision
from t5like.config import TrainConfig, to_dict
from t5like.compress.quantize import quantize_params
from t5like.infer.engine import Request, SamplingParams
from t5like.serve import bundle
from t5like.serve.registry import AVAILABLE, START, ModelRegistry
from t5like.train.checkpoint import Checkpointer
from t5like.train.state import TrainState
from tests.serve.conftest import ENGINE_KW, tiny_params


def test_export_from_training_checkpoint(tmp_path, serve_tokenizer):
  params, cfg = tiny_params('t5_tiny', 4)
  workdir = tmp_path / 'run'
  (workdir / 'tokenizer').mkdir(parents=True)
  (workdir / 'tokenizer' / 'spm_abc.model').write_bytes(serve_tokenizer.model_proto)
  state = TrainState(step=jnp.int32(7), params=params, opt_state=optax.adam(1e-3).init(params),
                     rng=jnp.zeros((2,), jnp.uint32),
                     loss_scale=precision.make_loss_scale(precision.get_policy('f32')))
  ckpt = Checkpointer(str(workdir / 'checkpoints'), async_save=False, keep_best=0)
  ckpt.save(7, state, {'position': 0}, to_dict(TrainConfig(model=cfg)))
  ckpt.close()
  out = bundle.export_from_checkpoint(str(workdir), str(tmp_path / 'models' / 'run' / '1'))
  b = bundle.load_bundle(out)
  assert b.cfg == cfg and b.tokenizer.model_proto == serve_tokenizer.model_proto
  for got, want in zip(jax.tree.leaves(b.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(got, np.asarray(want))
  assert 'checkpoints/7' in b.meta['source'] and b.meta['param_count'] > 0
  with pytest.raises(bundle.BundleError, match='no step 3'):
    bundle.export_from_checkpoint(str(workdir), str(tmp_path / 'x'), step=3)
  with pytest.raises(bundle.BundleError, match='exists'):
    bundle.export_from_checkpoint(str(workdir), out)


def test_quantised_bundle_is_served(tmp_path, serve_tokenizer):
  params, cfg = tiny_params('t5_tiny', 5)
  qparams = jax.jit(lambda p: quantize_params(p, cfg, 'int8')[0])(params)
  qcfg = cfg.with_quant(weights='int8')
  bundle.export_bundle(qparams, qcfg, serve_tokenizer, str(tmp_path / 'q' / '1'))
  b = bundle.load_bundle(str(tmp_path / 'q' / '1'))
  float_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
  assert b.cfg.quant.weights == 'int8' and b.meta['param_bytes'] < 0.5 * float_bytes
  assert any(v.dtype == np.int8 for v in bundle._flatten(b.params).values())
  registry = ModelRegistry(str(tmp_path), engine_kwargs=ENGINE_KW)
  registry.reload()
  try:
    mv = registry.get('q')
    assert mv.state == AVAILABLE and mv.info()['weight_quant'] == 'int8'
    done, tokens = threading.Event(), []
    def on_event(kind, value):
      tokens.extend(value) if kind == 'tokens' else done.set()
    mv.engine.submit(Request([5, 6, 7, 1], SamplingParams(max_tokens=4, temperature=0), on_event))
    assert done.wait(120)
    assert len(tokens) <= 4 and mv.engine.stats()['running'] == 0
  finally:
    registry.close()


def test_bad_bundles(tmp_path, base_path, serve_tokenizer):
  src = base_path / 'tiny' / '1'
  broken = tmp_path / 'm' / 'bad' / '1'
  shutil.copytree(src, broken)
  (broken / 'tokenizer.model').unlink()
  with pytest.raises(bundle.BundleError, match='tokenizer.model is missing'):
    bundle.load_bundle(str(broken))
  wrong = tmp_path / 'm' / 'bad' / '2'
  shutil.copytree(src, wrong)
  cfg = json.loads((wrong / 'config.json').read_text())
  (wrong / 'config.json').write_text(json.dumps({**cfg, 'd_model': 32}))
  with pytest.raises(bundle.BundleError, match='wrong shapes'):
    bundle.load_bundle(str(wrong))
  (wrong / 'config.json').write_text(json.dumps({**cfg, 'd_modle': 32}))
  with pytest.raises(bundle.BundleError, match="unknown config key 'model.d_modle'"):
    bundle.load_bundle(str(wrong))
  params, cfg = tiny_params('t5_tiny', 0)
  with pytest.raises(bundle.BundleError, match='missing'):
    bundle.export_bundle({'decoder': params['decoder']}, cfg, serve_tokenizer, str(tmp_path / 'y'))
  # A failed version keeps its error (START: waiting for a whole copy); the registry carries on.
  registry = ModelRegistry(str(tmp_path / 'm'), engine_kwargs=ENGINE_KW)
  registry.reload()
  st = registry.status('bad')   # version 2: its config no longer matches the manifest's size
  assert st[0]['state'] == START and 'BundleIncomplete' in st[0]['status']['error_message']
  assert not registry.ready()[0]
  registry.close()
