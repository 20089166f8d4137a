// One-query attention over a KV cache, for decoding on CPU (an XLA FFI handler).
//
//   t5like_decode_attention: ctx[B, N, H] = softmax(q . k + bias) . v
//   q [B, N, H], keys [B, N, H, S], values [B, N, S, H], bias [B, N, S] (masks folded in).
//   t5like_decode_attention_cached: the same after writing each row's new key and value [B, N, H]
//   into the cache (aliased in place) at that row's index [B], over positions up to that index
//   only (causal self-attention: later positions are masked anyway, so they are not read).
//   t5like_prefill_attention: ctx[B, T, N, H] for all T queries (an encoder, or a prompt) in the
//   training layouts q [B, T, N, H], k and v [B, S, N, H], bias [B, N, T, S].
//
// XLA:CPU runs the two products as B * N tiny batched dots plus separate softmax passes; here
// each (row, head) is one pass over its keys and one over its values, with a vector exp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"
#include "vector_math.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)

// ctx[16 v0 : 16 (v0 + NV)] = scale * sum_s p[s] values[s]: NV vectors of each value row, with a
// compile-time count so the accumulators stay in registers, two interleaved sums per vector.
template <int NV>
inline void Context(const float* values, const float* p, float* ctx, int64_t H, int64_t S,
                    int64_t v0, __m512 scale) {
  __m512 a[NV], b[NV];
  __mmask16 mask[NV];
  for (int i = 0; i < NV; ++i) {
    mask[i] = Tail(H - 16 * (v0 + i));
    a[i] = b[i] = _mm512_setzero_ps();
  }
  const float* row = values + 16 * v0;
  int64_t s = 0;
  for (; s + 1 < S; s += 2, row += 2 * H) {
    const __m512 p0 = _mm512_set1_ps(p[s]), p1 = _mm512_set1_ps(p[s + 1]);
    for (int i = 0; i < NV; ++i) {
      a[i] = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(mask[i], row + 16 * i), a[i]);
      b[i] = _mm512_fmadd_ps(p1, _mm512_maskz_loadu_ps(mask[i], row + H + 16 * i), b[i]);
    }
  }
  if (s < S) {
    const __m512 p0 = _mm512_set1_ps(p[s]);
    for (int i = 0; i < NV; ++i)
      a[i] = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(mask[i], row + 16 * i), a[i]);
  }
  for (int i = 0; i < NV; ++i)
    _mm512_mask_storeu_ps(ctx + 16 * (v0 + i), mask[i],
                          _mm512_mul_ps(_mm512_add_ps(a[i], b[i]), scale));
}

// Positions [0, S) of a cache whose key rows are `stride` floats apart.
void Head(const float* q, const float* keys, const float* values, const float* bias, float* ctx,
          int64_t H, int64_t S, int64_t stride, float* scores) {
  // Scores, 128 positions at a time: each key row h is read as one contiguous run.
  constexpr int kBlock = 8;
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t s0 = 0; s0 < S; s0 += 16 * kBlock) {
    __m512 acc[kBlock];
    __mmask16 mask[kBlock];
    for (int j = 0; j < kBlock; ++j) {
      int64_t s = s0 + 16 * j;
      mask[j] = s < S ? Tail(S - s) : 0;
      acc[j] = _mm512_maskz_loadu_ps(mask[j], bias + s);
    }
    for (int64_t h = 0; h < H; ++h) {
      __m512 qh = _mm512_set1_ps(q[h]);
      const float* row = keys + h * stride + s0;
      for (int j = 0; j < kBlock; ++j)
        acc[j] = _mm512_fmadd_ps(qh, _mm512_maskz_loadu_ps(mask[j], row + 16 * j), acc[j]);
    }
    for (int j = 0; j < kBlock; ++j) {
      _mm512_mask_storeu_ps(scores + s0 + 16 * j, mask[j], acc[j]);
      top = _mm512_mask_max_ps(top, mask[j], top, acc[j]);
    }
  }
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; s += 16) {
    __mmask16 mask = Tail(S - s);
    __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + s), m));
    e = _mm512_maskz_mov_ps(mask, e);
    _mm512_mask_storeu_ps(scores + s, mask, e);
    total = _mm512_add_ps(total, e);
  }
  const float inv = 1.0f / _mm512_reduce_add_ps(total);
  // Context: value rows weighted and summed, up to 8 vectors of a row at a time.
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t v0 = 0; v0 < (H + 15) / 16; v0 += 8) {
    const int64_t left = (H + 15) / 16 - v0;
    switch (left >= 8 ? 8 : left) {
      case 1: Context<1>(values, scores, ctx, H, S, v0, scale); break;
      case 2: Context<2>(values, scores, ctx, H, S, v0, scale); break;
      case 3: Context<3>(values, scores, ctx, H, S, v0, scale); break;
      case 4: Context<4>(values, scores, ctx, H, S, v0, scale); break;
      case 5: Context<5>(values, scores, ctx, H, S, v0, scale); break;
      case 6: Context<6>(values, scores, ctx, H, S, v0, scale); break;
      case 7: Context<7>(values, scores, ctx, H, S, v0, scale); break;
      default: Context<8>(values, scores, ctx, H, S, v0, scale); break;
    }
  }
}

