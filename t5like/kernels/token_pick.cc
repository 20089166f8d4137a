// Greedy token choice for decoding on CPU (an XLA FFI handler).
//
//   t5like_greedy_pick: logits [B, V] -> token [B] (the first index of the row's maximum; 0 for a
//   row holding NaN) and its log-probability [B] (logit - logsumexp of the row).
//
// XLA:CPU runs argmax, the log-softmax sum and the gather as separate passes over [B, V] plus a
// copy of the logits; here it is one pass for the maximum and one for the sum of exponentials.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"
#include "vector_math.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)

void PickRow(const float* x, int64_t V, int32_t* token, float* logp) {
  __m512 top = _mm512_set1_ps(-INFINITY);
  __m512i at = _mm512_set1_epi32(0), lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,
                                                             11, 12, 13, 14, 15);
  __mmask16 nan = 0, seen = 0;
  for (int64_t v = 0; v < V; v += 16) {
    const __mmask16 m = Tail(V - v);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + v);
    nan |= _mm512_mask_cmp_ps_mask(m, xv, xv, _CMP_UNORD_Q);
    // Strictly greater keeps each lane's first maximum; `seen` admits a row of -inf.
    const __mmask16 up = _mm512_mask_cmp_ps_mask(m, xv, top, _CMP_GT_OQ) | (m & ~seen);
    seen |= m;
    top = _mm512_mask_mov_ps(top, up, xv);
    at = _mm512_mask_mov_epi32(at, up, _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(v))));
  }
  if (nan) {
    *token = 0;
    *logp = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const float best = _mm512_mask_reduce_max_ps(seen, top);
  const __mmask16 ties = _mm512_mask_cmp_ps_mask(seen, top, _mm512_set1_ps(best), _CMP_EQ_OQ);
  *token = _mm512_mask_reduce_min_epi32(ties, at);
  const __m512 b = _mm512_set1_ps(best);
  __m512 total = _mm512_setzero_ps();
  for (int64_t v = 0; v < V; v += 16) {
    const __mmask16 m = Tail(V - v);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, Exp(_mm512_sub_ps(
                                                            _mm512_maskz_loadu_ps(m, x + v), b))));
  }
  *logp = -std::log(_mm512_reduce_add_ps(total));
}

#else  // Portable loops for CPUs without AVX-512.

void PickRow(const float* x, int64_t V, int32_t* token, float* logp) {
  int64_t arg = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (std::isnan(x[v])) {
      *token = 0;
      *logp = std::numeric_limits<float>::quiet_NaN();
      return;
    }
    if (x[v] > x[arg]) arg = v;
  }
  float total = 0.f;
  for (int64_t v = 0; v < V; ++v) total += std::exp(x[v] - x[arg]);
  *token = static_cast<int32_t>(arg);
  *logp = -std::log(total);
}

#endif

ffi::Error GreedyPick(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                      ffi::ResultBuffer<ffi::S32> token, ffi::ResultBuffer<ffi::F32> logp) {
  auto d = logits.dimensions();
  if (d.size() != 2 || d[1] < 1)
    return ffi::Error::InvalidArgument("t5like_greedy_pick: logits must be [B, V] with V >= 1");
  const int64_t B = d[0], V = d[1];
  const float* x = logits.typed_data();
  int32_t* tp = token->typed_data();
  float* lp = logp->typed_data();
  // Rows in two halves when there is enough to read to be worth a helper's wake-up.
  const int64_t chunks = B > 1 && B * V >= (1 << 17) ? 2 : 1;
  const int64_t per = (B + chunks - 1) / chunks;
  t5like::ParallelFor(pool, chunks, [&](int64_t c) {
    for (int64_t b = c * per; b < std::min(B, (c + 1) * per); ++b)
      PickRow(x + b * V, V, tp + b, lp + b);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_greedy_pick, GreedyPick,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
