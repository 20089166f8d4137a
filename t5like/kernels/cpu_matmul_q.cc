// Few-row matmul against int8 / int4 weights packed as panels, dequantised in registers (XLA FFI).
//
//   t5like_matmul_q8: y_i[M, N_i] = (x[M, K] @ Q_i[K, N_i]) * s_i[N_i] for one or more weights,
//     each given as int8 panels [N_i / 32, K, 32] (panels[p, k, j] = Q[k, 32 p + j]) and a float32
//     scale per output column [N_i].
//   t5like_matmul_q4: y_i[M, N_i] = sum_g (x[:, g] @ Q_i[g, :]) * s_i[g, :] over groups g of G
//     consecutive k, each weight given as uint8 panels [N_i / 32, K / 2, 32] holding two signed
//     4-bit values a byte (k = 2r in the low nibble, 2r + 1 in the high one) and float32 scales
//     [K / G, N_i]; G = K / scales.shape[0].
//
// At batch 1 decoding streams the weights, so the bytes read per token set the speed: int8 panels
// are a quarter of float32's, int4 an eighth. Each weight row is read once for all M rows, widened
// to float32 in registers (int8: one sign-extending load and a convert; int4: one zero-extending
// load per 16 bytes and a 16-entry table lookup per nibble, no convert), and FMA'd into float32
// accumulators; the int8 scale is applied once per output at the end, the int4 scales once per
// group (the sums of a group are kept apart, then scaled and added).
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"
#include "parallel_for.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 32;   // columns per panel: two 16-lane vectors
constexpr int64_t kMaxRows = 32;

#if defined(__AVX512F__)

inline __m512 WidenS8(const int8_t* p) {   // 16 int8 -> 16 float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// y[0:MR, 32 p0 : 32 (p0 + G)] from G adjacent int8 panels.
template <int MR, int G>
void PanelsQ8(const float* x, const int8_t* panels, const float* scale, float* y, int64_t K,
              int64_t N, int64_t p0) {
  constexpr int kAhead = 16;   // panel rows (32 bytes each) prefetched ahead
  __m512 acc[MR][2 * G];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2 * G; ++v) acc[m][v] = _mm512_setzero_ps();
  const int8_t* base = panels + p0 * K * kPanel;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[2 * G];
    for (int g = 0; g < G; ++g) {
      const int8_t* row = base + (g * K + k) * kPanel;
      if ((k & 1) == 0 && k + kAhead < K)   // two rows a cache line
        _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * kPanel), _MM_HINT_T0);
      wv[2 * g] = WidenS8(row);
      wv[2 * g + 1] = WidenS8(row + 16);
    }
    for (int m = 0; m < MR; ++m) {
      __m512 xb = _mm512_set1_ps(x[m * K + k]);
      for (int v = 0; v < 2 * G; ++v) acc[m][v] = _mm512_fmadd_ps(xb, wv[v], acc[m][v]);
    }
  }
  for (int v = 0; v < 2 * G; ++v) {
    __m512 s = _mm512_loadu_ps(scale + p0 * kPanel + 16 * v);
    for (int m = 0; m < MR; ++m)
      _mm512_storeu_ps(y + m * N + p0 * kPanel + 16 * v, _mm512_mul_ps(acc[m][v], s));
  }
}

