// Run-time choice of the vector ISA for the CPU hot loops (see cpu_common.h).
#include <cstdlib>
#include <cstring>

#include "cpu_common.h"

namespace npid {
namespace cpu {

static CpuIsa detect_cpu_isa() {
  CpuIsa best = CpuIsa::kBaseline;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
  if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    best = CpuIsa::kAvx512;
#endif
  const char* want = std::getenv("NPID_CPU_ISA");
  if (want != nullptr) {
    CpuIsa asked = best;
    if (std::strcmp(want, "baseline") == 0) asked = CpuIsa::kBaseline;
    if (std::strcmp(want, "avx2") == 0) asked = CpuIsa::kAvx2;
    if (std::strcmp(want, "avx512") == 0) asked = CpuIsa::kAvx512;
    if (static_cast<int>(asked) < static_cast<int>(best)) best = asked;  // never more than the CPU has
  }
  return best;
}

CpuIsa cpu_isa() {
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

}  // namespace cpu
}  // namespace npid
