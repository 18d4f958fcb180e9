// EMIT's local-window heat map as one fused CPU kernel (the ``fused`` strategy of
// emit_jax/ops/heatmap.py), called from XLA through the FFI (emit_jax/ops/native.py builds it
// on first use with the host's C++ compiler and -march=native).
//
//   S[l, b, i, j] = max_{r, |i'-i|<=k, |j'-j|<=k} <q, x> / (|q| |x|),
//   q = Q[l, b, i, j, :], x = X[l, b, r, i', j', :]
//
// The similarities are computed only where the window is, in tiles of M query columns x up to
// N reference columns of one reference row: M*N dot products over D with the partial sums in
// SIMD lanes along D (both operands read in their natural row-major layout, no packing), then
// one transpose-and-add reduction per 16 dot products and the masked max. Rows of the query
// grid are split over threads. Exact: the same values as the other strategies up to float32
// summation order. Inputs float32 or bfloat16 (widened to float32 in registers); float32 maths.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// 16 consecutive elements as float32: float32 as is; bfloat16 (its bits as uint16_t) widened
// in registers (the upper half of a float32), so bf16 features are read at half the bytes.
inline v16 load(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline v16 load(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  v16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

// Keeps a loaded vector in a register: without it GCC folds the load into every FMA that uses
// it (M loads instead of one), which halved the kernel's speed on AVX-512.
inline void in_register(v16& v) {
#if defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

#if defined(__clang__)
#define SHUF(x, y, ...) __builtin_shufflevector(x, y, __VA_ARGS__)
#else
#define SHUF(x, y, ...) __builtin_shuffle(x, y, (i16){__VA_ARGS__})
#endif

// One level of the transpose-and-add tree, of half-width H: x and y hold the partial sums of H
// accumulators each, in groups of 2H lanes; lane i of the result adds lanes lo(i) and lo(i) + H
// of (x, y) concatenated, so it holds those of all 2H accumulators in groups of H lanes.
constexpr int lo_lane(int H, int i) { return i / H * 2 * H + i % H; }

template <int H, int... I>
inline v16 comb(v16 x, v16 y, std::integer_sequence<int, I...>) {
  return SHUF(x, y, lo_lane(H, I)...) + SHUF(x, y, (lo_lane(H, I) + H)...);
}

// t[0..2H) -> t[0..H), in place (t[i] is written after t[2i] and t[2i+1] are read)
template <int H>
inline void level(v16* t) {
  for (int i = 0; i < H; i++) t[i] = comb<H>(t[2 * i], t[2 * i + 1], std::make_integer_sequence<int, 16>{});
}

// a[0..15]: 16 vectors of partial sums -> one vector holding their 16 totals, in order.
inline v16 reduce16(const v16* a) {
  v16 t[16];
  for (int i = 0; i < 16; i++) t[i] = a[i];
  level<8>(t);
  level<4>(t);
  level<2>(t);
  level<1>(t);
  return t[0];
}

constexpr int M = 4;  // query columns per tile
constexpr int N = 6;  // reference columns per tile (24 accumulators: AVX-512 has 32 registers)

// out[m * n + c] = <q[m], x[c]> for m < MM, c < NN; rows of q and x are D apart, D % 16 == 0.
template <int MM, int NN, typename T>
void tile(const T* q, const T* x, int64_t D, float* out) {
  v16 acc[MM * NN];
  for (int t = 0; t < MM * NN; t++) acc[t] = v16{};
  for (int64_t d = 0; d < D; d += 16) {
    v16 qv[MM];
    for (int m = 0; m < MM; m++) qv[m] = load(q + m * D + d);
    for (int c = 0; c < NN; c++) {
      v16 xv = load(x + c * D + d);
      in_register(xv);
      for (int m = 0; m < MM; m++) acc[m * NN + c] += qv[m] * xv;
    }
  }
  constexpr int NT = MM * NN, NP = (NT + 15) / 16 * 16;
  v16 all[NP];
  for (int t = 0; t < NP; t++) all[t] = t < NT ? acc[t] : v16{};
  for (int t = 0; t < NP; t += 16) {
    float sums[16];
    v16 s = reduce16(all + t);
    std::memcpy(sums, &s, sizeof s);
    for (int u = 0; u < 16 && t + u < NT; u++) out[t + u] = sums[u];
  }
}

template <int MM, typename T>
void tile_n(int n, const T* q, const T* x, int64_t D, float* out) {
  switch (n) {
    case 1: tile<MM, 1>(q, x, D, out); break;
    case 2: tile<MM, 2>(q, x, D, out); break;
    case 3: tile<MM, 3>(q, x, D, out); break;
    case 4: tile<MM, 4>(q, x, D, out); break;
    case 5: tile<MM, 5>(q, x, D, out); break;
    default: tile<MM, N>(q, x, D, out); break;
  }
}

template <typename T>
float inverse_norm(const T* x, int64_t D) {
  v16 a{};
  for (int64_t d = 0; d < D; d += 16) {
    v16 v = load(x + d);
    a += v * v;
  }
  float s = 0;
  for (int u = 0; u < 16; u++) s += a[u];
  return 1.0f / std::max(std::sqrt(s), 1e-8f);
}

// Runs body(t) for t in [0, n) on `threads` threads (the calling one included), handing out
// indices one at a time.
template <typename F>
void parallel_for(int64_t n, int64_t threads, F body) {
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    for (int64_t t; (t = next.fetch_add(1)) < n;) body(t);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < std::min(threads, n); t++) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}

// One (layer, batch) pair: q [h, w, D], x [R, h, w, D] -> s [h, w].
template <typename T>
void one_map(const T* q, const T* x, int64_t R, int64_t h, int64_t w, int64_t D,
             int64_t k, int64_t threads, float* s) {
  std::vector<float> qinv(h * w), xinv(R * h * w);
  parallel_for(R * h, threads, [&](int64_t row) {
    for (int64_t j = 0; j < w; j++) xinv[row * w + j] = inverse_norm(x + (row * w + j) * D, D);
  });
  for (int64_t p = 0; p < h * w; p++) qinv[p] = inverse_norm(q + p * D, D);
  parallel_for(h, threads, [&](int64_t i) {
    std::vector<float> best(w, -INFINITY);
    float dots[M * N];
    for (int64_t r = 0; r < R; r++) {
      for (int64_t ri = std::max<int64_t>(0, i - k); ri <= std::min(h - 1, i + k); ri++) {
        const T* xrow = x + (r * h + ri) * w * D;
        const float* inv = xinv.data() + (r * h + ri) * w;
        for (int64_t j0 = 0; j0 < w; j0 += M) {
          const int64_t mq = std::min<int64_t>(M, w - j0);
          const T* qt = q + (i * w + j0) * D;
          const int64_t lo = std::max<int64_t>(0, j0 - k), hi = std::min(w, j0 + mq + k);
          for (int64_t c0 = lo; c0 < hi; c0 += N) {
            const int n = static_cast<int>(std::min<int64_t>(N, hi - c0));
            if (mq == M) {
              tile_n<M>(n, qt, xrow + c0 * D, D, dots);
            } else {
              for (int64_t m = 0; m < mq; m++) tile_n<1>(n, qt + m * D, xrow + c0 * D, D, dots + m * n);
            }
            for (int64_t m = 0; m < mq; m++) {
              const int64_t j = j0 + m;
              for (int c = 0; c < n; c++) {
                const int64_t jc = c0 + c;
                if (jc < j - k || jc > j + k) continue;
                best[j] = std::max(best[j], dots[m * n + c] * inv[jc]);
              }
            }
          }
        }
      }
    }
    for (int64_t j = 0; j < w; j++) s[i * w + j] = best[j] * qinv[i * w + j];
  });
}

ffi::Error HeatmapImpl(ffi::AnyBuffer query, ffi::AnyBuffer reference,
                       ffi::ResultBuffer<ffi::F32> sims, int64_t window, int64_t threads) {
  auto qd = query.dimensions();
  auto xd = reference.dimensions();
  if (qd.size() != 5 || xd.size() != 6)
    return ffi::Error::InvalidArgument("heatmap_cpu: query must be [L, B, h, w, D] and reference [L, B, R, h, w, D]");
  const int64_t L = qd[0], B = qd[1], h = qd[2], w = qd[3], D = qd[4], R = xd[2];
  if (xd[0] != L || xd[1] != B || xd[3] != h || xd[4] != w || xd[5] != D)
    return ffi::Error::InvalidArgument("heatmap_cpu: reference does not match query");
  if (D % 16 != 0) return ffi::Error::InvalidArgument("heatmap_cpu: D must be a multiple of 16");
  if (window < 0) return ffi::Error::InvalidArgument("heatmap_cpu: window must be >= 0");
  const auto dtype = query.element_type();
  if (reference.element_type() != dtype || (dtype != ffi::F32 && dtype != ffi::BF16))
    return ffi::Error::InvalidArgument("heatmap_cpu: query and reference must both be float32 or both bfloat16");
  const int64_t k = std::min(window, std::max(h, w)), nt = std::max<int64_t>(1, threads);
  float* out = sims->typed_data();
  for (int64_t lb = 0; lb < L * B; lb++) {
    const int64_t qo = lb * h * w * D, xo = lb * R * h * w * D;
    if (dtype == ffi::F32)
      one_map(static_cast<const float*>(query.untyped_data()) + qo,
              static_cast<const float*>(reference.untyped_data()) + xo, R, h, w, D, k, nt, out + lb * h * w);
    else
      one_map(static_cast<const uint16_t*>(query.untyped_data()) + qo,
              static_cast<const uint16_t*>(reference.untyped_data()) + xo, R, h, w, D, k, nt, out + lb * h * w);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EmitJaxHeatmapCpu, HeatmapImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // query [L, B, h, w, D] f32 or bf16
                                  .Arg<ffi::AnyBuffer>()  // reference [L, B, R, h, w, D], same
                                  .Ret<ffi::Buffer<ffi::F32>>()  // S [L, B, h, w]
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("threads"));
