// CPU ops that scan the whole bank: the exact non-parametric softmax loss and the
// kNN top-k. Both stream the bank in chunks through a GEMM (at::mm, i.e. MKL/oneDNN)
// and keep only O(B * d) or O(Q * k) state between chunks, never the B x n matrix.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "npid/checks.h"

namespace npid {
namespace cpu {
namespace {

// 8192 rows x 256 queries of fp32 logits = 8 MiB: large GEMMs, bounded memory.
constexpr int64_t kBankChunk = 8192;
constexpr int64_t kQueryChunk = 1024;

void check_rows_in_range(const at::Tensor& y, int64_t n, const char* name) {
  if (y.numel() == 0) return;
  const int64_t lo = y.min().item<int64_t>(), hi = y.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < n, name, " holds row ", lo < 0 ? lo : hi, ", outside the bank [0, ",
              n, ")");
}

std::tuple<at::Tensor, at::Tensor> full_softmax_loss(const at::Tensor& x_in,
                                                     const at::Tensor& bank,
                                                     const at::Tensor& y, double temperature) {
  check_features(x_in, "x");
  check_bank(bank, x_in);
  check_index_vector(y, x_in, "y");
  check_temperature(temperature);
  const int64_t n = bank.size(0);
  check_rows_in_range(y, n, "y");
  const at::Tensor x = x_in.contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xa = x.to(acc_type);
  const double inv_t = 1.0 / temperature;
  const int64_t B = x.size(0);

  // Online logsumexp over the chunks: m = running max, l = sum exp(s - m),
  // acc = sum exp(s - m) * w (the softmax-weighted mean of the rows, unnormalised).
  at::Tensor m = at::full({B}, -std::numeric_limits<double>::infinity(), xa.options());
  at::Tensor l = at::zeros({B}, xa.options());
  at::Tensor acc = at::zeros_like(xa);
  for (int64_t start = 0; start < n; start += kBankChunk) {
    const at::Tensor w = bank.narrow(0, start, std::min(kBankChunk, n - start)).to(acc_type);
    const at::Tensor s = at::mm(xa, w.t()).mul_(inv_t);
    const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(1)));
    const at::Tensor scale = (m - m_new).exp_();
    const at::Tensor p = (s - m_new.unsqueeze(1)).exp_();
    l = l * scale + p.sum(1);
    acc = acc * scale.unsqueeze(1) + at::mm(p, w);
    m = m_new;
  }
  const at::Tensor w_pos = bank.index_select(0, y).to(acc_type);
  const at::Tensor s_pos = (xa * w_pos).sum(1).mul_(inv_t);
  const at::Tensor loss = m + l.log() - s_pos;
  const at::Tensor grad_x = (acc / l.unsqueeze(1) - w_pos).mul_(inv_t);
  return {loss.to(x.scalar_type()), grad_x.to(x.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> knn_topk(const at::Tensor& query_in, const at::Tensor& bank,
                                            int64_t k) {
  check_features(query_in, "query");
  check_bank(bank, query_in, "query");
  const int64_t n = bank.size(0), Q = query_in.size(0);
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, n_data = ", n, "], got ", k);
  const auto acc_type = query_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor query = query_in.to(acc_type).contiguous();
  at::Tensor out_sims = at::empty({Q, k}, query.options());
  at::Tensor out_idx = at::empty({Q, k}, query.options().dtype(at::kLong));
  for (int64_t q0 = 0; q0 < Q; q0 += kQueryChunk) {
    const int64_t qn = std::min(kQueryChunk, Q - q0);
    const at::Tensor q = query.narrow(0, q0, qn);
    // Running top-k, merged with each chunk's similarities by one topk over k + chunk columns.
    at::Tensor best_sims = at::full({qn, 0}, 0.0, query.options());
    at::Tensor best_idx = at::empty({qn, 0}, out_idx.options());
    for (int64_t start = 0; start < n; start += kBankChunk) {
      const int64_t rows = std::min(kBankChunk, n - start);
      const at::Tensor s = at::mm(q, bank.narrow(0, start, rows).to(acc_type).t());
      const at::Tensor ids = at::arange(start, start + rows, out_idx.options()).expand({qn, rows});
      const at::Tensor cand_sims = at::cat({best_sims, s}, 1);
      const at::Tensor cand_idx = at::cat({best_idx, ids}, 1);
      const int64_t keep = std::min(k, cand_sims.size(1));
      auto top = at::topk(cand_sims, keep, 1, /*largest=*/true, /*sorted=*/true);
      best_sims = std::get<0>(top);
      best_idx = cand_idx.gather(1, std::get<1>(top));
    }
    out_sims.narrow(0, q0, qn).copy_(best_sims);
    out_idx.narrow(0, q0, qn).copy_(best_idx);
  }
  return {out_sims.to(query_in.scalar_type()), out_idx};
}

}  // namespace

TORCH_LIBRARY_IMPL(npid, CPU, m) {
  m.impl("full_softmax_loss", &full_softmax_loss);
  m.impl("knn_topk", &knn_topk);
}

}  // namespace cpu
}  // namespace npid
