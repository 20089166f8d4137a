"""Shared helpers of the pruning / sharing tests: cheap random parameters and cached jitted
forwards (one compile per config instead of op-by-op dispatch)."""
import functools

import jax
import jax.numpy as jnp

from t5like.models import abstract_params, build_model


@functools.lru_cache(maxsize=None)
def _sampler(cfg):
  shapes = abstract_params(cfg)
  leaves, treedef = jax.tree.flatten(shapes)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]

  def sample(key):
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, s, p in zip(keys, leaves, paths):
      if 'scale' in p:
        out.append(1.0 + 0.1 * jax.random.normal(k, s.shape, s.dtype))
      else:
        fan_in = s.shape[-2] if s.ndim >= 2 and 'embedding' not in p else 1
        if p.endswith("['out']['kernel']"):
          fan_in = s.shape[-3] * s.shape[-2]
        out.append(jax.random.normal(k, s.shape, s.dtype) * fan_in ** -0.5)
    return jax.tree.unflatten(treedef, out)

  return jax.jit(sample)


def random_params(cfg, seed: int = 0):
  """Parameters of `cfg` drawn like the model's init (normal, fan-in scaled; norms near 1)."""
  return _sampler(cfg)(jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def forward(cfg):
  """jitted (params, tokens) -> logits of `cfg` (encoder and decoder both read `tokens`)."""
  model = build_model(cfg)

  @jax.jit
  def f(params, tok):
    return model.apply({'params': params}, *((tok, tok) if cfg.is_encdec else (tok,)))

  return f


def lm_batch(cfg, key: int = 1, B: int = 2, T: int = 8):
  tok = jax.random.randint(jax.random.key(key), (B, T), 2, cfg.vocab_size)
  return dict(encoder_input_tokens=tok, decoder_input_tokens=tok, decoder_target_tokens=tok,
              decoder_loss_weights=jnp.ones((B, T), jnp.float32))
