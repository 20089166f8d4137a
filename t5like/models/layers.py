"""Building blocks: T5 LayerNorm, einsum projections, embeddings, the FFN, remat policies.

The float layers live here; `einsum_class` / `embed_class` pick the quantised ones of
t5like/models/quant.py where the config asks for them.

Shape letters: B batch, T query/target length, S key/source length, D d_model, N heads,
H head dim, F d_ff, V vocab, L layers.

Every parameter is created with logical axis names (see t5like/parallel/mesh.py for the rules)
and stored in the policy's `param_dtype`; it is cast to `compute_dtype` where it is used.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5like import precision
from t5like.config import ModelConfig
from t5like.models import quant

REMAT_POLICIES: dict[str, Callable | None] = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_with_no_batch_dims': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    'save_nothing_but_params': jax.checkpoint_policies.nothing_saveable,
}


def policy_of(cfg: ModelConfig) -> precision.Policy:
  return precision.get_policy(cfg.precision)


def normal_init(std: float):
  return nn.initializers.normal(stddev=std)


def constrain(x, axes: Sequence[str | None]):
  """Logical sharding constraint on an activation (a no-op outside a mesh with rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  """T5 LayerNorm: scale only, no mean subtraction, no bias; statistics in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    policy = policy_of(self.cfg)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), policy.param_dtype)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(var + self.cfg.layer_norm_epsilon)
    return (y * scale.astype(jnp.float32)).astype(policy.compute_dtype)


class Einsum(nn.Module):
  """A bias-free projection `einsum(spec, x, kernel)`: the one place float weights meet activations.

  Quantised variants (stored integer weights, fake quantisation, dynamic int8 activations) are
  other classes in t5like/models/quant.py with the same fields; `einsum_class(cfg)` picks one.
  """
  cfg: ModelConfig
  spec: str                       # e.g. 'BTD,DNH->BTNH'
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  init_std: float
  # How many leading kernel dims are contracted with x (for per-output-channel scales).
  contract_dims: int = 1
  out_f32: bool = False           # accumulate and return float32 (logits)

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(normal_init(self.init_std),
                                                               self.kernel_axes),
                        self.kernel_shape, policy_of(self.cfg).param_dtype)
    return project(self, x, kernel)


def project(einsum: Einsum, x, kernel):
  """`einsum.spec` of x and a float `kernel` in the compute dtype (what `Einsum` computes)."""
  policy = policy_of(einsum.cfg)
  x = policy.cast_to_compute(x)
  kernel = kernel.astype(policy.compute_dtype)
  spec = einsum.spec
  if einsum.contract_dims > 1:
    # One contracted axis in row-major order: a multi-axis contraction lets XLA pick an axis
    # order that transposes the whole kernel on every call (seen on CPU while decoding).
    c = einsum.contract_dims
    x = x.reshape(x.shape[:-c] + (-1,))
    kernel = kernel.reshape((-1,) + kernel.shape[c:])
    ins, out = spec.split('->')
    x_spec, k_spec = ins.split(',')
    k = next(ch for ch in 'KCZ' if ch not in spec)
    spec = f'{x_spec[:-c]}{k},{k}{k_spec[c:]}->{out}'
  return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32 if einsum.out_f32 else None)


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` gives logits against it (tied output layer)."""
  cfg: ModelConfig

  def setup(self):
    self.embedding = self.param(
        'embedding', nn.with_logical_partitioning(normal_init(1.0), ('vocab', 'embed')),
        (self.cfg.vocab_size, self.cfg.d_model), policy_of(self.cfg).param_dtype)

  def __call__(self, ids_BT):
    return jnp.take(self.embedding, ids_BT, axis=0).astype(policy_of(self.cfg).compute_dtype)

  def attend(self, x_BTD):
    """Logits x @ E^T in float32."""
    return tied_logits(self.cfg, x_BTD, self.embedding)


def tied_logits(cfg: ModelConfig, x_BTD, table_VD):
  policy = policy_of(cfg)
  return jnp.einsum('BTD,VD->BTV', policy.cast_to_compute(x_BTD),
                    table_VD.astype(policy.compute_dtype), preferred_element_type=jnp.float32)


def einsum_class(cfg: ModelConfig):
  """The projection layer of this config: float, stored-quantised or fake-quantised weights."""
  if cfg.quant.weights != 'none':
    return quant.QuantEinsum
  if cfg.quant.qat != 'none' or cfg.quant.activations != 'none':
    return quant.FakeQuantEinsum
  return Einsum


def embed_class(cfg: ModelConfig):
  """The token embedding of this config (its tied output layer included)."""
  if cfg.quant.weights != 'none':
    return quant.QuantEmbed
  if cfg.quant.qat != 'none':
    return quant.FakeQuantEmbed
  return Embed


class MLP(nn.Module):
  """T5 FFN: relu (1.0) or gated-gelu (1.1, tanh-approximate gelu as T5 and HF use)."""
  cfg: ModelConfig

  @property
  def gated(self) -> bool:
    return self.cfg.ffn_activation in ('gated-gelu', 'swiglu')

  def setup(self):
    cfg = self.cfg
    D, F = cfg.d_model, cfg.d_ff
    proj = einsum_class(cfg)
    wi = lambda: proj(cfg, 'BTD,DF->BTF', (D, F), ('embed', 'mlp'), D ** -0.5)
    if self.gated:
      self.wi_0, self.wi_1 = wi(), wi()
    else:
      self.wi = wi()
    self.wo = proj(cfg, 'BTF,FD->BTD', (F, D), ('mlp', 'embed'), F ** -0.5)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def gate_and_up(self, x_BTD):
    """The gated FFN's two input projections (a decode backend may fuse them into one call)."""
    return self.wi_0(x_BTD), self.wi_1(x_BTD)

  def __call__(self, x_BTD, deterministic: bool):
    cfg = self.cfg
    if self.gated:
      act = nn.gelu if cfg.ffn_activation == 'gated-gelu' else nn.silu
      gate_BTF, up_BTF = self.gate_and_up(x_BTD)
      h_BTF = act(gate_BTF) * up_BTF
    else:
      act = nn.relu if cfg.ffn_activation == 'relu' else nn.gelu
      h_BTF = act(self.wi(x_BTD))
    h_BTF = constrain(h_BTF, ('batch', 'length', 'mlp'))
    h_BTF = self.dropout(h_BTF, deterministic=deterministic)
    return self.wo(h_BTF)
