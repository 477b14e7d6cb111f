// CPU ops that scan the whole bank: the exact non-parametric softmax loss and the
// kNN top-k. Both stream the bank in chunks through a GEMM (at::mm, i.e. MKL/oneDNN)
// and keep only O(B * d) or O(Q * k) state between chunks, never the B x n matrix.
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
// kNN: 256 queries x 16384 rows = 16 MiB of similarities per chunk (cache-resident).
constexpr int64_t kKnnQueryRows = 256;
constexpr int64_t kKnnBankChunk = 16384;

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

// A neighbour candidate (similarity, bank row) and the order of the result: larger similarity
// first, NaN before everything (as torch.topk ranks it), ties by the smaller row.
template <typename acc_t>
using Neighbour = std::pair<acc_t, int64_t>;

template <typename acc_t>
bool ranks_before(const Neighbour<acc_t>& a, const Neighbour<acc_t>& b) {
  const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a.first != b.first) return a.first > b.first;
  return a.second < b.second;
}

// Keeps the first k entries of buf[0, count) in result order, the others dropped.
template <typename acc_t>
void keep_best(Neighbour<acc_t>* buf, int64_t& count, int64_t k) {
  if (count > k) {
    std::nth_element(buf, buf + (k - 1), buf + count, ranks_before<acc_t>);
    count = k;
  }
}

// The k best rows per query, the bank streamed through a GEMM chunk by chunk. Each query keeps
// its candidates in a buffer of 2k and a threshold, the k-th best similarity so far: a
// similarity is appended only if it is above (or NaN), which after the first chunks is rare;
// a full buffer is cut back to its k best (nth_element) and the threshold raised. Selecting
// thus costs about one compare per similarity: a topk per chunk plus a merge cost as much as
// the GEMM itself. Chunks of kKnnQueryRows x kKnnBankChunk similarities (16 MiB) stay in the
// last-level cache between the GEMM and the scan.
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> running_topk(const at::Tensor& query, const at::Tensor& bank,
                                                int64_t k, ScanPrecision precision) {
  const int64_t Q = query.size(0), n = bank.size(0);
  at::Tensor out_sims = at::empty({Q, k}, query.options());
  at::Tensor out_idx = at::empty({Q, k}, query.options().dtype(at::kLong));
  acc_t* sims_out = out_sims.data_ptr<acc_t>();
  int64_t* idx_out = out_idx.data_ptr<int64_t>();
  const int64_t cap = 2 * k;
  ScratchVector<Neighbour<acc_t>> buffers;
  ScratchVector<int64_t> counts;
  ScratchVector<acc_t> thresholds;
  for (int64_t q0 = 0; q0 < Q; q0 += kKnnQueryRows) {
    const int64_t qn = std::min(kKnnQueryRows, Q - q0);
    const at::Tensor q = scan_operand(query.narrow(0, q0, qn), query.scalar_type(), precision);
    buffers.assign(static_cast<size_t>(qn * cap), Neighbour<acc_t>{});
    counts.assign(static_cast<size_t>(qn), 0);
    thresholds.assign(static_cast<size_t>(qn), -std::numeric_limits<acc_t>::infinity());
    for (int64_t start = 0; start < n; start += kKnnBankChunk) {
      const int64_t rows = std::min(kKnnBankChunk, n - start);
      const at::Tensor s = scan_mm(q, scan_operand(bank.narrow(0, start, rows), query.scalar_type(), precision).t(),
                                   precision).contiguous();
      const acc_t* sp = s.const_data_ptr<acc_t>();
      at::parallel_for(0, qn, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t r = lo; r < hi; ++r) {
          Neighbour<acc_t>* buf = buffers.data() + r * cap;
          int64_t count = counts[r];
          acc_t threshold = thresholds[r];
          const acc_t* row = sp + r * rows;
          for (int64_t j = 0; j < rows; ++j) {
            const acc_t v = row[j];
            // Above the k-th best so far, or NaN; anything while fewer than k are held (the
            // threshold is -inf then, and -inf similarities must count too).
            if (count < k || !(v <= threshold)) {
              buf[count++] = {v, start + j};
              if (count == cap) {
                keep_best(buf, count, k);
                threshold = buf[k - 1].first;  // the k-th best (nth_element put it there)
              }
            }
          }
          counts[r] = count;
          thresholds[r] = threshold;
        }
      });
    }
    at::parallel_for(0, qn, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        Neighbour<acc_t>* buf = buffers.data() + r * cap;
        int64_t count = counts[r];
        keep_best(buf, count, k);
        std::sort(buf, buf + k, ranks_before<acc_t>);
        for (int64_t i = 0; i < k; ++i) {
          sims_out[(q0 + r) * k + i] = buf[i].first;
          idx_out[(q0 + r) * k + i] = buf[i].second;
        }
      }
    });
  }
  return {out_sims, out_idx};
}

std::tuple<at::Tensor, at::Tensor> knn_topk(const at::Tensor& query_in, const at::Tensor& bank,
                                            int64_t k, c10::string_view precision) {
  const ScanPrecision scan_precision = check_knn_args(query_in, bank, k, precision);
  const auto acc_type = query_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor query = query_in.to(acc_type).contiguous();
  at::Tensor sims, indices;
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "knn_topk", [&] {
    std::tie(sims, indices) = running_topk<scalar_t>(query, bank, k, scan_precision);
  });
  return {sims.to(query_in.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(npid, CPU, m) {
  m.impl("full_softmax_loss", &full_softmax_loss);
  m.impl("knn_topk", &knn_topk);
}

}  // namespace cpu
}  // namespace npid
