// Device-generic streaming over the whole bank with ATen ops (GEMM per chunk), shared by the
// CPU and CUDA implementations of full_softmax_loss and knn_topk. Memory stays O(B * chunk),
// never O(B * n). A fused tensor-core kernel for CUDA can replace these per device.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace npid {

// Online logsumexp of s = xa @ bank.T * inv_t over the rows of `bank`, chunk rows at a time
// (flash-attention's rescaling). Returns (m, l, acc): running max, sum exp(s - m), and
// sum exp(s - m) * w, in xa's dtype (the bank is upcast chunk by chunk).
std::tuple<at::Tensor, at::Tensor, at::Tensor> streamed_logsumexp(const at::Tensor& xa,
                                                                 const at::Tensor& bank,
                                                                 double inv_t, int64_t chunk);

// The k largest query . bank[j] (query already in the accumulation dtype), sorted descending,
// merging a running top-k with each chunk of bank rows; queries go query_chunk at a time.
std::tuple<at::Tensor, at::Tensor> streamed_topk(const at::Tensor& query, const at::Tensor& bank,
                                                 int64_t k, int64_t query_chunk,
                                                 int64_t bank_chunk);

// The knn_topk op for any device: checks its arguments, streams in the accumulation dtype
// (float, or double for double queries) and returns similarities in the query's dtype.
std::tuple<at::Tensor, at::Tensor> knn_topk_streamed(const at::Tensor& query, const at::Tensor& bank,
                                                     int64_t k, int64_t query_chunk,
                                                     int64_t bank_chunk);

}  // namespace npid
