// Host-side helpers of the CUDA launchers (also built for the emulator): the optional
// synchronous argument checks, launch-planning arithmetic, workspace carving.
//
// Error reporting on CUDA (no host sync by default)
// -------------------------------------------------
// The CPU ops raise on an out-of-range row, an unset z or non-finite features. Raising
// on CUDA would need the device's answer on the host (a sync per call), which breaks
// CUDA-graph capture and stalls the stream. So by default the CUDA kernels never read
// out of bounds and never crash, and they make the problem visible in the result:
//  * a row index outside [0, n_data) is skipped (never dereferenced); the affected
//    sample's loss and grad_x (nce_loss, softmax_ce_loss, nce_scores_backward, and every
//    sample of full_softmax_loss whose y is out of range) or the score entry (nce_scores)
//    become NaN (positive_sq_dist only where the sample's positive row itself is outside
//    the bank: it reads no other row); nce_estimate_z_ leaves z unset (as it does for NaN /
//    inf features), so a following nce_loss returns NaN; sample_negatives copies y into
//    column 0 as given;
//  * nce_loss with z <= 0 or non-finite gives NaN losses and gradients;
//  * momentum_update_ skips a sample whose row is out of range, whose features are not
//    finite, or whose updated row cannot be normalised (zero / infinite norm): the bank
//    row keeps its previous value, so the bank never receives NaN rows.
// With the environment variable NPID_CUDA_SYNC_CHECKS=1 (read on every call) the ops
// instead validate on the device and raise the CPU's error message after a sync, before
// any output or bank row is written. The check is skipped while the current stream is
// being captured into a CUDA graph (a sync is illegal there).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "gpu_platform.h"
#include "npid/checks.h"

namespace npid {
namespace cuda {

using gpu::num_sms;

inline bool sync_checks_enabled() {
  const char* v = std::getenv("NPID_CUDA_SYNC_CHECKS");
  if (v == nullptr || v[0] == '\0' || (v[0] == '0' && v[1] == '\0')) return false;
  return !gpu::stream_is_capturing();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int next_pow2(int64_t v) {
  int p = 1;
  while (p < v && p < (1 << 30)) p <<= 1;
  return p;
}

template <int V>
using IntC = std::integral_constant<int, V>;

// Carves a workspace out of one byte tensor (kept alive by the caller until the kernels
// using it are enqueued; the caching allocator orders reuse on the stream).
struct Carver {
  size_t used = 0;
  template <typename T>
  size_t reserve(int64_t count) {
    used = (used + 15) / 16 * 16;
    const size_t at = used;
    used += static_cast<size_t>(count) * sizeof(T);
    return at;
  }
};

}  // namespace cuda
}  // namespace npid
