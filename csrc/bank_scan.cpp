// See include/npid/bank_scan.h.
#include "npid/bank_scan.h"

#include "npid/checks.h"

#include <algorithm>
#include <limits>

namespace npid {

std::tuple<at::Tensor, at::Tensor, at::Tensor> streamed_logsumexp(const at::Tensor& xa,
                                                                 const at::Tensor& bank,
                                                                 double inv_t, int64_t chunk) {
  const int64_t B = xa.size(0), n = bank.size(0);
  at::Tensor m = at::full({B}, -std::numeric_limits<double>::infinity(), xa.options());
  at::Tensor l = at::zeros({B}, xa.options());
  at::Tensor acc = at::zeros_like(xa);
  for (int64_t start = 0; start < n; start += chunk) {
    const at::Tensor w = bank.narrow(0, start, std::min(chunk, n - start)).to(xa.scalar_type());
    const at::Tensor s = at::mm(xa, w.t()).mul_(inv_t);
    const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(1)));
    const at::Tensor scale = (m - m_new).exp_();
    const at::Tensor p = (s - m_new.unsqueeze(1)).exp_();
    l = l * scale + p.sum(1);
    acc = acc * scale.unsqueeze(1) + at::mm(p, w);
    m = m_new;
  }
  return {m, l, acc};
}

std::tuple<at::Tensor, at::Tensor> streamed_topk(const at::Tensor& query, const at::Tensor& bank,
                                                 int64_t k, int64_t query_chunk,
                                                 int64_t bank_chunk) {
  const int64_t n = bank.size(0), Q = query.size(0);
  at::Tensor out_sims = at::empty({Q, k}, query.options());
  at::Tensor out_idx = at::empty({Q, k}, query.options().dtype(at::kLong));
  for (int64_t q0 = 0; q0 < Q; q0 += query_chunk) {
    const int64_t qn = std::min(query_chunk, Q - q0);
    const at::Tensor q = query.narrow(0, q0, qn);
    // Running top-k, merged with each chunk's similarities by one topk over k + chunk columns.
    at::Tensor best_sims = at::empty({qn, 0}, query.options());
    at::Tensor best_idx = at::empty({qn, 0}, out_idx.options());
    for (int64_t start = 0; start < n; start += bank_chunk) {
      const int64_t rows = std::min(bank_chunk, n - start);
      const at::Tensor s = at::mm(q, bank.narrow(0, start, rows).to(query.scalar_type()).t());
      // The chunk's own top-k first (no index matrix for the whole chunk), then a merge of
      // 2k candidates with the running top-k.
      auto chunk_top = at::topk(s, std::min(k, rows), 1, /*largest=*/true, /*sorted=*/false);
      const at::Tensor cand_sims = at::cat({best_sims, std::get<0>(chunk_top)}, 1);
      const at::Tensor cand_idx = at::cat({best_idx, std::get<1>(chunk_top).add_(start)}, 1);
      auto top = at::topk(cand_sims, std::min(k, cand_sims.size(1)), 1, /*largest=*/true,
                          /*sorted=*/true);
      best_sims = std::get<0>(top);
      best_idx = cand_idx.gather(1, std::get<1>(top));
    }
    out_sims.narrow(0, q0, qn).copy_(best_sims);
    out_idx.narrow(0, q0, qn).copy_(best_idx);
  }
  return {out_sims, out_idx};
}

std::tuple<at::Tensor, at::Tensor> knn_topk_streamed(const at::Tensor& query_in, const at::Tensor& bank,
                                                     int64_t k, int64_t query_chunk,
                                                     int64_t bank_chunk) {
  check_features(query_in, "query", /*allow_bf16=*/true);
  check_bank(bank, query_in, "query");
  const int64_t n = bank.size(0);
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, n_data = ", n, "], got ", k);
  const auto acc_type = query_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sims, indices;
  std::tie(sims, indices) =
      streamed_topk(query_in.to(acc_type).contiguous(), bank, k, query_chunk, bank_chunk);
  return {sims.to(query_in.scalar_type()), indices};
}

}  // namespace npid
