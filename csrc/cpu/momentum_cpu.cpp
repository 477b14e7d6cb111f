// CPU momentum update of the memory bank (lemniscate's proximal step):
//   bank[y_b] <- normalise(momentum * bank[y_b] + (1 - momentum) * x_b).
// Everything is validated before the first write, so a bad call leaves the bank as it was.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>
#include <vector>

#include "cpu_common.h"
#include "npid/checks.h"
#include "npid/dispatch.h"

namespace npid {
namespace cpu {
namespace {

void momentum_update_(at::Tensor& bank, const at::Tensor& x_in, const at::Tensor& y_in,
                      double momentum) {
  check_features(x_in, "x");
  check_bank(bank, x_in);
  check_index_vector(y_in, x_in, "y");
  TORCH_CHECK(bank.is_contiguous(), "bank must be contiguous to be updated in place");
  TORCH_CHECK(momentum >= 0 && momentum <= 1, "momentum must be in [0, 1], got ", momentum);
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), n = bank.size(0);
  const int64_t* yp = y.data_ptr<int64_t>();

  // Validate first: rows in range, features finite (a NaN would poison the bank row forever).
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(yp[b] >= 0 && yp[b] < n, "y[", b, "] = ", yp[b], " is outside the bank [0, ", n,
                ")");
  TORCH_CHECK(all_finite(x),
              "x holds NaN or inf features; refusing to write them into the bank");

  // Duplicates: the last occurrence of a row in y wins (lemniscate's sequential index_copy_).
  ScratchVector<int64_t> writers;
  writers.reserve(B);
  {
    ScratchMap<int64_t, int64_t> last;
    last.reserve(B * 2);
    for (int64_t b = 0; b < B; ++b) last[yp[b]] = b;
    for (int64_t b = 0; b < B; ++b)
      if (last[yp[b]] == b) writers.push_back(b);
  }

  dispatch_features_bank(x.scalar_type(), bank.scalar_type(), "momentum_update_",
                         [&](auto xt, auto bt) {
    using scalar_t = decltype(xt);
    using bank_t = decltype(bt);
    using acc_t = acc_type_t<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    bank_t* bp = bank.data_ptr<bank_t>();
    const acc_t mu = static_cast<acc_t>(momentum), one_minus_mu = static_cast<acc_t>(1.0 - momentum);
    const int64_t W = static_cast<int64_t>(writers.size());
    // New rows go to a scratch buffer first: a row whose mix has zero norm (x = -m/(1-m) * row)
    // would become NaN, and the check must come before any row is written.
    ScratchVector<acc_t> fresh(W * d);
    ScratchVector<char> degenerate(W, 0);
    at::parallel_for(0, W, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t b = writers[i];
        const bank_t* row = bp + yp[b] * d;
        acc_t* w = fresh.data() + i * d;
        acc_t sq = 0;
        for (int64_t j = 0; j < d; ++j) {
          w[j] = mu * static_cast<acc_t>(row[j]) + one_minus_mu * static_cast<acc_t>(xp[b * d + j]);
          sq += w[j] * w[j];
        }
        if (!(sq > 0) || !std::isfinite(sq)) {
          // |w|^2 over- or underflowed: normalise w / max|w_j| (squared norm in [1, d]), as the
          // CUDA kernel does. Only a zero or non-finite mix cannot be normalised.
          acc_t mx = 0;
          for (int64_t j = 0; j < d; ++j) mx = std::max(mx, std::abs(w[j]));
          degenerate[i] = !(mx > 0) || !std::isfinite(mx);
          if (degenerate[i]) continue;
          sq = 0;
          for (int64_t j = 0; j < d; ++j) {
            w[j] /= mx;
            sq += w[j] * w[j];
          }
        }
        const acc_t inv_norm = acc_t(1) / std::sqrt(sq);
        for (int64_t j = 0; j < d; ++j) w[j] *= inv_norm;
      }
    });
    for (int64_t i = 0; i < W; ++i)
      TORCH_CHECK(!degenerate[i], "momentum update of bank row ", yp[writers[i]], " (x[", writers[i],
                  "]) has zero norm (or overflows) and cannot be normalised; bank left unchanged");
    at::parallel_for(0, W, 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        bank_t* row = bp + yp[writers[i]] * d;
        const acc_t* w = fresh.data() + i * d;
        for (int64_t j = 0; j < d; ++j) row[j] = static_cast<bank_t>(w[j]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(npid, CPU, m) { m.impl("momentum_update_", &momentum_update_); }

}  // namespace cpu
}  // namespace npid
