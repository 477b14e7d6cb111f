// The CUDA ops on the whole bank (host side, shared by the CUDA build, bank_cuda.cu, and the
// emulated build, csrc/emu/): the momentum (proximal) update, the exact non-parametric
// softmax loss and the kNN top-k.
//
// momentum_update_: one warp per sample, 8 warps per block. A sample writes its row only if
// it is the last occurrence of that row in y (lemniscate's sequential index_copy_): for
// B <= kScanDuplicatesMax each warp scans y[b+1:] (coalesced, L1/L2-resident); for larger
// batches y is stably sorted once (at::sort, no host sync) and the last entry of each run of
// equal rows wins. Exactly one warp writes a given row, and it reads the row (its pre-call
// value) before writing it, so the result does not depend on scheduling. Pass 1 computes
// |mu w + (1 - mu) x|^2 in acc_t (fp32, double for double features), pass 2 rewrites the
// row normalised, in the bank dtype. Samples with an out-of-range row or non-finite features,
// or whose new row has zero / infinite norm, are skipped (see host_common.h).
//
// full_softmax_loss / knn_topk: the chunked ATen implementation shared with the CPU ops
// (csrc/bank_scan.cpp: cuBLAS GEMM per chunk at the requested precision, online logsumexp /
// running top-k), with larger chunks and no host sync: the row-range check of y is a NaN mask
// on the device instead of .item(). A fused tensor-core kernel is future work.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "host_common.h"
#include "momentum_kernels.cuh"
#include "npid/bank_scan.h"
#include "npid/checks.h"
#include "npid/dispatch.h"

namespace npid {
namespace cuda {

constexpr int64_t kScanDuplicatesMax = 2048;

inline void momentum_update_(at::Tensor& bank, const at::Tensor& x_in, const at::Tensor& y_in,
                      double momentum) {
  check_features(x_in, "x", /*allow_bf16=*/true);
  check_bank(bank, x_in);
  check_index_vector(y_in, x_in, "y");
  TORCH_CHECK(bank.is_contiguous(), "bank must be contiguous to be updated in place");
  TORCH_CHECK(momentum >= 0 && momentum <= 1, "momentum must be in [0, 1], got ", momentum);
  const gpu::DeviceGuard guard(bank.device());
  const at::Tensor x = x_in.contiguous(), y = y_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), n = bank.size(0);
  if (sync_checks_enabled() && B > 0) {
    // Same checks and messages as the CPU op, before anything is written.
    const at::Tensor bad = y.lt(0).logical_or_(y.ge(n));
    if (bad.any().item<bool>()) {
      const int64_t b = bad.to(at::kInt).argmax().item<int64_t>();
      TORCH_CHECK(false, "y[", b, "] = ", y[b].item<int64_t>(), " is outside the bank [0, ", n,
                  ")");
    }
    TORCH_CHECK(at::isfinite(x).all().item<bool>(),
                "x holds NaN or inf features; refusing to write them into the bank");
    // A winning row whose mix is zero (or overflows) cannot be normalised (the CPU op raises too);
    // any other finite mix can, however far from unit length (the kernel rescales it).
    const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor order_b = at::arange(B, y.options());
    const at::Tensor last = at::full({n}, -1, y.options())
                                .scatter_reduce_(0, y, order_b, "amax", /*include_self=*/true);
    const at::Tensor winner = last.index_select(0, y).eq(order_b);  // last occurrence wins
    const at::Tensor mixed = bank.index_select(0, y).to(acc_type).mul_(momentum)
                                 .add_(x.to(acc_type), 1.0 - momentum);
    const at::Tensor largest = mixed.abs().amax(1);
    const at::Tensor degenerate =
        largest.gt(0).logical_and_(largest.isfinite()).logical_not_().logical_and_(winner);
    if (degenerate.any().item<bool>()) {
      const int64_t b = degenerate.to(at::kInt).argmax().item<int64_t>();
      TORCH_CHECK(false, "momentum update of bank row ", y[b].item<int64_t>(), " (x[", b,
                  "]) has zero norm (or overflows) and cannot be normalised; bank left unchanged");
    }
  }
  if (B == 0 || d == 0) return;

  at::Tensor sorted_y, order;
  if (B > kScanDuplicatesMax) {
    auto sorted = at::sort(y, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    sorted_y = std::get<0>(sorted);
    order = std::get<1>(sorted);
  }
  const unsigned blocks = static_cast<unsigned>((B + kMomentumWarps - 1) / kMomentumWarps);
  dispatch_features_bank(x.scalar_type(), bank.scalar_type(), "momentum_update_",
                         [&](auto xt, auto bt) {
    using scalar_t = decltype(xt);
    using bank_t = decltype(bt);
    gpu::launch(momentum_update_kernel<scalar_t, bank_t>,
                {"momentum_update_kernel", kMomentumWarps * 32, blocks, kMomentumWarps * 32},
                bank.data_ptr<bank_t>(), x.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(),
                sorted_y.defined() ? sorted_y.const_data_ptr<int64_t>() : nullptr,
                order.defined() ? order.const_data_ptr<int64_t>() : nullptr, B, d, n, momentum);
  });
}

// Rows of the bank per GEMM chunk: about 2^24 logits (64 MiB fp32) per chunk, at least 8192,
// and at most 2^26 converted bank elements (a 16-bit bank is upcast one chunk at a time).
inline int64_t bank_chunk_rows(int64_t B, int64_t n, int64_t d) {
  int64_t rows = std::max<int64_t>(8192, (int64_t(1) << 24) / std::max<int64_t>(B, 1));
  rows = std::min(rows, std::max<int64_t>(1024, (int64_t(1) << 26) / std::max<int64_t>(d, 1)));
  return std::min(n, rows);
}

// Positions of y outside [0, n) become NaN (no host sync); rows are read clamped.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> full_softmax_loss(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y, double temperature,
    c10::string_view precision, bool compute_grad, double proximal) {
  check_features(x, "x", /*allow_bf16=*/true);
  check_bank(bank, x);
  check_index_vector(y, x, "y");
  check_temperature(temperature);
  check_proximal(proximal);
  const gpu::DeviceGuard guard(x.device());
  const int64_t n = bank.size(0);
  if (sync_checks_enabled()) check_rows_in_bank(y, n, "y");
  return full_softmax_streamed(x, bank, y, temperature, precision, compute_grad,
                               bank_chunk_rows(x.size(0), n, x.size(1)), /*y_checked=*/false,
                               proximal);
}

inline std::tuple<at::Tensor, at::Tensor> knn_topk(const at::Tensor& query, const at::Tensor& bank,
                                            int64_t k, c10::string_view precision) {
  const gpu::DeviceGuard guard(query.device());
  // 2048 queries x 32768 rows of fp32 similarities = 256 MiB per chunk.
  return knn_topk_streamed(query, bank, k, precision, /*query_chunk=*/2048,
                           /*bank_chunk=*/std::max<int64_t>(32768, k));
}

inline void register_bank_ops(torch::Library& m) {
  m.impl("momentum_update_", &momentum_update_);
  m.impl("full_softmax_loss", &full_softmax_loss);
  m.impl("knn_topk", &knn_topk);
}

}  // namespace cuda
}  // namespace npid
