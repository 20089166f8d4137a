"""jax.export of the decode step: serialised, reloaded in a fresh process, equal outputs."""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5like.config import get_variant
from t5like.infer import export
from t5like.models import build_model, init_cache, init_params

STEPS = 4


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('variant', ['t5_tiny', 'decoder_tiny'])
def test_exported_step_in_a_fresh_process(tmp_path, variant):
  cfg = get_variant(variant)
  params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
  B, T, S = 2, 8, 6
  model = build_model(cfg)
  cache = init_cache(cfg, B, T, S if cfg.is_encdec else 0)
  if cfg.is_encdec:
    src = jnp.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], jnp.int32)
    cache = model.apply({'params': params}, src, cache, method='prefill')
  exp = export.export_decode_step(cfg, batch=B, max_decode_len=T, encoder_len=S if cfg.is_encdec else 0)
  path = tmp_path / 'step.jaxexp'
  export.save(exp, str(path))
  # Reference: the same greedy steps run natively here.
  step = jax.jit(export.decode_step_fn(cfg))
  tok, c, want = jnp.array([[3], [4]], jnp.int32), cache, []
  for _ in range(STEPS):
    logits, c = step(params, c, tok)
    want.append(np.asarray(logits))
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
  tok0 = jnp.array([[3], [4]], jnp.int32)
  leaves = jax.tree.leaves((params, cache, tok0))
  np.savez(tmp_path / 'inputs.npz', *[np.asarray(x) for x in leaves])
  # The fresh process imports only jax and numpy; it gets the pytree structure from the artefact.
  script = textwrap.dedent(f'''
      import jax, jax.numpy as jnp, numpy as np
      with open({str(path)!r}, 'rb') as f:
        exp = jax.export.deserialize(bytearray(f.read()))
      z = np.load({str(tmp_path / 'inputs.npz')!r})
      leaves = [z[f'arr_{{i}}'] for i in range(len(z.files))]
      params, cache, tok = jax.tree.unflatten(exp.in_tree.children()[0], leaves)
      out = []
      for _ in range({STEPS}):
        logits, cache = exp.call(params, cache, tok)
        out.append(np.asarray(logits))
        tok = jnp.argmax(logits, -1).astype(jnp.int32)
      np.save({str(tmp_path / 'out.npy')!r}, np.stack(out))
      import sys; assert 't5like' not in sys.modules
  ''')
  subprocess.run([sys.executable, '-c', script], check=True, timeout=300,
                 env={'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
  got = np.load(tmp_path / 'out.npy')
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-5, atol=1e-5)
  assert exp.in_tree == jax.tree.structure(((params, cache, tok0), {}))


def test_encdec_needs_encoder_len():
  with pytest.raises(ValueError, match='encoder_len'):
    export.export_decode_step(get_variant('t5_tiny'), batch=1, max_decode_len=4)
