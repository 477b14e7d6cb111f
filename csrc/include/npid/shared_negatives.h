// Shared negatives: one set of m noise rows per step, scored against all B samples by a GEMM
// (schemas.h, op 8). Device-generic like bank_scan.h: the CPU and CUDA ops (and the emulated
// CUDA library) check their arguments, draw the rows with their own Philox sampler and call
// shared_negatives_loss(). The rows are read once per step instead of once per sample: the
// step moves m * d bank elements, not B * m * d, and its products run on the GEMM units
// (cuBLAS / tensor cores on CUDA, MKL on the CPU).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string_view>
#include <tuple>

namespace npid {

enum class SharedLoss { kNce, kSoftmaxCe };

// The device's sample_negatives kernel: (B, K+1) rows, column 0 = y (schemas.h, op 7).
using SampleNegativesFn = at::Tensor (*)(const at::Tensor& y, const at::Tensor& rng_state,
                                         int64_t n_data, int64_t num_negatives,
                                         bool exclude_positive);

struct SharedNegativesArgs {
  SharedLoss loss = SharedLoss::kNce;
  double temperature = 0.07;
  bool exclude_positive = false;
  int64_t n_data = -1;  // NCE's n of Pn = 1/n; -1: the bank's rows
  std::string_view precision = "fp32";
  int64_t chunk_rows = -1;  // noise rows per GEMM; -1: the device's default
  // Rows known to lie in the bank (checked on the host, the CPU); otherwise rows outside give
  // NaN losses instead of a host sync (CUDA).
  bool rows_checked = false;
  double proximal = 0.0;  // lambda of the proximal term (schemas.h)
};

// Checks every argument, draws the noise rows (rows == None) with `sample`, and returns
// (per-sample loss, grad_x, noise_exp_sum, positive_sq_dist): loss and grad_x in x's dtype,
// noise_exp_sum float64 (undefined for softmax-CE), positive_sq_dist in the accumulation dtype.
// `default_chunk` applies when args.chunk_rows is -1.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_negatives_loss(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
    const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& rng_state,
    const c10::optional<at::Tensor>& z, int64_t num_negatives, const SharedNegativesArgs& args,
    SampleNegativesFn sample, int64_t default_chunk);

// The row replacing shared noise column j for sample b when it equals the sample's positive
// (exclude_positive): element b * m + j of the Philox stream [seed, offset | 2^63], uniform over
// the n - 1 rows other than `positive` (what sample_negatives(exclude_positive=True) would draw
// at sample b, column 1 + j, with that offset).
int64_t shared_replacement_row(int64_t b, int64_t j, int64_t m, int64_t positive, uint64_t seed,
                               uint64_t offset, int64_t n_data);

}  // namespace npid