// y[0:MR, 32 p0 : 32 (p0 + G)] from G adjacent int4 panels with scales per group of `group` k.
template <int MR, int G>
void PanelsQ4(const float* x, const uint8_t* panels, const float* scale, float* y, int64_t K,
              int64_t N, int64_t p0, int64_t group) {
  constexpr int kAhead = 16;
  const int64_t R = K / 2;   // byte rows
  // A nibble's signed value by table lookup: vpermps reads only the low 4 bits of each index.
  const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1);
  __m512 acc[MR][2 * G];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2 * G; ++v) acc[m][v] = _mm512_setzero_ps();
  const uint8_t* base = panels + p0 * R * kPanel;
  // Up to 4 rows, a group's sums are kept apart and scaled once; with more, those would not fit
  // in registers beside the totals, and the widened weights are scaled instead.
  constexpr bool kScaleWeights = MR > 4;
  constexpr int P = kScaleWeights ? 1 : MR;
  for (int64_t k0 = 0; k0 < K; k0 += group) {
    const float* s_row = scale + (k0 / group) * N + p0 * kPanel;
    __m512 s[2 * G];
    for (int v = 0; v < 2 * G; ++v) s[v] = _mm512_loadu_ps(s_row + 16 * v);
    __m512 part[P][2 * G];
    for (int m = 0; m < P; ++m)
      for (int v = 0; v < 2 * G; ++v) part[m][v] = _mm512_setzero_ps();
    for (int64_t r = k0 / 2; r < (k0 + group) / 2; ++r) {
      __m512 lo[2 * G], hi[2 * G];
      for (int g = 0; g < G; ++g) {
        const uint8_t* row = base + (g * R + r) * kPanel;
        if ((r & 1) == 0 && r + kAhead < R)
          _mm_prefetch(reinterpret_cast<const char*>(row + kAhead * kPanel), _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {
          __m512i b = _mm512_cvtepu8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * h)));
          lo[2 * g + h] = _mm512_permutexvar_ps(b, values);
          hi[2 * g + h] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), values);
          if constexpr (kScaleWeights) {
            lo[2 * g + h] = _mm512_mul_ps(lo[2 * g + h], s[2 * g + h]);
            hi[2 * g + h] = _mm512_mul_ps(hi[2 * g + h], s[2 * g + h]);
          }
        }
      }
      for (int m = 0; m < MR; ++m) {
        __m512 x0 = _mm512_set1_ps(x[m * K + 2 * r]), x1 = _mm512_set1_ps(x[m * K + 2 * r + 1]);
        __m512* into = kScaleWeights ? acc[m] : part[m % P];
        for (int v = 0; v < 2 * G; ++v) {
          into[v] = _mm512_fmadd_ps(x0, lo[v], into[v]);
          into[v] = _mm512_fmadd_ps(x1, hi[v], into[v]);
        }
      }
    }
    if constexpr (!kScaleWeights)
      for (int v = 0; v < 2 * G; ++v)
        for (int m = 0; m < P; ++m) acc[m][v] = _mm512_fmadd_ps(part[m][v], s[v], acc[m][v]);
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < 2 * G; ++v) _mm512_storeu_ps(y + m * N + p0 * kPanel + 16 * v, acc[m][v]);
}

// Panels per pass, keeping accumulators and widened weights within the 32 vector registers.
template <int MR, bool Q4> constexpr int Group() {
  return Q4 ? (MR <= 2 ? 2 : 1) : (MR <= 2 ? 4 : MR <= 4 ? 2 : 1);
}

template <bool Q4, int MR = 1>
void RowGroup(int64_t rows, const float* x, const void* panels, const float* scale, float* y,
              int64_t K, int64_t N, int64_t p0, int64_t count, int64_t group) {
  if constexpr (MR <= 8) {
    if (rows != MR)
      return RowGroup<Q4, MR + 1>(rows, x, panels, scale, y, K, N, p0, count, group);
    constexpr int G = Group<MR, Q4>();
    int64_t p = p0;
    if constexpr (Q4) {
      auto w = static_cast<const uint8_t*>(panels);
      for (; p + G <= p0 + count; p += G) PanelsQ4<MR, G>(x, w, scale, y, K, N, p, group);
      for (; p < p0 + count; ++p) PanelsQ4<MR, 1>(x, w, scale, y, K, N, p, group);
    } else {
      auto w = static_cast<const int8_t*>(panels);
      for (; p + G <= p0 + count; p += G) PanelsQ8<MR, G>(x, w, scale, y, K, N, p);
      for (; p < p0 + count; ++p) PanelsQ8<MR, 1>(x, w, scale, y, K, N, p);
    }
  }
}

// Rows in groups of up to 8 over the same panels (re-read from cache after the first group).
template <bool Q4>
void PanelRange(int64_t M, const float* x, const void* panels, const float* scale, float* y,
                int64_t K, int64_t N, int64_t p0, int64_t count, int64_t group) {
  for (int64_t m = 0; m < M; m += 8)
    RowGroup<Q4>(std::min<int64_t>(8, M - m), x + m * K, panels, scale, y + m * N, K, N, p0,
                 count, group);
}

#else  // Portable loops for CPUs without AVX-512, left to the compiler's vectoriser.

