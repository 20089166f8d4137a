"""Building blocks: T5 LayerNorm, einsum projections, embeddings, the FFN, remat policies.

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
from t5like.kernels import cpu_matmul

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
  """A bias-free projection `einsum(spec, x, kernel)`; the one place weights meet activations.

  Quantised weights (ModelConfig.weight_quant), run-time activation quantisation
  (activation_quant) and fake quantisation for training (qat) are all dispatched from here, so
  every projection of every model gets them; see t5like/compress/quantize.py.
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
    policy = policy_of(self.cfg)
    cfg = self.cfg
    if cfg.weight_quant != 'none' or cfg.qat != 'none' or cfg.activation_quant != 'none':
      # Local import: compress builds on models, never the other way at import time.
      from t5like.compress import quantize
    if self.cfg.weight_quant != 'none':
      return quantize.quantized_einsum(self, x, policy)
    kernel = self.param('kernel', nn.with_logical_partitioning(normal_init(self.init_std),
                                                               self.kernel_axes),
                        self.kernel_shape, policy.param_dtype)
    if isinstance(kernel, cpu_matmul.PackedKernel):   # the CPU decoding layout
      lead = x.shape[:-self.contract_dims]
      x_flat = x.reshape(lead + (-1,))
      if cpu_matmul.wanted(x_flat, kernel):
        out_shape = lead + self.kernel_shape[self.contract_dims:]
        return cpu_matmul.matmul(x_flat, kernel).reshape(out_shape)
      kernel = kernel.unpacked()
    if self.cfg.qat != 'none':
      kernel = quantize.fake_quant_kernel(kernel, self.cfg, self.contract_dims)
    x = policy.cast_to_compute(x)
    if self.cfg.activation_quant != 'none':
      return quantize.dynamic_einsum(self.spec, x, kernel.astype(policy.compute_dtype), self.cfg,
                                     self.contract_dims, out_f32=self.out_f32)
    kernel = kernel.astype(policy.compute_dtype)
    if self.contract_dims > 1:
      # One contracted axis in row-major order: a multi-axis contraction lets XLA pick an axis
      # order that transposes the whole kernel on every call (seen on CPU while decoding).
      c = self.contract_dims
      x = x.reshape(x.shape[:-c] + (-1,))
      kernel = kernel.reshape((-1,) + kernel.shape[c:])
      ins, out = self.spec.split('->')
      x_spec, k_spec = ins.split(',')
      k = next(ch for ch in 'KCZ' if ch not in self.spec)
      spec = f'{x_spec[:-c]}{k},{k}{k_spec[c:]}->{out}'
    else:
      spec = self.spec
    return jnp.einsum(spec, x, kernel, preferred_element_type=jnp.float32 if self.out_f32 else None)


def fused_packed_projections(module: nn.Module, names: Sequence[str], x):
  """[einsum of x with child Einsum `name`'s kernel for each name] as one CPU kernel call, when
  those kernels are packed (decoding layout, one contracted dim) and the kernel applies here;
  else None, and the caller applies the children one by one."""
  params = module.variables.get('params', {})
  kernels = [params.get(name, {}).get('kernel') for name in names]
  if not all(isinstance(k, cpu_matmul.PackedKernel) and not k.transposed for k in kernels):
    return None
  x_flat = x.reshape(-1, x.shape[-1])
  if not all(k.k == x.shape[-1] for k in kernels) or not cpu_matmul.wanted(x_flat, kernels[0]):
    return None
  outs = cpu_matmul.matmul_fused(x_flat, kernels)
  return [y.reshape(x.shape[:-1] + k.shape[1:]) for y, k in zip(outs, kernels)]


class Embed(nn.Module):
  """Token embedding [V, D]; `attend` gives logits against it (tied output layer)."""
  cfg: ModelConfig

  def setup(self):
    policy = policy_of(self.cfg)
    if self.cfg.weight_quant != 'none':
      from t5like.compress import quantize
      self.quant_embedding = quantize.QuantEmbedding(self.cfg, name='quant')
    else:
      self.embedding = self.param(
          'embedding', nn.with_logical_partitioning(normal_init(1.0), ('vocab', 'embed')),
          (self.cfg.vocab_size, self.cfg.d_model), policy.param_dtype)

  def table(self):
    if self.cfg.weight_quant != 'none':
      return self.quant_embedding.dequantized()
    if isinstance(self.embedding, cpu_matmul.PackedKernel):
      return self.embedding.unpacked()
    return self.embedding

  def __call__(self, ids_BT):
    policy = policy_of(self.cfg)
    if self.cfg.weight_quant != 'none':
      return self.quant_embedding.lookup(ids_BT, policy.compute_dtype)
    if isinstance(self.embedding, cpu_matmul.PackedKernel):
      return self.embedding.rows(ids_BT).astype(policy.compute_dtype)
    return jnp.take(self.embedding, ids_BT, axis=0).astype(policy.compute_dtype)

  def attend(self, x_BTD):
    """Logits x @ E^T in float32."""
    policy = policy_of(self.cfg)
    if self.cfg.weight_quant != 'none':
      return self.quant_embedding.attend(x_BTD, policy)
    table = self.embedding
    if isinstance(table, cpu_matmul.PackedKernel):   # the CPU decoding layout
      if cpu_matmul.wanted(x_BTD, table):
        return cpu_matmul.matmul(x_BTD, table)
      table = table.unpacked()
    if self.cfg.qat != 'none':
      from t5like.compress import quantize
      table = quantize.fake_quant_kernel(table, self.cfg, contract_dims=1, channel_axis=0)
    return jnp.einsum('BTD,VD->BTV', policy.cast_to_compute(x_BTD),
                      table.astype(policy.compute_dtype), preferred_element_type=jnp.float32)


class MLP(nn.Module):
  """T5 FFN: relu (1.0) or gated-gelu (1.1, tanh-approximate gelu as T5 and HF use)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BTD, deterministic: bool):
    cfg = self.cfg
    D, F = cfg.d_model, cfg.d_ff
    proj = lambda name: Einsum(cfg, 'BTD,DF->BTF', (D, F), ('embed', 'mlp'), D ** -0.5, name=name)
    if cfg.ffn_activation in ('gated-gelu', 'swiglu'):
      act = nn.gelu if cfg.ffn_activation == 'gated-gelu' else nn.silu
      fused = fused_packed_projections(self, ('wi_0', 'wi_1'), x_BTD)
      gate_BTF, up_BTF = fused or (proj('wi_0')(x_BTD), proj('wi_1')(x_BTD))
      h_BTF = act(gate_BTF) * up_BTF
    else:
      act = nn.relu if cfg.ffn_activation == 'relu' else nn.gelu
      h_BTF = act(proj('wi')(x_BTD))
    h_BTF = constrain(h_BTF, ('batch', 'length', 'mlp'))
    h_BTF = nn.Dropout(cfg.dropout_rate)(h_BTF, deterministic=deterministic)
    return Einsum(cfg, 'BTF,FD->BTD', (F, D), ('mlp', 'embed'), F ** -0.5, name='wo')(h_BTF)
