// A small CUDA-semantics emulator: runs our CUDA kernel bodies, compiled by the host
// compiler, on the CPU, so that every CI run executes them (numba's CUDA simulator, for C++).
//
// Model (what it checks; docs/emulation.md says what it cannot):
//  * Every thread of a block is a fiber (its own stack, ucontext switching); the fibers of a
//    block run interleaved on one host thread, each until it waits, so __syncthreads() is a real
//    barrier, and the blocks of a launch are spread over the host's cores. ThreadSanitizer sees
//    each fiber as a thread and only the barriers' and collectives' happens-before edges, so a
//    shared-memory access that a missing __syncthreads leaves unordered is reported as a race.
//  * Shared memory (static, through NPID_SHARED / NPID_SHARED_ARRAY, and dynamic, through
//    NPID_DYNAMIC_SHARED) is per block, one exact-size allocation each (AddressSanitizer sees an
//    access past its end), filled with 0xFF bytes (NaN for floats, -1 for integers) at block
//    start, so a read before a write shows.
//  * Warp collectives (__shfl_sync, __shfl_xor_sync, __any_sync, __all_sync) execute when every
//    lane named in the mask has reached the same call (same source line, same mask). A lane of
//    the mask that has returned, waits at __syncthreads or at another collective, or a block in
//    which every live thread waits, stops the launch with an error naming the kernel, the block
//    and the thread: never a hang.
//  * Launch checks: block size <= 1024 and <= the kernel's declared bound, grid.x < 2^31,
//    grid.y / grid.z <= 65535, no empty grid or block, dynamic + static shared memory <= 48 KiB
//    (no kernel of ours opts into more).
// The device intrinsics our kernels use are defined here with the device's bit-level meaning.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>

#define NPID_EMULATE_CUDA 1

// ----------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// (__noinline__ itself cannot be a macro here: libstdc++ spells __attribute__((__noinline__)).)
#define NPID_NOINLINE __attribute__((noinline))

// ----------------------------------------------------------------------------- vector types
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

using cudaStream_t = void*;

// Built-in index variables: per host thread, set by the launcher.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace npid_emu {

constexpr size_t kMaxSharedBytes = 48 * 1024;

// Where a collective was called from (two lanes at different sites have diverged).
struct Site {
  const char* file;
  int line;
};

enum class Collective : int { kShfl, kShflXor, kAny, kAll };

// The runtime entry points (cuda_emu.cpp).
uint64_t collective(Site site, Collective kind, unsigned mask, uint64_t value, int arg, int width);
void syncthreads(Site site);
void* static_shared(const void* key, size_t bytes, size_t align, const char* name);
void* dynamic_shared();

// Launch description: the kernel's name (for messages), its __launch_bounds__ maximum, the
// configuration, and a body run by every thread of every block.
struct Launch {
  const char* kernel;
  int max_threads;
  dim3 grid, block;
  size_t dynamic_smem;
};
void run(const Launch& launch, const std::function<void()>& body);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffled values fit 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
T shfl_sync(Site site, unsigned mask, T v, int src_lane, int width = 32) {
  return from_bits<T>(collective(site, Collective::kShfl, mask, to_bits(v), src_lane, width));
}
template <typename T>
T shfl_xor_sync(Site site, unsigned mask, T v, int lane_mask, int width = 32) {
  return from_bits<T>(collective(site, Collective::kShflXor, mask, to_bits(v), lane_mask, width));
}
inline int any_sync(Site site, unsigned mask, int pred) {
  return static_cast<int>(collective(site, Collective::kAny, mask, pred != 0, 0, 32));
}
inline int all_sync(Site site, unsigned mask, int pred) {
  return static_cast<int>(collective(site, Collective::kAll, mask, pred != 0, 0, 32));
}

}  // namespace npid_emu

#define NPID_EMU_SITE (::npid_emu::Site{__FILE__, __LINE__})
#define __shfl_sync(...) ::npid_emu::shfl_sync(NPID_EMU_SITE, __VA_ARGS__)
#define __shfl_xor_sync(...) ::npid_emu::shfl_xor_sync(NPID_EMU_SITE, __VA_ARGS__)
#define __any_sync(...) ::npid_emu::any_sync(NPID_EMU_SITE, __VA_ARGS__)
#define __all_sync(...) ::npid_emu::all_sync(NPID_EMU_SITE, __VA_ARGS__)
#define __syncthreads() ::npid_emu::syncthreads(NPID_EMU_SITE)

// Shared memory declarations (see npid/gpu_platform.h for the CUDA spelling). A function-local
// static key per declaration (and per template instance) names the block's allocation.
#define NPID_SHARED_ARRAY(type, name, count)                                                  \
  static const char name##_emu_key = 0;                                                       \
  type* name = static_cast<type*>(::npid_emu::static_shared(&name##_emu_key,                 \
                                                            sizeof(type) * (count),           \
                                                            alignof(type), #name))
#define NPID_SHARED(type, name)                                                               \
  static const char name##_emu_key = 0;                                                       \
  type& name = *static_cast<type*>(                                                           \
      ::npid_emu::static_shared(&name##_emu_key, sizeof(type), alignof(type), #name))
#define NPID_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::npid_emu::dynamic_shared())

// ----------------------------------------------------------------------------- intrinsics
inline float __int_as_float(int v) { return npid_emu::from_bits<float>(static_cast<uint32_t>(v)); }
inline float __uint_as_float(unsigned v) { return npid_emu::from_bits<float>(v); }
inline double __longlong_as_double(long long v) { return npid_emu::from_bits<double>(static_cast<uint64_t>(v)); }
inline double __hiloint2double(int hi, int lo) {
  return npid_emu::from_bits<double>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) |
                                     static_cast<uint32_t>(lo));
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<uint64_t>(a) * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}
// Read-only cache load: a plain load here.
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// cuda_fp16's __half as a 16-bit pattern; __half2float is exact (every half is a float).
struct __half {
  unsigned short bits;
};
inline __half __ushort_as_half(unsigned short bits) { return __half{bits}; }
inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  uint32_t exp = (h.bits >> 10) & 0x1fu, mant = h.bits & 0x3ffu;
  uint32_t out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (mant << 13);  // inf / NaN
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    out = sign;  // +-0
  } else {  // subnormal: normalise
    exp = 113;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    out = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  return npid_emu::from_bits<float>(out);
}

using std::isfinite;
using std::isinf;
using std::isnan;
