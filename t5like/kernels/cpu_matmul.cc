// Few-row float32 matmul against a panel-packed weight, for decoding on CPU (an XLA FFI handler).
//
//   t5like_matmul_packed: y_i[M, N_i] = x[M, K] @ W_i[K, N_i] for one or more weights, each given
//   as panels [N_i / 32, K, 32] (panels[p, k, j] = W[k, 32 p + j]).
//
// With few rows this is bound by streaming W. A row-major [K, N] weight read a column block at a
// time is a short strided run per row, which the hardware prefetcher does not follow: XLA's dot and
// a register-blocked kernel on it both stream at 6-10 GB/s with 8 rows. A panel is one contiguous
// run, prefetched ahead in software, and all M rows are accumulated in registers over all of K.
#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;   // floats per panel row: two 16-lane vectors
constexpr int64_t kMaxRows = 32;

#if defined(__AVX512F__)

// y[0:MR, 32 p0 : 32 (p0 + G)] from G adjacent panels (one contiguous run of G * K * 32 floats).
template <int MR, int G>
void Panels(const float* x, const float* panels, float* y, int64_t K, int64_t N, int64_t p0) {
  // Panel rows prefetched ahead into L1, and with several rows per weight load (when the
  // hardware prefetcher alone leaves the FMAs waiting) further ahead into L2.
  constexpr int kAhead = MR > 2 ? 8 : 16, kAheadL2 = 48;
  __m512 acc[MR][2 * G];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2 * G; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* base = panels + p0 * K * kPanel;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[2 * G];
    for (int g = 0; g < G; ++g) {
      const float* row = base + (g * K + k) * kPanel;
      if (MR > 2 && k + kAheadL2 < K) {
        _mm_prefetch(reinterpret_cast<const char*>(row + kAheadL2 * kPanel), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(row + kAheadL2 * kPanel + 16), _MM_HINT_T1);
      }
      if (k + kAhead < K) {
        _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * kPanel), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * kPanel + 16), _MM_HINT_T0);
      }
      wv[2 * g] = _mm512_loadu_ps(row);
      wv[2 * g + 1] = _mm512_loadu_ps(row + 16);
    }
    for (int m = 0; m < MR; ++m) {
      __m512 xb = _mm512_set1_ps(x[m * K + k]);
      for (int v = 0; v < 2 * G; ++v) acc[m][v] = _mm512_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2 * G; ++v) _mm512_storeu_ps(y + m * N + p0 * kPanel + 16 * v, acc[m][v]);
}

// Panels per pass: MR x 2G accumulators stay within 16 of the 32 vector registers.
template <int MR> constexpr int Group() { return MR <= 2 ? 4 : MR <= 4 ? 2 : 1; }

template <int MR = 1>
void RowGroup(int64_t rows, const float* x, const float* panels, float* y, int64_t K, int64_t N,
              int64_t p0, int64_t count) {
  if constexpr (MR <= 8) {
    if (rows != MR) return RowGroup<MR + 1>(rows, x, panels, y, K, N, p0, count);
    constexpr int G = Group<MR>();
    int64_t p = p0;
    for (; p + G <= p0 + count; p += G) Panels<MR, G>(x, panels, y, K, N, p);
    for (; p < p0 + count; ++p) Panels<MR, 1>(x, panels, y, K, N, p);
  }
}

// Rows in groups of up to 8 over the same panels (re-read from cache after the first group).
void PanelRange(int64_t M, const float* x, const float* panels, float* y, int64_t K, int64_t N,
                int64_t p0, int64_t count) {
  for (int64_t m = 0; m < M; m += 8)
    RowGroup(std::min<int64_t>(8, M - m), x + m * K, panels, y + m * N, K, N, p0, count);
}

#else  // Portable loops for CPUs without AVX-512, left to the compiler's vectoriser.

void PanelRange(int64_t M, const float* x, const float* panels, float* y, int64_t K, int64_t N,
                int64_t p0, int64_t count) {
  for (int64_t p = p0; p < p0 + count; ++p) {
    const float* panel = panels + p * K * kPanel;
    for (int64_t m = 0; m < M; ++m) {
      float acc[kPanel] = {};
      for (int64_t k = 0; k < K; ++k) {
        const float xk = x[m * K + k];
#pragma omp simd
        for (int64_t j = 0; j < kPanel; ++j) acc[j] += xk * panel[k * kPanel + j];
      }
      std::copy(acc, acc + kPanel, y + m * N + p * kPanel);
    }
  }
}

#endif

// One weight's share of a call: panels [p0, p0 + count) of weight w.
struct Piece {
  const float* panels;
  float* y;
  int64_t n, p0, count;
};

ffi::Error MatmulPacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs weights,
                        ffi::RemainingRets outs) {
  auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("t5like_matmul_packed: x must be [M, K]");
  const int64_t M = xd[0], K = xd[1];
  if (M < 1 || M > kMaxRows)
    return ffi::Error::InvalidArgument("t5like_matmul_packed: x must have 1 to 32 rows");
  if (weights.size() < 1 || weights.size() != outs.size())
    return ffi::Error::InvalidArgument("t5like_matmul_packed: want one result per weight");
  // Weights that share the input run as one parallel loop: one call, one wake-up of the pool.
  std::vector<Piece> whole;
  int64_t total = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    auto w = weights.get<ffi::Buffer<ffi::F32>>(i);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!w.has_value() || !y.has_value())
      return ffi::Error::InvalidArgument("t5like_matmul_packed: weights must be float32");
    auto pd = w->dimensions();
    if (pd.size() != 3 || pd[2] != kPanel || pd[1] != K)
      return ffi::Error::InvalidArgument("t5like_matmul_packed: a weight is not [N/32, K, 32]");
    whole.push_back({w->typed_data(), (*y)->typed_data(), pd[0] * kPanel, 0, pd[0]});
    total += pd[0];
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // About 8 chunks per worker to even out the load, each at least 4 panels (64 KB at K = 512).
  const int64_t chunks = std::clamp<int64_t>(total / 4, 1, 8 * workers);
  const int64_t per = (total + chunks - 1) / chunks;
  std::vector<Piece> pieces;
  for (const Piece& w : whole)
    for (int64_t p0 = 0; p0 < w.count; p0 += per)
      pieces.push_back({w.panels, w.y, w.n, p0, std::min(per, w.count - p0)});
  const float* xp = x.typed_data();
  t5like::ParallelFor(pool, static_cast<int64_t>(pieces.size()), [&](int64_t c) {
    const Piece& p = pieces[c];
    PanelRange(M, xp, p.panels, p.y, K, p.n, p.p0, p.count);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_matmul_packed, MatmulPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
