// The CPU kernels' process-wide state, reached through private ops: the run-time switches (the
// vector ISA of the hot loops, simd.h, and the fused losses' pair order, pair_order.h) and
// the scratch-memory counters (scratch.h). Each switch is one atomic the kernels read once per
// call (relaxed: a switch only changes between calls). npid::_set_cpu_isa / _cpu_isa and
// npid::_set_cpu_pair_order / _cpu_pair_order set and read the switches, which tests and
// experiments use through npid_kernels.ops._cpu_isa() / _cpu_pair_order();
// npid::_cpu_scratch_bytes reads the counters (npid_kernels.ops.cpu_scratch_bytes()).
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "scratch.h"
#include "pair_order.h"

namespace npid {
namespace cpu {
namespace {

constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
constexpr const char* kPairOrderNames[] = {"auto", "sample", "tile"};

CpuIsa best_cpu_isa() {
  CpuIsa best = CpuIsa::kBaseline;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
  if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    best = CpuIsa::kAvx512;
#endif
  return best;
}

// The index of `name` in `names`, or -1.
template <size_t N>
int find_name(const char* const (&names)[N], const std::string& name) {
  for (size_t i = 0; i < N; ++i)
    if (name == names[i]) return static_cast<int>(i);
  return -1;
}

// Never more than the CPU has: asking for AVX-512 on an AVX2 machine gives AVX2.
int clamped_isa(int asked) { return std::min(asked, static_cast<int>(best_cpu_isa())); }

// NPID_CPU_ISA=baseline|avx2|avx512 (docs/cpu.md) is read once, when the library loads; an
// unknown value is ignored there rather than failing the import.
int isa_at_load() {
  const char* want = std::getenv("NPID_CPU_ISA");
  const int asked = want != nullptr ? find_name(kIsaNames, want) : -1;
  return clamped_isa(asked >= 0 ? asked : static_cast<int>(CpuIsa::kAvx512));
}

std::atomic<int> g_isa{isa_at_load()};
std::atomic<int> g_pair_order{static_cast<int>(PairOrder::kAuto)};

void set_cpu_isa(const std::string& name) {
  const int asked = find_name(kIsaNames, name);
  TORCH_CHECK(asked >= 0, "cpu isa must be baseline, avx2 or avx512, got '", name, "'");
  g_isa.store(clamped_isa(asked), std::memory_order_relaxed);
}

std::string cpu_isa_name() { return kIsaNames[static_cast<int>(cpu_isa())]; }

void set_cpu_pair_order(const std::string& name) {
  const int order = find_name(kPairOrderNames, name);
  TORCH_CHECK(order >= 0, "pair order must be auto, sample or tile, got '", name, "'");
  g_pair_order.store(order, std::memory_order_relaxed);
}

std::string cpu_pair_order_name() { return kPairOrderNames[static_cast<int>(forced_pair_order())]; }

// [live, peak]: the scratch bytes held now and at most since the last reset, read before
// `reset_peak` restarts the peak from what is live.
std::vector<int64_t> cpu_scratch_bytes(bool reset_peak) {
  std::vector<int64_t> bytes{ScratchBytes::live().load(), ScratchBytes::peak().load()};
  if (reset_peak) ScratchBytes::reset_peak();
  return bytes;
}

}  // namespace

CpuIsa cpu_isa() { return static_cast<CpuIsa>(g_isa.load(std::memory_order_relaxed)); }

PairOrder forced_pair_order() {
  return static_cast<PairOrder>(g_pair_order.load(std::memory_order_relaxed));
}

}  // namespace cpu
}  // namespace npid

// Private (leading underscore): no tensors, not part of the op API of schemas.h.
TORCH_LIBRARY_FRAGMENT(npid, m) {
  m.def("_set_cpu_isa(str isa) -> ()", &npid::cpu::set_cpu_isa);
  m.def("_cpu_isa() -> str", &npid::cpu::cpu_isa_name);
  m.def("_set_cpu_pair_order(str order) -> ()", &npid::cpu::set_cpu_pair_order);
  m.def("_cpu_pair_order() -> str", &npid::cpu::cpu_pair_order_name);
  m.def("_cpu_scratch_bytes(bool reset_peak=False) -> int[]", &npid::cpu::cpu_scratch_bytes);
}