// QB queries of one (row, head) at once over its keys [H, S] and values [S, H]: each key and value
// vector loaded serves all QB queries, so the pair's K/V (64 KB at H = 64, S = 128: more than L1)
// is streamed from L2 once per QB queries rather than once per query.
template <int QB>
void Queries(const float* const* q, const float* keys, const float* values,
             const float* const* bias, float* const* ctx, int64_t H, int64_t S, float* scores) {
  __m512 top[QB];
  for (int b = 0; b < QB; ++b) top[b] = _mm512_set1_ps(-INFINITY);
  for (int64_t s0 = 0; s0 < S; s0 += 64) {
    __mmask16 mask[4];
    __m512 acc[QB][4];
    for (int j = 0; j < 4; ++j) {
      mask[j] = s0 + 16 * j < S ? Tail(S - s0 - 16 * j) : 0;
      for (int b = 0; b < QB; ++b)
        acc[b][j] = _mm512_maskz_loadu_ps(mask[j], bias[b] + s0 + 16 * j);
    }
    for (int64_t h = 0; h < H; ++h) {
      __m512 kv[4];
      for (int j = 0; j < 4; ++j)
        kv[j] = _mm512_maskz_loadu_ps(mask[j], keys + h * S + s0 + 16 * j);
      for (int b = 0; b < QB; ++b) {
        const __m512 qh = _mm512_set1_ps(q[b][h]);
        for (int j = 0; j < 4; ++j) acc[b][j] = _mm512_fmadd_ps(qh, kv[j], acc[b][j]);
      }
    }
    for (int b = 0; b < QB; ++b)
      for (int j = 0; j < 4; ++j) {
        _mm512_mask_storeu_ps(scores + b * S + s0 + 16 * j, mask[j], acc[b][j]);
        top[b] = _mm512_mask_max_ps(top[b], mask[j], top[b], acc[b][j]);
      }
  }
  __m512 scale[QB];
  for (int b = 0; b < QB; ++b) {
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(top[b]));
    __m512 total = _mm512_setzero_ps();
    float* p = scores + b * S;
    for (int64_t s = 0; s < S; s += 16) {
      const __mmask16 mask = Tail(S - s);
      const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + s), m);
      const __m512 e = _mm512_maskz_mov_ps(mask, Exp(x));
      _mm512_mask_storeu_ps(p + s, mask, e);
      total = _mm512_add_ps(total, e);
    }
    scale[b] = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  }
  for (int64_t v0 = 0; v0 < H; v0 += 64) {
    __mmask16 mask[4];
    __m512 acc[QB][4];
    for (int j = 0; j < 4; ++j) {
      mask[j] = v0 + 16 * j < H ? Tail(H - v0 - 16 * j) : 0;
      for (int b = 0; b < QB; ++b) acc[b][j] = _mm512_setzero_ps();
    }
    for (int64_t s = 0; s < S; ++s) {
      __m512 vv[4];
      for (int j = 0; j < 4; ++j)
        vv[j] = _mm512_maskz_loadu_ps(mask[j], values + s * H + v0 + 16 * j);
      for (int b = 0; b < QB; ++b) {
        const __m512 p = _mm512_set1_ps(scores[b * S + s]);
        for (int j = 0; j < 4; ++j) acc[b][j] = _mm512_fmadd_ps(p, vv[j], acc[b][j]);
      }
    }
    for (int b = 0; b < QB; ++b)
      for (int j = 0; j < 4; ++j)
        _mm512_mask_storeu_ps(ctx[b] + v0 + 16 * j, mask[j], _mm512_mul_ps(acc[b][j], scale[b]));
  }
}

