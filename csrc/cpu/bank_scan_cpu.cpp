// The CPU exact non-parametric softmax loss: it streams the bank in chunks through a GEMM
// (at::mm, i.e. MKL/oneDNN) and keeps only O(B * d) state between chunks, never the B x n
// matrix. (The kNN top-k, which also scans the whole bank, is knn_cpu.cpp.)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "npid/bank_scan.h"
#include "npid/checks.h"
#include "scratch.h"

namespace npid {
namespace cpu {
namespace {

// 8192 rows x 256 queries of fp32 logits = 8 MiB: large GEMMs, bounded memory.
constexpr int64_t kBankChunk = 8192;

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_softmax_loss(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y, double temperature,
    c10::string_view precision, bool compute_grad, double proximal) {
  check_features(x, "x");
  check_bank(bank, x);
  check_index_vector(y, x, "y");
  check_temperature(temperature);
  check_proximal(proximal);
  check_rows_in_bank(y, bank.size(0), "y");
  return full_softmax_streamed(x, bank, y, temperature, precision, compute_grad, kBankChunk,
                               /*y_checked=*/true, proximal);
}

}  // namespace

TORCH_LIBRARY_IMPL(npid, CPU, m) {
  m.impl("full_softmax_loss", &full_softmax_loss);
}

}  // namespace cpu
}  // namespace npid
