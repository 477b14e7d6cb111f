// Device code of momentum_update_ (see bank_ops.h for the design), compiled by nvcc
// (bank_cuda.cu) or by the host compiler for the CUDA emulator (csrc/emu/).
#pragma once
#include <cstdint>

#include "device_common.cuh"
#include "npid/dispatch.h"
#include "npid/math.h"

namespace npid {
namespace cuda {

constexpr int kMomentumWarps = 8;

// The rare case of a mixed row w = mu * row + (1 - mu) * x whose |w|^2 over- or underflowed (a
// finite row far from unit length): normalise w / max|w_j| instead, whose squared norm lies in
// [1, d]; a zero or non-finite w is left as it was. Kept out of line so that the common path's
// registers are what they were without it. Every lane of the warp calls it.
template <typename scalar_t, typename bank_t>
__device__ NPID_NOINLINE void write_rescaled_row(bank_t* row, const scalar_t* xb, int64_t d,
                                                 acc_type_t<scalar_t> mu,
                                                 acc_type_t<scalar_t> one_minus_mu, int lane) {
  using acc_t = acc_type_t<scalar_t>;
  acc_t mx = acc_t(0);
  for (int64_t j = lane; j < d; j += 32) {
    const acc_t wv = mu * to_acc<acc_t>(row[j]) + one_minus_mu * to_acc<acc_t>(xb[j]);
    const acc_t a = wv < acc_t(0) ? -wv : wv;
    mx = a > mx ? a : mx;  // the features are finite: no NaN here
  }
  mx = across_groups_max(mx, 1);  // bitwise identical on every lane
  if (!(mx > acc_t(0)) || isinf(mx)) return;
  acc_t sq = acc_t(0);
  for (int64_t j = lane; j < d; j += 32) {
    const acc_t wv = (mu * to_acc<acc_t>(row[j]) + one_minus_mu * to_acc<acc_t>(xb[j])) / mx;
    sq += wv * wv;
  }
  sq = group_sum(sq, 32);
  const acc_t inv_norm = acc_t(1) / math::sqrt(sq);
  for (int64_t j = lane; j < d; j += 32) {
    const acc_t wv = (mu * to_acc<acc_t>(row[j]) + one_minus_mu * to_acc<acc_t>(xb[j])) / mx;
    row[j] = static_cast<bank_t>(wv * inv_norm);
  }
}

template <typename scalar_t, typename bank_t>
__global__ void __launch_bounds__(kMomentumWarps * 32)
    momentum_update_kernel(bank_t* __restrict__ bank, const scalar_t* __restrict__ x,
                           const int64_t* __restrict__ y, const int64_t* __restrict__ sorted_y,
                           const int64_t* __restrict__ order, int64_t B, int64_t d, int64_t n,
                           double momentum) {
  using acc_t = acc_type_t<scalar_t>;
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kMomentumWarps + (threadIdx.x >> 5);
  if (i >= B) return;  // whole warp

  int64_t b, row_id;
  bool winner;
  if (order != nullptr) {  // sorted path: last of each run of equal rows (stable sort)
    b = order[i];
    row_id = sorted_y[i];
    winner = i + 1 == B || sorted_y[i + 1] != row_id;
  } else {  // scan path: no later duplicate in y
    b = i;
    row_id = y[b];
    bool later = false;
    for (int64_t j = b + 1 + lane; j < B; j += 32) later |= y[j] == row_id;
    winner = !__any_sync(kFullMask, later);
  }
  if (!winner || row_id < 0 || row_id >= n) return;  // whole warp

  bank_t* row = bank + row_id * d;
  const scalar_t* xb = x + b * d;
  const acc_t mu = static_cast<acc_t>(momentum);
  const acc_t one_minus_mu = static_cast<acc_t>(1.0 - momentum);
  acc_t sq = acc_t(0);
  bool finite = true;
  for (int64_t j = lane; j < d; j += 32) {
    const acc_t xv = to_acc<acc_t>(xb[j]);
    finite = finite && isfinite(xv);
    const acc_t wv = mu * to_acc<acc_t>(row[j]) + one_minus_mu * xv;
    sq += wv * wv;
  }
  sq = group_sum(sq, 32);  // bitwise identical on every lane
  if (!__all_sync(kFullMask, finite)) return;
  if (!(sq > acc_t(0)) || isinf(sq)) {  // warp-uniform: sq is the same on every lane
    write_rescaled_row<scalar_t, bank_t>(row, xb, d, mu, one_minus_mu, lane);
    return;
  }
  const acc_t inv_norm = acc_t(1) / math::sqrt(sq);
  for (int64_t j = lane; j < d; j += 32) {
    const acc_t wv = mu * to_acc<acc_t>(row[j]) + one_minus_mu * to_acc<acc_t>(xb[j]);
    row[j] = static_cast<bank_t>(wv * inv_norm);
  }
}

}  // namespace cuda
}  // namespace npid
