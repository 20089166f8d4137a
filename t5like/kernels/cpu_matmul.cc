// Few-row float32 matmul against a panel-packed weight, for decoding on CPU (an XLA FFI handler).
//
//   t5like_matmul_packed: y[M, N] = x[M, K] @ W[K, N], with W given as panels [N / 32, K, 32]
//   (panels[p, k, j] = W[k, 32 p + j]).
//
// With few rows this is bound by streaming W. A row-major [K, N] weight read a column block at a
// time is a short strided run per row, which the hardware prefetcher does not follow: XLA's dot and
// a register-blocked kernel on it both stream at 6-10 GB/s with 8 rows. A panel is one contiguous
// run, prefetched ahead in software, and all M rows are accumulated in registers over all of K.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;   // floats per panel row: two 16-lane vectors
constexpr int64_t kMaxRows = 32;

// Runs body(chunk) for chunk in [0, chunks) on the caller and helpers from the pool. Helpers that
// start late find no chunk left and touch nothing, so the caller never waits on a busy pool.
void ParallelFor(ffi::ThreadPool& pool, int64_t chunks, const std::function<void(int64_t)>& body) {
  struct Job {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    const std::function<void(int64_t)>* body;
    int64_t chunks;
  };
  auto job = std::make_shared<Job>();
  job->body = &body;
  job->chunks = chunks;
  auto work = [](Job* j) {
    for (int64_t c; (c = j->next.fetch_add(1, std::memory_order_relaxed)) < j->chunks;) {
      (*j->body)(c);
      j->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job, work] { work(job.get()); });
  work(job.get());
  while (job->done.load(std::memory_order_acquire) < chunks) std::this_thread::yield();
}

#if defined(__AVX512F__)

// y[0:MR, 32 p0 : 32 (p0 + G)] from G adjacent panels (one contiguous run of G * K * 32 floats).
template <int MR, int G>
void Panels(const float* x, const float* panels, float* y, int64_t K, int64_t N, int64_t p0) {
  constexpr int kAhead = 16;    // panel rows prefetched ahead: 2 KB per panel stream
  __m512 acc[MR][2 * G];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2 * G; ++v) acc[m][v] = _mm512_setzero_ps();
  const float* base = panels + p0 * K * kPanel;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[2 * G];
    for (int g = 0; g < G; ++g) {
      const float* row = base + (g * K + k) * kPanel;
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

ffi::Error MatmulPacked(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto pd = panels.dimensions();
  if (xd.size() != 2 || pd.size() != 3 || pd[2] != kPanel)
    return ffi::Error::InvalidArgument("t5like_matmul_packed: x must be [M, K], w [N/32, K, 32]");
  const int64_t M = xd[0], K = xd[1], P = pd[0], N = P * kPanel;
  if (pd[1] != K) return ffi::Error::InvalidArgument("t5like_matmul_packed: K of x and w differ");
  if (M < 1 || M > kMaxRows)
    return ffi::Error::InvalidArgument("t5like_matmul_packed: x must have 1 to 32 rows");
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // About 8 chunks per worker to even out the load, each at least 4 panels (64 KB at K = 512).
  const int64_t chunks = std::clamp<int64_t>(P / 4, 1, 8 * workers);
  const int64_t per = (P + chunks - 1) / chunks;
  const float* xp = x.typed_data();
  const float* wp = panels.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, (P + per - 1) / per, [&](int64_t c) {
    int64_t p0 = c * per;
    PanelRange(M, xp, wp, yp, K, N, p0, std::min(per, P - p0));
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_matmul_packed, MatmulPacked,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