// Queries [t0, T) of one (row, head), QB at a time.
void PrefillHead(const float* q, int64_t q_stride, const float* keys, const float* values,
                 const float* bias, float* ctx, int64_t T, int64_t H, int64_t S, float* scores) {
  constexpr int QB = 4;
  int64_t t = 0;
  for (; t + QB <= T; t += QB) {
    const float* qs[QB];
    const float* bs[QB];
    float* cs[QB];
    for (int b = 0; b < QB; ++b) {
      qs[b] = q + (t + b) * q_stride;
      bs[b] = bias + (t + b) * S;
      cs[b] = ctx + (t + b) * q_stride;
    }
    Queries<QB>(qs, keys, values, bs, cs, H, S, scores);
  }
  for (; t < T; ++t) {
    const float* qs[1] = {q + t * q_stride};
    const float* bs[1] = {bias + t * S};
    float* cs[1] = {ctx + t * q_stride};
    Queries<1>(qs, keys, values, bs, cs, H, S, scores);
  }
}

#else  // Portable loops for CPUs without AVX-512.

void Head(const float* q, const float* keys, const float* values, const float* bias, float* ctx,
          int64_t H, int64_t S, int64_t stride, float* scores) {
  for (int64_t s = 0; s < S; ++s) scores[s] = bias[s];
  for (int64_t h = 0; h < H; ++h)
    for (int64_t s = 0; s < S; ++s) scores[s] += q[h] * keys[h * stride + s];
  float top = *std::max_element(scores, scores + S), total = 0.f;
  for (int64_t s = 0; s < S; ++s) total += (scores[s] = std::exp(scores[s] - top));
  for (int64_t h = 0; h < H; ++h) ctx[h] = 0.f;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h) ctx[h] += scores[s] * values[s * H + h];
  for (int64_t h = 0; h < H; ++h) ctx[h] /= total;
}


// Queries [0, T) of one (row, head), one at a time.
void PrefillHead(const float* q, int64_t q_stride, const float* keys, const float* values,
                 const float* bias, float* ctx, int64_t T, int64_t H, int64_t S, float* scores) {
  for (int64_t t = 0; t < T; ++t)
    Head(q + t * q_stride, keys, values, bias + t * S, ctx + t * q_stride, H, S, S, scores);
}

#endif

// Shape checks shared by both handlers; B, N, H, S from q and keys.
ffi::Error CheckShapes(const char* name, ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& keys,
                       ffi::Buffer<ffi::F32>& values, ffi::Buffer<ffi::F32>& bias) {
  auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(),
       bd = bias.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || bd.size() != 3)
    return ffi::Error::InvalidArgument(std::string(name) +
        ": want q [B,N,H], keys [B,N,H,S], values [B,N,S,H], bias [B,N,S]");
  const int64_t B = qd[0], N = qd[1], H = qd[2], S = kd[3];
  if (kd[0] != B || kd[1] != N || kd[2] != H || vd[0] != B || vd[1] != N || vd[2] != S ||
      vd[3] != H || bd[0] != B || bd[1] != N || bd[2] != S)
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": shapes of q, keys, values and bias disagree");
  return ffi::Error::Success();
}

// Runs head(i) for the B * N (row, head) pairs, on one thread below ~1 MB of K/V read (waking a
// helper costs more than that).
template <typename F>
void ForHeads(ffi::ThreadPool& pool, int64_t heads, int64_t bytes, F head) {
  const int64_t chunks = bytes < (1 << 20) ? 1 : std::min<int64_t>(heads, 4 * pool.num_threads());
  const int64_t per = (heads + chunks - 1) / chunks;
  t5like::ParallelFor(pool, (heads + per - 1) / per, [&](int64_t c) {
    for (int64_t i = c * per; i < std::min(heads, (c + 1) * per); ++i) head(i);
  });
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> ctx) {
  if (auto e = CheckShapes("t5like_decode_attention", q, keys, values, bias); e.failure())
    return e;
  const int64_t B = q.dimensions()[0], N = q.dimensions()[1], H = q.dimensions()[2],
                S = keys.dimensions()[3];
  const float *qp = q.typed_data(), *kp = keys.typed_data(), *vp = values.typed_data(),
              *bp = bias.typed_data();
  float* out = ctx->typed_data();
  ForHeads(pool, B * N, B * N * S * H * 8, [&](int64_t i) {
    thread_local std::vector<float> scores;
    scores.resize(S);
    Head(qp + i * H, kp + i * H * S, vp + i * S * H, bp + i * S, out + i * H, H, S, S,
         scores.data());
  });
  return ffi::Error::Success();
}

