// What the CPU kernels share besides their vector primitives (simd.h): the row source (explicit
// idx or in-kernel Philox), the out-of-range row flag, the per-sample grain.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>

#include "npid/philox.h"
#include "npid/sampled_row_ops.h"
#include "scratch.h"
#include "simd.h"

namespace npid {
namespace cpu {

// fill_sampled_rows (philox.h) with the Philox calls in vector lanes where the CPU has AVX2
// (philox_cpu.cpp): the same rows.
void fill_sampled_rows_cpu(int64_t b, int64_t K, int64_t positive, uint64_t seed,
                           uint64_t offset, int64_t n_data, int64_t* rows, bool exclude_positive);

// Where row (b, k) of the gathered set comes from.
struct RowSource {
  const int64_t* idx = nullptr;  // (B, K+1) contiguous, or null for Philox sampling
  const int64_t* y = nullptr;    // positives, used when sampling
  int64_t columns = 0;           // K + 1
  int64_t n_data = 0;
  uint64_t seed = 0, offset = 0;
  bool exclude_positive = false;  // sampling: negatives uniform over the rows other than y[b]

  // All K+1 rows of sample b.
  void fill(int64_t b, int64_t* rows) const {
    if (idx != nullptr) {
      std::copy(idx + b * columns, idx + (b + 1) * columns, rows);
    } else {
      fill_sampled_rows_cpu(b, columns - 1, y[b], seed, offset, n_data, rows, exclude_positive);
    }
  }
};

// The rows of the checked inputs f (which must outlive the RowSource).
inline RowSource row_source(const FusedInputs& f) {
  RowSource src;
  src.columns = f.columns;
  src.n_data = f.bank.size(0);
  src.exclude_positive = f.exclude_positive;
  if (f.y.defined()) src.y = f.y.data_ptr<int64_t>();
  if (f.idx.defined()) {
    src.idx = f.idx.data_ptr<int64_t>();
  } else {
    const int64_t* state = f.rng.data_ptr<int64_t>();
    src.seed = static_cast<uint64_t>(state[0]);
    src.offset = static_cast<uint64_t>(state[1]);
  }
  return src;
}

// Records the first out-of-range row seen by any thread, reported after the loop.
struct BadIndexFlag {
  std::atomic<bool> set{false};
  int64_t value = 0;
  void record(int64_t v) {
    bool expected = false;
    if (set.compare_exchange_strong(expected, true)) value = v;
  }
};

// Whether every value of the float32 / float64 tensor t is finite. A plain loop (v - v is 0
// only for finite v): at::isfinite(t).all() runs five ops, ~45 us for a batch of features,
// about 1% of a training step.
inline bool all_finite(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "all_finite", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    bool finite = true;
    for (int64_t i = 0, n = c.numel(); i < n; ++i) finite &= (p[i] - p[i] == scalar_t(0));
    return finite;
  });
}

// Per-sample work is ~K*d multiply-adds; one sample per grain keeps both cores busy at B=1..4.
constexpr int64_t kSampleGrain = 1;

}  // namespace cpu
}  // namespace npid
