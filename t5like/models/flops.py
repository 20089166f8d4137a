"""Exact matmul FLOP counts of the models, from a ModelConfig (no 6N shortcut).

Shape letters: B batch, S encoder (input) length, T decoder (target) length, D d_model, N heads,
H head dim, F d_ff, V vocab, K relative-position buckets, L layers.

What is counted: every einsum / dot_general the forward pass of t5like.models.transformer runs,
at 2 FLOPs per multiply-accumulate (XLA's convention for dot FLOPs):
- q/k/v/o projections of self-attention; q/o projections of cross-attention over the decoder
  length and its K/V projections over the encoder length;
- attention QK^T and PV over the full T x S square (causal attention is not halved: the masked
  half is computed and then masked, and that is the project's convention for MFU);
- the FFN: 2 matrices (relu / gelu) or 3 (gated-gelu / swiglu);
- the output logits (tied embedding or lm_head);
- T5's relative-position one-hot einsum 'BTSK,NK->BNTS', once per stack. It is a real matmul
  in the compiled program (a one-hot product rather than a gather), so it is counted; the bias
  is computed once for the whole batch (B = 1), so it is tiny: 2*T*S*K*N per stack, ~0.01% of
  t5_small's forward at 128 + 128 tokens.

What is not: the embedding lookup (a gather), norms, softmax, activations, residual adds, RoPE,
masks and dropout (elementwise; XLA's cost analysis counts them, which is why its total is a few
percent above ours; see tests/models/test_flops.py). Shared layers (shared_layer_groups) do not
change the count: every layer is still applied. Quantised matmuls are counted like float ones.

A training step is counted as 3x the forward (the backward pass costs two matmuls per forward
matmul: one for the activation gradient, one for the weight gradient), the usual MFU convention.
For the one-hot relative-position einsum the backward really needs only the table gradient, and
remat recomputation is never counted (it is overhead, not useful work).
"""
from __future__ import annotations

from t5like.config import ModelConfig


def _gated(cfg: ModelConfig) -> bool:
  return cfg.ffn_activation in ('gated-gelu', 'swiglu')


def attention_flops(cfg: ModelConfig, batch: int, q_len: int, kv_len: int, kv_proj_len: int):
  """One attention layer: q/o projections over `q_len` tokens, k/v projections over
  `kv_proj_len` tokens (0 when K/V are precomputed), QK^T and PV over `q_len x kv_len`."""
  D, NH = cfg.d_model, cfg.num_heads * cfg.head_dim
  q_o = 2 * (2 * batch * q_len * D * NH)            # 'BTD,DNH->BTNH' and 'BTNH,NHD->BTD'
  k_v = 2 * (2 * batch * kv_proj_len * D * NH)      # 'BSD,DNH->BSNH' twice
  scores = 2 * (2 * batch * q_len * kv_len * NH)    # 'BTNH,BSNH->BNTS' and 'BNTS,BSNH->BTNH'
  return q_o + k_v + scores


def ffn_flops(cfg: ModelConfig, tokens: int) -> int:
  """'BTD,DF->BTF' once (relu) or twice (gated), then 'BTF,FD->BTD'."""
  return (3 if _gated(cfg) else 2) * 2 * tokens * cfg.d_model * cfg.d_ff


def logits_flops(cfg: ModelConfig, tokens: int) -> int:
  """'BTD,VD->BTV' (tied) or 'BTD,DV->BTV' (lm_head)."""
  return 2 * tokens * cfg.d_model * cfg.vocab_size


def relpos_flops(cfg: ModelConfig, q_len: int, k_len: int, batch: int = 1) -> int:
  """The relative-position one-hot einsum 'BTSK,NK->BNTS' (0 for RoPE stacks)."""
  if cfg.position != 'relative':
    return 0
  return 2 * batch * q_len * k_len * cfg.relative_attention_num_buckets * cfg.num_heads


def forward_flops_breakdown(cfg: ModelConfig, batch: int, inputs_len: int,
                            targets_len: int) -> dict[str, int]:
  """The forward matmul FLOPs by component, summed over layers.

  Encoder-decoder: `inputs_len` encoder tokens and `targets_len` decoder tokens per row.
  Decoder-only: `targets_len` is the sequence length; `inputs_len` is ignored.
  """
  B, S, T = batch, inputs_len, targets_len
  out = {}
  if cfg.is_encdec:
    L = cfg.num_encoder_layers
    out['encoder_attention'] = L * attention_flops(cfg, B, S, S, S)
    out['encoder_ffn'] = L * ffn_flops(cfg, B * S)
    out['encoder_relpos'] = relpos_flops(cfg, S, S)
  L = cfg.num_decoder_layers
  out['decoder_self_attention'] = L * attention_flops(cfg, B, T, T, T)
  if cfg.is_encdec:
    out['decoder_cross_attention'] = L * attention_flops(cfg, B, T, S, S)
  out['decoder_ffn'] = L * ffn_flops(cfg, B * T)
  out['decoder_relpos'] = relpos_flops(cfg, T, T)
  out['logits'] = logits_flops(cfg, B * T)
  return out


def forward_flops(cfg: ModelConfig, batch: int, inputs_len: int, targets_len: int) -> int:
  """Matmul FLOPs of one teacher-forced forward pass (see the module docstring)."""
  return sum(forward_flops_breakdown(cfg, batch, inputs_len, targets_len).values())


def train_step_flops(cfg: ModelConfig, batch: int, inputs_len: int, targets_len: int) -> int:
  """Matmul FLOPs of one training step (forward + backward) = 3 x forward."""
  return 3 * forward_flops(cfg, batch, inputs_len, targets_len)


def tokens_per_row(cfg: ModelConfig, inputs_len: int, targets_len: int) -> int:
  """The tokens `flops_per_token` divides by: inputs + targets (encdec), targets (decoder-only)."""
  return inputs_len + targets_len if cfg.is_encdec else targets_len


def flops_per_token(cfg: ModelConfig, inputs_len: int, targets_len: int, batch: int = 1) -> float:
  """Training-step FLOPs per token processed.

  The step's FLOPs divided by the tokens it processes: input + target tokens for an
  encoder-decoder, sequence tokens for a decoder-only model. So
  `tokens_per_s * flops_per_token / peak_flops` is the MFU when tokens/s counts the same tokens
  (padding included: a padded position costs the same matmuls). Independent of `batch` except for
  the batch-shared relative-position einsum, a ~1e-4 effect.
  """
  return (train_step_flops(cfg, batch, inputs_len, targets_len) /
          (batch * tokens_per_row(cfg, inputs_len, targets_len)))
