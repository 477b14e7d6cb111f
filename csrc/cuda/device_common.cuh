// Device helpers shared by the CUDA kernels (compiled by nvcc, or by the host compiler for the
// emulator): NaN / infinity constants, warp reductions, bank-row vector loads.
#pragma once
#include <cstdint>
#include <type_traits>

#include "gpu_platform.h"
#include "npid/dispatch.h"

namespace npid {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fffffff); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

template <typename T>
__device__ __forceinline__ T neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
}

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane of the warp
// must call it (full mask), each lane ends with its group's sum.
template <typename T>
__device__ __forceinline__ T group_sum(T v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

// Sum across the groups of a warp: lanes l, l ^ width, l ^ 2 width, ... (same position in
// every group of `width` lanes). Every lane must call it.
template <typename T>
__device__ __forceinline__ T across_groups_sum(T v, int width) {
  for (int off = width; off < 32; off <<= 1) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T across_groups_max(T v, int width) {
  for (int off = width; off < 32; off <<= 1) {
    const T o = __shfl_xor_sync(kFullMask, v, off);
    v = o > v ? o : v;
  }
  return v;
}

// Read the single element of z (float32 or float64) as double.
__device__ __forceinline__ double read_z(const void* z, bool z_double) {
  return z_double ? *static_cast<const double*>(z) : static_cast<double>(*static_cast<const float*>(z));
}

// ---------------------------------------------------------------------------------------
// Bank row loads. VEC == 1: one bank_t per load. VEC == 16 / sizeof(bank_t): one 16-byte
// load (uint4) per vector, valid only when the bank base and the row pitch d*sizeof(bank_t)
// are 16-byte aligned (checked on the host).

template <typename bank_t>
constexpr int full_vec() { return static_cast<int>(16 / sizeof(bank_t)); }

template <typename bank_t, int VEC>
struct RawOf {
  using type = uint4;
};
template <typename bank_t>
struct RawOf<bank_t, 1> {
  using type = bank_t;
};

template <typename bank_t, int VEC>
__device__ __forceinline__ typename RawOf<bank_t, VEC>::type raw_zero() {
  if constexpr (VEC == 1) {
    return static_cast<bank_t>(0.0f);
  } else {
    return make_uint4(0u, 0u, 0u, 0u);
  }
}

// Vector t of `row` (elements t*VEC .. t*VEC+VEC-1). Read-only path: the bank is not
// written while a scan kernel runs.
template <typename bank_t, int VEC>
__device__ __forceinline__ typename RawOf<bank_t, VEC>::type load_raw(const bank_t* row, int64_t t) {
  if constexpr (VEC == 1) {
    return row[t];
  } else {
    return __ldg(reinterpret_cast<const uint4*>(row) + t);
  }
}

__device__ __forceinline__ uint32_t uint4_word(const uint4& r, int i) {
  return i == 0 ? r.x : (i == 1 ? r.y : (i == 2 ? r.z : r.w));
}

template <typename acc_t, typename bank_t, int VEC>
__device__ __forceinline__ void decode(const typename RawOf<bank_t, VEC>::type& r, acc_t (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = static_cast<acc_t>(r);
  } else if constexpr (std::is_same<bank_t, float>::value) {
    static_assert(VEC == 4, "float vectors hold 4 elements");
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = static_cast<acc_t>(__uint_as_float(uint4_word(r, i)));
  } else if constexpr (std::is_same<bank_t, double>::value) {
    static_assert(VEC == 2, "double vectors hold 2 elements");
    v[0] = static_cast<acc_t>(__hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x)));
    v[1] = static_cast<acc_t>(__hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z)));
  } else if constexpr (std::is_same<bank_t, at::Half>::value) {
    static_assert(VEC == 8, "half vectors hold 8 elements");
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t w = uint4_word(r, i >> 1);
      const unsigned short bits = static_cast<unsigned short>((i & 1) ? (w >> 16) : (w & 0xffffu));
      v[i] = static_cast<acc_t>(__half2float(__ushort_as_half(bits)));
    }
  } else {
    static_assert(std::is_same<bank_t, at::BFloat16>::value, "unsupported bank type");
    static_assert(VEC == 8, "bfloat16 vectors hold 8 elements");
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const uint32_t w = uint4_word(r, i >> 1);
      v[i] = static_cast<acc_t>(__uint_as_float((i & 1) ? (w & 0xffff0000u) : (w << 16)));
    }
  }
}

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}

}  // namespace cuda
}  // namespace npid
