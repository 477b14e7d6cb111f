// The CPU kernels' scratch memory: sort codes, per-slot gradients, converted rows, top-k buffers.
// It lives in std containers, outside ATen's allocator, so the allocator's statistics (and the
// profiler's memory events) miss it. Every such container takes ScratchAllocator, which counts
// the bytes live and their high-water mark, so that a caller can report the peak extra memory of
// a call including the kernels' own (npid::_cpu_scratch_bytes in cpu_switches.cpp, read through
// npid_kernels.ops.cpu_scratch_bytes; the benchmarks add it).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <new>
#include <unordered_map>
#include <utility>
#include <vector>

namespace npid {
namespace cpu {

struct ScratchBytes {
  static std::atomic<int64_t>& live() {
    static std::atomic<int64_t> bytes{0};
    return bytes;
  }
  static std::atomic<int64_t>& peak() {
    static std::atomic<int64_t> bytes{0};
    return bytes;
  }
  static void add(int64_t bytes) {
    const int64_t now = live().fetch_add(bytes, std::memory_order_relaxed) + bytes;
    int64_t high = peak().load(std::memory_order_relaxed);
    while (now > high && !peak().compare_exchange_weak(high, now, std::memory_order_relaxed)) {
    }
  }
  static void remove(int64_t bytes) { live().fetch_sub(bytes, std::memory_order_relaxed); }
  // The peak restarts from what is live now.
  static void reset_peak() { peak().store(live().load(std::memory_order_relaxed), std::memory_order_relaxed); }
};

// A std allocator that counts its bytes in ScratchBytes. Alignment 64 (a cache line) for the
// buffers the hot loops move whole 32-byte vectors through: malloc aligns to 16 bytes, and every
// other vector of a 16-byte-offset buffer would straddle two cache lines.
template <typename T, std::size_t Alignment = alignof(T)>
struct ScratchAllocator {
  using value_type = T;
  static constexpr std::align_val_t kAlignment{std::max(Alignment, alignof(T))};
  template <typename U>
  struct rebind {
    using other = ScratchAllocator<U, Alignment>;
  };
  ScratchAllocator() = default;
  template <typename U>
  ScratchAllocator(const ScratchAllocator<U, Alignment>&) {}
  T* allocate(std::size_t count) {
    T* p = static_cast<T*>(::operator new(count * sizeof(T), kAlignment));
    ScratchBytes::add(static_cast<int64_t>(count * sizeof(T)));
    return p;
  }
  void deallocate(T* p, std::size_t count) {
    ScratchBytes::remove(static_cast<int64_t>(count * sizeof(T)));
    ::operator delete(p, kAlignment);
  }
  template <typename U>
  bool operator==(const ScratchAllocator<U, Alignment>&) const { return true; }
  template <typename U>
  bool operator!=(const ScratchAllocator<U, Alignment>&) const { return false; }
};

template <typename T>
using ScratchVector = std::vector<T, ScratchAllocator<T>>;
template <typename T>
using AlignedVector = std::vector<T, ScratchAllocator<T, 64>>;
template <typename K, typename V>
using ScratchMap = std::unordered_map<K, V, std::hash<K>, std::equal_to<K>, ScratchAllocator<std::pair<const K, V>>>;

}  // namespace cpu
}  // namespace npid
