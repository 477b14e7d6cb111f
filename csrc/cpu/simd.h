// The CPU kernels' vector primitives over bank rows: the ISA variants' attributes, dot
// products, exp over a block of scores, axpy, rows added into an accumulator held in registers.
// GCC vector extensions, lowered to the ISA of the function they are inlined into.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace npid {
namespace cpu {

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define NPID_ALWAYS_INLINE inline __attribute__((always_inline))
#define NPID_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define NPID_TARGET_AVX2 __attribute__((target("avx2,fma")))
// Lambdas called from a target-specific loop must be inlined into it to get its ISA.
#define NPID_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define NPID_ALWAYS_INLINE_LAMBDA
#define NPID_ALWAYS_INLINE inline
#define NPID_TARGET_AVX512
#define NPID_TARGET_AVX2
#endif

// The vector ISA the hot loops run with: the best the CPU has, or less when NPID_CPU_ISA asks
// for it at load (docs/cpu.md) or the private op npid::_set_cpu_isa does (the tests cover every
// path that way). cpu_switches.cpp.
enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
CpuIsa cpu_isa();

// f(IsaConstant<isa>{}) compiled for the ISA (picked at run time, cpu_isa()): f is an
// NPID_ALWAYS_INLINE_LAMBDA calling always-inline code, which all takes the target of the
// variant it is inlined into; the argument gives code whose constants depend on the ISA
// (knn_cpu.cpp's panel shapes) the ISA as a type. The extension is built without -march flags
// so one wheel runs anywhere.
template <CpuIsa kIsa>
using IsaConstant = std::integral_constant<CpuIsa, kIsa>;
template <typename F>
NPID_TARGET_AVX512 void run_avx512(F& f) { f(IsaConstant<CpuIsa::kAvx512>{}); }
template <typename F>
NPID_TARGET_AVX2 void run_avx2(F& f) { f(IsaConstant<CpuIsa::kAvx2>{}); }
template <typename F>
void run_baseline(F& f) { f(IsaConstant<CpuIsa::kBaseline>{}); }
template <typename F>
NPID_ALWAYS_INLINE void run_for_isa(CpuIsa isa, F&& f) {
  switch (isa) {
    case CpuIsa::kAvx512: run_avx512(f); break;
    case CpuIsa::kAvx2: run_avx2(f); break;
    default: run_baseline(f);
  }
}

NPID_ALWAYS_INLINE void prefetch_row(const void* row, int64_t bytes) {
  const char* p = static_cast<const char*>(row);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// row . x. For a row in the accumulation dtype: four independent vector accumulators (GCC
// vector extensions, lowered to the enclosing function's ISA), added pairwise at the end. A
// single accumulator (what `omp simd reduction` gives) makes the d/8 multiply-adds one
// dependency chain of 4-cycle FMAs and then adds the lanes one by one through the stack:
// ~100 cycles per row, which bounds the fused losses once their rows come from cache.
// A GCC vector of kBytes bytes of T: 32 (AVX2) in the loss kernels; knn_cpu.cpp's panels
// also use 16. (A vector_size that depends on a template parameter must sit in a template of
// its element type too, or GCC drops the attribute.)
template <typename T, int kBytes = 32>
struct VectorOf {
  typedef T type __attribute__((vector_size(kBytes)));
  static constexpr int64_t kLanes = kBytes / sizeof(T);
};

template <typename V, typename T>
NPID_ALWAYS_INLINE V load_vector(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V, typename T>
NPID_ALWAYS_INLINE void store_vector(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));  // an unaligned vector store
}

// x . rows[i] in vector lanes for kRows bank rows at once (a sample's pairs in one tile of the
// bank, pair_order.h): each vector of x is loaded once for all of them. Two accumulators per
// row keep the multiply-add chains shorter than the loads.
template <int kRows, typename acc_t>
NPID_ALWAYS_INLINE void dot_products_lanes(const acc_t* __restrict__ x,
                                           const acc_t* const* __restrict__ rows, int64_t d,
                                           typename VectorOf<acc_t>::type* out) {
  using V = typename VectorOf<acc_t>::type;
  constexpr int64_t L = VectorOf<acc_t>::kLanes;
  V even[kRows], odd[kRows];
  for (int i = 0; i < kRows; ++i) even[i] = odd[i] = V{};
  int64_t j = 0;
  for (; j + 2 * L <= d; j += 2 * L) {
    const V x0 = load_vector<V>(x + j), x1 = load_vector<V>(x + j + L);
    for (int i = 0; i < kRows; ++i) {
      even[i] += x0 * load_vector<V>(rows[i] + j);
      odd[i] += x1 * load_vector<V>(rows[i] + j + L);
    }
  }
  if (j + L <= d) {
    const V x0 = load_vector<V>(x + j);
    for (int i = 0; i < kRows; ++i) even[i] += x0 * load_vector<V>(rows[i] + j);
    j += L;
  }
  for (int i = 0; i < kRows; ++i) {
    out[i] = even[i] + odd[i];
    for (int64_t t = j; t < d; ++t) out[i][0] += x[t] * rows[i][t];
  }
}

// out[i] = the sum of v[i]'s lanes, for the kLanes vectors v[0..kLanes): a transposed reduction
// (log2(kLanes) rounds, each adding two shuffles of two vectors) instead of a chain of shuffles
// and adds for every vector on its own (about 10% of a scoring loop's time).
template <typename acc_t>
NPID_ALWAYS_INLINE typename VectorOf<acc_t>::type lane_sums(const typename VectorOf<acc_t>::type* v) {
  using V = typename VectorOf<acc_t>::type;
  if constexpr (VectorOf<acc_t>::kLanes == 8) {
    V t[4], u[2];
    for (int k = 0; k < 4; ++k)  // [a01 b01 a23 b23 a45 b45 a67 b67]
      t[k] = __builtin_shufflevector(v[2 * k], v[2 * k + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
             __builtin_shufflevector(v[2 * k], v[2 * k + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int k = 0; k < 2; ++k)  // [a0-3 b0-3 c0-3 d0-3 a4-7 b4-7 c4-7 d4-7]
      u[k] = __builtin_shufflevector(t[2 * k], t[2 * k + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
             __builtin_shufflevector(t[2 * k], t[2 * k + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return __builtin_shufflevector(u[0], u[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u[0], u[1], 4, 5, 6, 7, 12, 13, 14, 15);
  } else {
    static_assert(VectorOf<acc_t>::kLanes == 4, "lane_sums: 4 or 8 lanes");
    const V t0 = __builtin_shufflevector(v[0], v[1], 0, 4, 2, 6) +
                 __builtin_shufflevector(v[0], v[1], 1, 5, 3, 7);
    const V t1 = __builtin_shufflevector(v[2], v[3], 0, 4, 2, 6) +
                 __builtin_shufflevector(v[2], v[3], 1, 5, 3, 7);
    return __builtin_shufflevector(t0, t1, 0, 1, 4, 5) + __builtin_shufflevector(t0, t1, 2, 3, 6, 7);
  }
}

template <typename acc_t, typename bank_t>
NPID_ALWAYS_INLINE acc_t dot_row(const bank_t* __restrict__ row, const acc_t* __restrict__ x, int64_t d) {
  if constexpr (std::is_same_v<acc_t, bank_t>) {
    using V = typename VectorOf<acc_t>::type;
    constexpr int64_t L = VectorOf<acc_t>::kLanes;
    V s0 = {}, s1 = {}, s2 = {}, s3 = {};
    int64_t j = 0;
    for (; j + 4 * L <= d; j += 4 * L) {
      s0 += load_vector<V>(row + j) * load_vector<V>(x + j);
      s1 += load_vector<V>(row + j + L) * load_vector<V>(x + j + L);
      s2 += load_vector<V>(row + j + 2 * L) * load_vector<V>(x + j + 2 * L);
      s3 += load_vector<V>(row + j + 3 * L) * load_vector<V>(x + j + 3 * L);
    }
    for (; j + L <= d; j += L) s0 += load_vector<V>(row + j) * load_vector<V>(x + j);
    V v = (s0 + s1) + (s2 + s3);
    for (int64_t width = L / 2; width >= 1; width /= 2)
      for (int64_t l = 0; l < width; ++l) v[l] += v[l + width];
    acc_t s = v[0];
    for (; j < d; ++j) s += row[j] * x[j];
    return s;
  } else {
    acc_t s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < d; ++j) s += static_cast<acc_t>(row[j]) * x[j];
    return s;
  }
}

// out[i] = exp(in[i]) for i in [0, count), in whole vectors: both arrays must hold count rounded
// up to a multiple of VectorOf<acc_t>::kLanes values, and the lanes past count are computed from
// whatever `in` holds there (the fused losses' blocks keep zeros there). in == out is allowed.
// float: eight lanes at a time (Cephes' expf: n = round(x / ln 2),
// x - n ln 2 in two parts, a degree-5 polynomial, times 2^n applied as two factors so that
// every step stays a normal float; at most 1 ulp from the rounded exp over a sweep of
// [-110, 90] in steps of 3e-4, inf above 88.72, 0 below -103.97, NaN kept). The fused losses
// call it on a block of scores instead of one libm call per score (8% of the NCE step).
// double: libm, per element (gradcheck's precision).
template <typename acc_t>
NPID_ALWAYS_INLINE void exp_whole_vectors(const acc_t* in, acc_t* out, int64_t count) {
  if constexpr (std::is_same_v<acc_t, float>) {
    using V = typename VectorOf<float>::type;
    typedef int32_t VI __attribute__((vector_size(32)));
    constexpr int64_t L = VectorOf<float>::kLanes;
    // In and out through memory: a lambda returning a 32-byte vector would change the ABI of
    // the baseline build (no AVX).
    auto exp8 = [](const float* in, float* result) NPID_ALWAYS_INLINE_LAMBDA {
      const V x = load_vector<V>(in);
      const V hi = V{} + 88.72283905206835f, lo = V{} - 103.97207708f;
      V xc = x > hi ? hi : x;
      xc = xc < lo ? lo : xc;
      V n = xc * 1.44269504088896341f + 0.5f;
      const VI ni0 = __builtin_convertvector(n, VI);
      // floor(n): the conversion truncates toward zero.
      const VI ni = ni0 - (__builtin_convertvector(ni0, V) > n ? VI{} + 1 : VI{});
      n = __builtin_convertvector(ni, V);
      V r = xc - n * 0.693359375f;
      r = r - n * -2.12194440e-4f;
      V p = V{} + 1.9875691500e-4f;
      p = p * r + 1.3981999507e-3f;
      p = p * r + 8.3334519073e-3f;
      p = p * r + 4.1665795894e-2f;
      p = p * r + 1.6666665459e-1f;
      p = p * r + 5.0000001201e-1f;
      p = p * (r * r) + r + 1.0f;
      const VI half = ni >> 1, rest = ni - half;  // 2^n = 2^half * 2^rest, both in [-75, 65]
      V f1, f2;
      const VI b1 = (half + 127) << 23, b2 = (rest + 127) << 23;
      std::memcpy(&f1, &b1, sizeof(V));
      std::memcpy(&f2, &b2, sizeof(V));
      V out = p * f1 * f2;
      out = x > hi ? V{} + std::numeric_limits<float>::infinity() : out;
      out = x < lo ? V{} : out;
      out = x != x ? x : out;
      store_vector(result, out);
    };
    for (int64_t i = 0; i < count; i += L) exp8(in + i, out + i);
  } else {
    for (int64_t i = 0; i < count; ++i) out[i] = std::exp(in[i]);
  }
}

template <typename acc_t, typename bank_t>
NPID_ALWAYS_INLINE void axpy_row(acc_t a, const bank_t* __restrict__ row, acc_t* __restrict__ out, int64_t d) {
  if constexpr (std::is_same_v<acc_t, bank_t>) {
    // Four vectors per iteration: `omp simd` gave one, a loop bound by its own overhead.
    using V = typename VectorOf<acc_t>::type;
    constexpr int64_t L = VectorOf<acc_t>::kLanes;
    int64_t j = 0;
    auto step = [&](int64_t at) NPID_ALWAYS_INLINE_LAMBDA {
      const V o = load_vector<V>(out + at) + a * load_vector<V>(row + at);
      store_vector(out + at, o);
    };
    for (; j + 4 * L <= d; j += 4 * L) {
      step(j);
      step(j + L);
      step(j + 2 * L);
      step(j + 3 * L);
    }
    for (; j + L <= d; j += L) step(j);
    for (; j < d; ++j) out[j] += a * row[j];
  } else {
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) out[j] += a * static_cast<acc_t>(row[j]);
  }
}

// out += sum_i coef[i] * rows[i], i in [0, count), with out held in vector registers: eight
// vectors of out at a time (half of AVX2's sixteen registers at d = 128 fp32), every row's
// eight vectors added in, then stored. Each element gets its terms in the order i = 0, 1, ...,
// as count one-row axpys would add them, but out is loaded and stored once instead of count
// times: a one-row axpy is bound by its stores, even with the row in L1.
template <typename acc_t>
NPID_ALWAYS_INLINE void add_rows_in_registers(const acc_t* __restrict__ coef,
                                              const acc_t* const* __restrict__ rows,
                                              int64_t count, acc_t* __restrict__ out, int64_t d) {
  using V = typename VectorOf<acc_t>::type;
  constexpr int64_t L = VectorOf<acc_t>::kLanes, kHeld = 8;
  int64_t j = 0;
  for (; j + kHeld * L <= d; j += kHeld * L) {
    V held[kHeld];
#pragma GCC unroll 8
    for (int64_t q = 0; q < kHeld; ++q) held[q] = load_vector<V>(out + j + q * L);
    for (int64_t i = 0; i < count; ++i) {
      const acc_t c = coef[i];
      const acc_t* row = rows[i] + j;
#pragma GCC unroll 8
      for (int64_t q = 0; q < kHeld; ++q) held[q] += c * load_vector<V>(row + q * L);
    }
#pragma GCC unroll 8
    for (int64_t q = 0; q < kHeld; ++q) store_vector(out + j + q * L, held[q]);
  }
  for (; j + L <= d; j += L) {
    V held = load_vector<V>(out + j);
    for (int64_t i = 0; i < count; ++i) held += coef[i] * load_vector<V>(rows[i] + j);
    store_vector(out + j, held);
  }
  for (; j < d; ++j) {
    acc_t held = out[j];
    for (int64_t i = 0; i < count; ++i) held += coef[i] * rows[i][j];
    out[j] = held;
  }
}

}  // namespace cpu
}  // namespace npid
