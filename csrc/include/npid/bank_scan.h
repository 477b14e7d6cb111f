// Device-generic streaming over the whole bank with ATen ops (GEMM per chunk), shared by the
// CPU and CUDA implementations of full_softmax_loss and knn_topk. Memory stays O(B * chunk),
// never O(B * n). A fused tensor-core kernel for CUDA can replace these per device.
#pragma once
#include <ATen/ATen.h>

#include <string_view>
#include <tuple>

namespace npid {

// Precision of the products in the bank scans (the `precision` argument of full_softmax_loss
// and knn_topk). Accumulation is always in the accumulation dtype (float32, or float64 for
// double features).
//  * kFP32: exact products in the accumulation dtype. On CUDA this holds even when the user
//    enabled TF32 globally (torch.backends.cuda.matmul.allow_tf32).
//  * kTF32: both operands rounded to TF32 (10-bit mantissa); tensor cores on CUDA.
//  * kBF16: both operands rounded to bfloat16 (8-bit mantissa); tensor cores on CUDA.
// The CPU has neither unit, so it rounds the operands and multiplies in the accumulation
// dtype: the same products a tensor core forms, summed in another order.
enum class ScanPrecision { kFP32, kTF32, kBF16 };

// Parses "fp32" / "tf32" / "bf16"; anything else is an error naming the argument.
ScanPrecision parse_precision(std::string_view precision);

// t with every element rounded to the precision's format (round to nearest even), in t's dtype.
at::Tensor round_to_precision(const at::Tensor& t, ScanPrecision precision);

// A GEMM operand of the scans, prepared once: t in the accumulation dtype, rounded to the
// precision where the products are emulated (CPU, double); on CUDA with float accumulation,
// fp32 (the tensor cores round to TF32 themselves) or bf16.
at::Tensor scan_operand(const at::Tensor& t, at::ScalarType acc_type, ScanPrecision precision);

// a @ b of two scan_operand()s, in the accumulation dtype, with the math mode of the precision.
at::Tensor scan_mm(const at::Tensor& a, const at::Tensor& b, ScanPrecision precision);

// Online logsumexp of s = xa @ bank.T * inv_t over the rows of `bank`, chunk rows at a time
// (flash-attention's rescaling). Returns (m, l, acc): running max, sum exp(s - m), and
// sum exp(s - m) * w, in xa's dtype (the bank is upcast chunk by chunk). without with_acc,
// acc is undefined and the second GEMM per chunk is skipped (loss only).
std::tuple<at::Tensor, at::Tensor, at::Tensor> streamed_logsumexp(const at::Tensor& xa,
                                                                 const at::Tensor& bank,
                                                                 double inv_t, int64_t chunk,
                                                                 ScanPrecision precision,
                                                                 bool with_acc);

// The k largest query . bank[j] (query already in the accumulation dtype), sorted descending,
// merging a running top-k with each chunk of bank rows; queries go query_chunk at a time.
std::tuple<at::Tensor, at::Tensor> streamed_topk(const at::Tensor& query, const at::Tensor& bank,
                                                 int64_t k, int64_t query_chunk,
                                                 int64_t bank_chunk, ScanPrecision precision);

// The full_softmax_loss op's computation for any device, tensor arguments already checked:
// per-sample loss and grad_x in x's dtype and positive_sq_dist in the accumulation dtype, the
// bank streamed `chunk` rows at a time; proximal: lambda of the proximal term (schemas.h),
// checked here. compute_grad false: grad_x is zeros and each chunk costs one GEMM instead of
// two. y_checked: y is known to lie in [0, n) (the CPU checks it on the host); otherwise rows
// outside give NaN (the CUDA path, which must not sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor> full_softmax_streamed(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y, double temperature,
    std::string_view precision, bool compute_grad, int64_t chunk, bool y_checked,
    double proximal);

// knn_topk's argument checks (query, bank, 1 <= k <= n); returns the parsed precision.
ScanPrecision check_knn_args(const at::Tensor& query, const at::Tensor& bank, int64_t k,
                             std::string_view precision);

// The knn_topk op for any device: checks its arguments, streams in the accumulation dtype
// (float, or double for double queries) and returns similarities in the query's dtype.
std::tuple<at::Tensor, at::Tensor> knn_topk_streamed(const at::Tensor& query, const at::Tensor& bank,
                                                     int64_t k, std::string_view precision,
                                                     int64_t query_chunk, int64_t bank_chunk);

}  // namespace npid