template <bool Q4>
void PanelRange(int64_t M, const float* x, const void* panels, const float* scale, float* y,
                int64_t K, int64_t N, int64_t p0, int64_t count, int64_t group) {
  for (int64_t p = p0; p < p0 + count; ++p) {
    for (int64_t m = 0; m < M; ++m) {
      float acc[kPanel] = {};
      if constexpr (Q4) {
        const uint8_t* panel = static_cast<const uint8_t*>(panels) + p * (K / 2) * kPanel;
        for (int64_t k0 = 0; k0 < K; k0 += group) {
          float part[kPanel] = {};
          for (int64_t r = k0 / 2; r < (k0 + group) / 2; ++r) {
            const float x0 = x[m * K + 2 * r], x1 = x[m * K + 2 * r + 1];
#pragma omp simd
            for (int64_t j = 0; j < kPanel; ++j) {
              const int8_t b = static_cast<int8_t>(panel[r * kPanel + j]);
              const int lo = static_cast<int8_t>(static_cast<uint8_t>(b << 4)) >> 4, hi = b >> 4;
              part[j] += x0 * static_cast<float>(lo) + x1 * static_cast<float>(hi);
            }
          }
          const float* s = scale + (k0 / group) * N + p * kPanel;
          for (int64_t j = 0; j < kPanel; ++j) acc[j] += part[j] * s[j];
        }
      } else {
        const int8_t* panel = static_cast<const int8_t*>(panels) + p * K * kPanel;
        for (int64_t k = 0; k < K; ++k) {
          const float xk = x[m * K + k];
#pragma omp simd
          for (int64_t j = 0; j < kPanel; ++j) acc[j] += xk * static_cast<float>(panel[k * kPanel + j]);
        }
        for (int64_t j = 0; j < kPanel; ++j) acc[j] *= scale[p * kPanel + j];
      }
      std::copy(acc, acc + kPanel, y + m * N + p * kPanel);
    }
  }
}

#endif

// One weight's share of a call: panels [p0, p0 + count) of weight w.
struct Piece {
  const void* panels;
  const float* scale;
  float* y;
  int64_t n, p0, count, group;
};

template <bool Q4>
ffi::Error MatmulQuant(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingArgs args,
                       ffi::RemainingRets outs) {
  const char* name = Q4 ? "t5like_matmul_q4" : "t5like_matmul_q8";
  auto fail = [&](const char* what) {
    return ffi::Error::InvalidArgument(std::string(name) + ": " + what);
  };
  auto xd = x.dimensions();
  if (xd.size() != 2) return fail("x must be [M, K]");
  const int64_t M = xd[0], K = xd[1];
  if (M < 1 || M > kMaxRows) return fail("x must have 1 to 32 rows");
  if (outs.size() < 1 || args.size() != 2 * outs.size())
    return fail("want (panels, scales) per weight and one result per weight");
  std::vector<Piece> whole;
  int64_t total = 0;
  for (size_t i = 0; i < outs.size(); ++i) {
    auto s = args.get<ffi::Buffer<ffi::F32>>(2 * i + 1);
    auto y = outs.get<ffi::Buffer<ffi::F32>>(i);
    if (!s.has_value() || !y.has_value()) return fail("scales and results must be float32");
    auto sd = s->dimensions();
    const void* data;
    int64_t panels, group = K;
    if constexpr (Q4) {
      auto w = args.get<ffi::Buffer<ffi::U8>>(2 * i);
      if (!w.has_value()) return fail("int4 panels must be uint8");
      auto pd = w->dimensions();
      if (pd.size() != 3 || pd[2] != kPanel || 2 * pd[1] != K)
        return fail("a weight is not [N/32, K/2, 32]");
      if (sd.size() != 2 || sd[1] != pd[0] * kPanel || sd[0] < 1 || K % sd[0] ||
          (K / sd[0]) % 2)
        return fail("scales are not [K/G, N] with an even group size G dividing K");
      data = w->typed_data();
      panels = pd[0];
      group = K / sd[0];
    } else {
      auto w = args.get<ffi::Buffer<ffi::S8>>(2 * i);
      if (!w.has_value()) return fail("int8 panels must be int8");
      auto pd = w->dimensions();
      if (pd.size() != 3 || pd[2] != kPanel || pd[1] != K)
        return fail("a weight is not [N/32, K, 32]");
      if (sd.size() != 1 || sd[0] != pd[0] * kPanel) return fail("scales are not [N]");
      data = w->typed_data();
      panels = pd[0];
    }
    whole.push_back({data, s->typed_data(), (*y)->typed_data(), panels * kPanel, 0, panels, group});
    total += panels;
  }
  const int64_t workers = std::max<int64_t>(1, pool.num_threads());
  // About 8 chunks per worker to even out the load, each at least 4 panels.
  const int64_t chunks = std::clamp<int64_t>(total / 4, 1, 8 * workers);
  const int64_t per = (total + chunks - 1) / chunks;
  std::vector<Piece> pieces;
  for (const Piece& w : whole)
    for (int64_t p0 = 0; p0 < w.count; p0 += per)
      pieces.push_back({w.panels, w.scale, w.y, w.n, p0, std::min(per, w.count - p0), w.group});
  const float* xp = x.typed_data();
  t5like::ParallelFor(pool, static_cast<int64_t>(pieces.size()), [&](int64_t c) {
    const Piece& p = pieces[c];
    PanelRange<Q4>(M, xp, p.panels, p.scale, p.y, K, p.n, p.p0, p.count, p.group);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_matmul_q8, MatmulQuant<false>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(t5like_matmul_q4, MatmulQuant<true>,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());
