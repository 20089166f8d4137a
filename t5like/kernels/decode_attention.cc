// One-query attention over a KV cache, for decoding on CPU (an XLA FFI handler).
//
//   t5like_decode_attention: ctx[B, N, H] = softmax(q . k + bias) . v
//   q [B, N, H], keys [B, N, H, S], values [B, N, S, H], bias [B, N, S] (masks folded in).
//
// XLA:CPU runs the two products as B * N tiny batched dots plus separate softmax passes; here
// each (row, head) is one pass over its keys and one over its values, with a vector exp.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)

inline __mmask16 Tail(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// exp(x) for float32 lanes: Cephes' polynomial on x - n ln 2, scaled by 2^n; 0 below -87.
inline __m512 Exp(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.0f);
  __mmask16 underflow = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~underflow), p, n);
}

void Head(const float* q, const float* keys, const float* values, const float* bias, float* ctx,
          int64_t H, int64_t S, float* scores) {
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
      const float* row = keys + h * S + s0;
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
  // Context: value rows weighted and summed, two interleaved accumulators per vector.
  const int64_t vecs = (H + 15) / 16;
  for (int64_t v0 = 0; v0 < vecs; v0 += 8) {
    const int nv = static_cast<int>(std::min<int64_t>(8, vecs - v0));
    __m512 a[8], b[8];
    __mmask16 mask[8];
    for (int i = 0; i < nv; ++i) {
      mask[i] = Tail(H - 16 * (v0 + i));
      a[i] = b[i] = _mm512_setzero_ps();
    }
    int64_t s = 0;
    for (; s + 1 < S; s += 2) {
      __m512 p0 = _mm512_set1_ps(scores[s]), p1 = _mm512_set1_ps(scores[s + 1]);
      const float* r0 = values + s * H + 16 * v0;
      const float* r1 = r0 + H;
      for (int i = 0; i < nv; ++i) {
        a[i] = _mm512_fmadd_ps(p0, _mm512_maskz_loadu_ps(mask[i], r0 + 16 * i), a[i]);
        b[i] = _mm512_fmadd_ps(p1, _mm512_maskz_loadu_ps(mask[i], r1 + 16 * i), b[i]);
      }
    }
    if (s < S) {
      __m512 p0 = _mm512_set1_ps(scores[s]);
      for (int i = 0; i < nv; ++i)
        a[i] = _mm512_fmadd_ps(
            p0, _mm512_maskz_loadu_ps(mask[i], values + s * H + 16 * (v0 + i)), a[i]);
    }
    const __m512 scale = _mm512_set1_ps(inv);
    for (int i = 0; i < nv; ++i)
      _mm512_mask_storeu_ps(ctx + 16 * (v0 + i), mask[i],
                            _mm512_mul_ps(_mm512_add_ps(a[i], b[i]), scale));
  }
}

#else  // Portable loops for CPUs without AVX-512.

void Head(const float* q, const float* keys, const float* values, const float* bias, float* ctx,
          int64_t H, int64_t S, float* scores) {
  for (int64_t s = 0; s < S; ++s) scores[s] = bias[s];
  for (int64_t h = 0; h < H; ++h)
    for (int64_t s = 0; s < S; ++s) scores[s] += q[h] * keys[h * S + s];
  float top = *std::max_element(scores, scores + S), total = 0.f;
  for (int64_t s = 0; s < S; ++s) total += (scores[s] = std::exp(scores[s] - top));
  for (int64_t h = 0; h < H; ++h) ctx[h] = 0.f;
  for (int64_t s = 0; s < S; ++s)
    for (int64_t h = 0; h < H; ++h) ctx[h] += scores[s] * values[s * H + h];
  for (int64_t h = 0; h < H; ++h) ctx[h] /= total;
}

#endif

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                           ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> values,
                           ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> ctx) {
  auto qd = q.dimensions(), kd = keys.dimensions(), vd = values.dimensions(),
       bd = bias.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || vd.size() != 4 || bd.size() != 3)
    return ffi::Error::InvalidArgument(
        "t5like_decode_attention: want q [B,N,H], keys [B,N,H,S], values [B,N,S,H], bias [B,N,S]");
  const int64_t B = qd[0], N = qd[1], H = qd[2], S = kd[3];
  if (kd[0] != B || kd[1] != N || kd[2] != H || vd[0] != B || vd[1] != N || vd[2] != S ||
      vd[3] != H || bd[0] != B || bd[1] != N || bd[2] != S)
    return ffi::Error::InvalidArgument("t5like_decode_attention: shapes of q, keys, values and "
                                       "bias disagree");
  const float *qp = q.typed_data(), *kp = keys.typed_data(), *vp = values.typed_data(),
              *bp = bias.typed_data();
  float* out = ctx->typed_data();
  const int64_t heads = B * N;
  // Waking a helper costs more than a small cache read: below ~1 MB of K/V stay on one thread.
  const int64_t bytes = heads * S * H * 8;
  const int64_t chunks = bytes < (1 << 20) ? 1 : std::min<int64_t>(heads, 4 * pool.num_threads());
  const int64_t per = (heads + chunks - 1) / chunks;
  t5like::ParallelFor(pool, (heads + per - 1) / per, [&](int64_t c) {
    std::vector<float> scores(S);
    for (int64_t i = c * per; i < std::min(heads, (c + 1) * per); ++i)
      Head(qp + i * H, kp + i * H * S, vp + i * S * H, bp + i * S, out + i * H, H, S,
           scores.data());
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