ffi::Error PrefillAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                            ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> ctx) {
  auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions(), bd = bias.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 4)
    return ffi::Error::InvalidArgument(
        "t5like_prefill_attention: want q [B,T,N,H], k and v [B,S,N,H], bias [B,N,T,S]");
  const int64_t B = qd[0], T = qd[1], N = qd[2], H = qd[3], S = kd[1];
  if (kd[0] != B || kd[2] != N || kd[3] != H || vd[0] != B || vd[1] != S || vd[2] != N ||
      vd[3] != H || bd[0] != B || bd[1] != N || bd[2] != T || bd[3] != S)
    return ffi::Error::InvalidArgument("t5like_prefill_attention: shapes of q, k, v and bias "
                                       "disagree");
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *bp = bias.typed_data();
  float* out = ctx->typed_data();
  // One (row, head) per task: its keys transposed to [H, S] and values gathered to [S, H] once,
  // then one pass per query over those (in L1/L2) as in a decoding step.
  const int64_t heads = B * N;
  const int64_t chunks = std::min<int64_t>(heads, 4 * pool.num_threads());
  const int64_t per = (heads + chunks - 1) / chunks;
  t5like::ParallelFor(pool, (heads + per - 1) / per, [&](int64_t c) {
    std::vector<float> keys(H * S), values(S * H), scores(4 * S);
    for (int64_t i = c * per; i < std::min(heads, (c + 1) * per); ++i) {
      const int64_t b = i / N, n = i % N;
      for (int64_t s = 0; s < S; ++s) {
        const float* kr = kp + ((b * S + s) * N + n) * H;
        for (int64_t h = 0; h < H; ++h) keys[h * S + s] = kr[h];
        std::copy_n(vp + ((b * S + s) * N + n) * H, H, values.data() + s * H);
      }
      PrefillHead(qp + (b * T * N + n) * H, N * H, keys.data(), values.data(),
                  bp + (b * N + n) * T * S, out + (b * T * N + n) * H, T, H, S, scores.data());
    }
  });
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionCached(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                                 ffi::Buffer<ffi::F32> new_keys, ffi::Buffer<ffi::F32> new_values,
                                 ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                                 ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::S32> index,
                                 ffi::ResultBuffer<ffi::F32> ctx,
                                 ffi::ResultBuffer<ffi::F32> keys_out,
                                 ffi::ResultBuffer<ffi::F32> values_out) {
  if (auto e = CheckShapes("t5like_decode_attention_cached", q, keys, values, bias); e.failure())
    return e;
  const int64_t B = q.dimensions()[0], N = q.dimensions()[1], H = q.dimensions()[2],
                S = keys.dimensions()[3];
  const auto count = [](auto& buffer) { return static_cast<int64_t>(buffer.element_count()); };
  if (count(new_keys) != B * N * H || count(new_values) != B * N * H || count(index) != B)
    return ffi::Error::InvalidArgument(
        "t5like_decode_attention_cached: want new keys and values [B,N,H] and index [B]");
  float *kc = keys_out->typed_data(), *vc = values_out->typed_data();
  // The outputs alias the cache inputs; copy only if XLA gave separate buffers.
  if (kc != keys.typed_data()) std::copy_n(keys.typed_data(), keys.element_count(), kc);
  if (vc != values.typed_data()) std::copy_n(values.typed_data(), values.element_count(), vc);
  const float *qp = q.typed_data(), *kn = new_keys.typed_data(), *vn = new_values.typed_data(),
              *bp = bias.typed_data();
  const int32_t* ip = index.typed_data();
  float* out = ctx->typed_data();
  ForHeads(pool, B * N, B * N * S * H * 8, [&](int64_t i) {
    const int64_t pos = ip[i / N];
    float *krow = kc + i * H * S, *vrow = vc + i * S * H;
    if (pos >= 0 && pos < S) {   // a position past the end is dropped, as XLA's scatter does
      for (int64_t h = 0; h < H; ++h) krow[h * S + pos] = kn[i * H + h];
      std::copy_n(vn + i * H, H, vrow + pos * H);
    }
    const int64_t used = std::clamp<int64_t>(pos + 1, 1, S);
    thread_local std::vector<float> scores;
    scores.resize(S);
    Head(qp + i * H, krow, vrow, bp + i * S, out + i * H, H, used, S, scores.data());
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_decode_attention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_decode_attention_cached, DecodeAttentionCached,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_prefill_attention, PrefillAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
