"""Dynamic (input-dependent) pruning at inference: per-token top-k of the FFN activations.

    with dynamic.ffn_topk(k):          # inside the function you jit, around model.apply
      logits = model.apply({'params': params}, ...)

Every `layers.MLP` call inside the context computes its hidden activations h [B, T, F] as usual,
keeps, for each token, the k entries of largest |h| and zeroes the rest (Deja Vu / "lazy neuron"
contextual sparsity, without a predictor). The output projection then touches only those k rows of
`wo`: when B*T*k < F (decoding: a few tokens per step) it gathers the k rows per token, reading
k*D instead of F*D weights; otherwise it multiplies the sparse h with the dense `wo` (the same
numbers, no speed-up). The input projections stay dense, so the saving is at most the `wo` half
of the FFN.

It is a flax method interceptor (`nn.intercept_methods`): no model code changes and no config
field, and the parameters are the model's own. The context acts at trace time, so it must be
entered inside the jitted function (a function jitted outside it keeps the dense trace).
Written here: no library provides contextual FFN sparsity for flax.
"""
from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5like.models import layers


def sparse_ffn(mlp: layers.MLP, x_BTD, k: int):
  """The FFN of bound module `mlp` with per-token top-k activations (see the module docstring)."""
  cfg = mlp.cfg
  if cfg.quant.active:
    raise ValueError(f'dynamic.ffn_topk needs a float model; model.quant is {cfg.quant}')
  if not 0 < k <= cfg.d_ff:
    raise ValueError(f'dynamic.ffn_topk: k={k} must be in [1, d_ff={cfg.d_ff}]')
  policy = layers.policy_of(cfg)
  p = mlp.variables['params']
  kern = lambda n: p[n]['kernel'].astype(policy.compute_dtype)
  x = policy.cast_to_compute(x_BTD)
  proj = lambda n: jnp.einsum('BTD,DF->BTF', x, kern(n))
  if cfg.ffn_activation in ('gated-gelu', 'swiglu'):
    act = nn.gelu if cfg.ffn_activation == 'gated-gelu' else nn.silu
    h_BTF = act(proj('wi_0')) * proj('wi_1')
  else:
    act = nn.relu if cfg.ffn_activation == 'relu' else nn.gelu
    h_BTF = act(proj('wi'))
  _, idx_BTK = jax.lax.top_k(jnp.abs(h_BTF).astype(jnp.float32), k)
  val_BTK = jnp.take_along_axis(h_BTF, idx_BTK, axis=-1)
  wo_FD = kern('wo')
  B, T, F = h_BTF.shape
  if B * T * k < F:
    return jnp.einsum('BTK,BTKD->BTD', val_BTK, jnp.take(wo_FD, idx_BTK, axis=0))
  sparse_BTF = jnp.put_along_axis(jnp.zeros_like(h_BTF), idx_BTK, val_BTK, axis=-1,
                                  inplace=False)
  return jnp.einsum('BTF,FD->BTD', sparse_BTF, wo_FD)


@contextlib.contextmanager
def ffn_topk(k: int):
  """Within the context, every FFN keeps its k largest activations per token (k >= d_ff: dense)."""
  def interceptor(next_fun, args, kwargs, context):
    mod = context.module
    if (isinstance(mod, layers.MLP) and context.method_name == '__call__'
        and not mod.is_initializing() and k < mod.cfg.d_ff):
      x_BTD = args[0] if args else kwargs['x_BTD']
      return sparse_ffn(mod, x_BTD, k)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    yield
