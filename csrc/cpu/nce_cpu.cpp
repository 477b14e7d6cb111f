// CPU kernels for the sampled-row ops: negative sampling, lemniscate's NCE scores
// and their backward, Z estimation, and the fused one-pass NCE / softmax-CE losses.
// Sample order: each sample b is independent, at::parallel_for over the batch, the sample's
// features held in a small acc_t buffer, each of its K+1 rows read once. The fused losses switch
// to tile order (pair_order.h) when there are at least as many (sample, row) pairs as bank rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "loss_epilogues.h"
#include "pair_order.h"
#include "npid/checks.h"
#include "npid/dispatch.h"
#include "npid/loss_terms.h"
#include "npid/sampled_row_ops.h"

namespace npid {
namespace cpu {
namespace {

void report_bad_index(const BadIndexFlag& bad, const char* name, int64_t n_data) {
  if (bad.set.load()) fail_row_outside_bank(name, bad.value, n_data);
}

// The kernels behind the fronts of include/npid/sampled_row_ops.h. Rows outside the bank are
// recorded during the pass and raised after it.
struct CpuEngine {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
  static constexpr bool kBf16Features = false;
  static bool host_checks() { return true; }
  // Shared negatives: B x 8192 fp32 scores per GEMM (2 MiB at B = 64, cache-resident between
  // the two GEMMs and the elementwise pass).
  static int64_t shared_chunk_rows(int64_t B) {
    return std::max<int64_t>(1024,
                             std::min<int64_t>(8192, (int64_t(1) << 19) / std::max<int64_t>(B, 1)));
  }

  static void sample_negatives(const at::Tensor& y, const at::Tensor& rng_state,
                               int64_t n_data, int64_t num_negatives, bool exclude_positive,
                               at::Tensor& out) {
    const int64_t B = y.size(0), columns = num_negatives + 1;
    const int64_t* yp = y.data_ptr<int64_t>();
    int64_t* op = out.data_ptr<int64_t>();
    const int64_t* state = rng_state.data_ptr<int64_t>();
    const uint64_t seed = state[0], offset = state[1];
    BadIndexFlag bad;
    at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        if (yp[b] < 0 || yp[b] >= n_data) bad.record(yp[b]);
        fill_sampled_rows_cpu(b, num_negatives, yp[b], seed, offset, n_data, op + b * columns,
                              exclude_positive);
      }
    });
    report_bad_index(bad, "y", n_data);
  }

  static void nce_scores_backward(const FusedInputs& f, const at::Tensor& go,
                                  const at::Tensor& oc, double temperature,
                                  at::Tensor& grad_x) {
    const at::Tensor &x = f.x, &bank = f.bank, &idxc = f.idx;
    const int64_t B = x.size(0), d = x.size(1), columns = f.columns, n = bank.size(0);
    BadIndexFlag bad;
    dispatch_features_bank(x.scalar_type(), bank.scalar_type(), "nce_scores_backward",
                           [&](auto xt, auto bt) {
      using scalar_t = decltype(xt);
      using bank_t = decltype(bt);
      using acc_t = acc_type_t<scalar_t>;
      const bank_t* bp = bank.data_ptr<bank_t>();
      const int64_t* ip = idxc.data_ptr<int64_t>();
      const scalar_t* gp = go.data_ptr<scalar_t>();
      const scalar_t* opp = oc.data_ptr<scalar_t>();
      scalar_t* gx = grad_x.data_ptr<scalar_t>();
      const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
      at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
        AlignedVector<acc_t> acc(d);
        for (int64_t b = begin; b < end; ++b) {
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t k = 0; k < columns; ++k) {
            const int64_t r = ip[b * columns + k];
            if (r < 0 || r >= n) {
              bad.record(r);
              continue;
            }
            const acc_t coef = static_cast<acc_t>(gp[b * columns + k]) *
                               static_cast<acc_t>(opp[b * columns + k]) * inv_t;
            axpy_row(coef, bp + r * d, acc.data(), d);
          }
          for (int64_t j = 0; j < d; ++j) gx[b * d + j] = static_cast<scalar_t>(acc[j]);
        }
      });
    });
    report_bad_index(bad, "idx", n);
  }

  static void nce_init_z_(at::Tensor& z, const at::Tensor& scores, int64_t n_data) {
    if (z.item<double>() > 0) return;  // already estimated: Z is fixed after the first batch
    const double mean = scores.to(at::kDouble).mean().item<double>();
    z.fill_(mean * static_cast<double>(n_data));
  }

  static void nce_scores(const FusedInputs& f, double temperature, at::Tensor& out) {
    const FusedArgs a = fused_args(f);
    BadIndexFlag bad;
    dispatch_features_bank(a.x.scalar_type(), a.bank.scalar_type(), "nce_scores",
                           [&](auto xt, auto bt) {
      using scalar_t = decltype(xt);
      using bank_t = decltype(bt);
      scalar_t* op = out.data_ptr<scalar_t>();
      auto nothing = [](int64_t) {};
      scan_rows<scalar_t, bank_t>(
          a, temperature, bad, nothing,
          [&](int64_t b, int64_t k, const bank_t*, auto s) NPID_ALWAYS_INLINE_LAMBDA {
            op[b * a.columns + k] = static_cast<scalar_t>(std::exp(s));
          },
          nothing);
    });
    report_bad_index(bad, "idx", a.bank.size(0));
  }

  static void nce_estimate_z_(at::Tensor& z, const FusedInputs& f, double temperature,
                              int64_t n_noise) {
    if (z.item<double>() > 0) return;
    const FusedArgs a = fused_args(f);
    const int64_t B = a.x.size(0);
    ScratchVector<double> per_sample(B, 0.0);
    BadIndexFlag bad;
    dispatch_features_bank(a.x.scalar_type(), a.bank.scalar_type(), "nce_estimate_z_",
                           [&](auto xt, auto bt) {
      using scalar_t = decltype(xt);
      using bank_t = decltype(bt);
      scan_rows<scalar_t, bank_t>(
          a, temperature, bad, [](int64_t) {},
          [&](int64_t b, int64_t, const bank_t*, auto s) NPID_ALWAYS_INLINE_LAMBDA { per_sample[b] += std::exp(double(s)); },
          [](int64_t) {});
    });
    report_bad_index(bad, f.rows_name(), a.bank.size(0));
    double total = 0;
    for (double v : per_sample) total += v;
    TORCH_CHECK(std::isfinite(total),
                "x (or bank) holds NaN or inf features: the first batch's mean score is ", total,
                "; z left unset");
    z.fill_(total / static_cast<double>(B * a.columns) * static_cast<double>(n_noise));
  }

  static void nce_loss(const FusedInputs& f, const at::Tensor& z, double temperature,
                       int64_t n_noise, double proximal, NceLossOutputs& out) {
    const FusedArgs a = fused_args(f);
    const double zv = z.item<double>();
    const int64_t B = a.x.size(0), d = a.x.size(1), n = a.bank.size(0);
    at::Tensor &loss = out.loss, &grad_x = out.grad_x, &noise_exp_sum = out.noise_exp_sum;
    at::Tensor& positive_sq_dist = out.positive_sq_dist;
    BadIndexFlag bad;
    const PairPlan plan = plan_pairs(a, bad);
    dispatch_features_bank(a.x.scalar_type(), a.bank.scalar_type(), "nce_loss",
                           [&](auto xt, auto bt) {
      using scalar_t = decltype(xt);
      using bank_t = decltype(bt);
      using acc_t = acc_type_t<scalar_t>;
      const acc_t inv_z = static_cast<acc_t>(1.0 / zv);
      const acc_t c = static_cast<acc_t>(double(a.columns - 1) / double(n_noise));
      const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
      scalar_t* lp = loss.data_ptr<scalar_t>();
      scalar_t* gp = grad_x.data_ptr<scalar_t>();
      const double inv_c = double(n_noise) / double(a.columns - 1);
      const int64_t chunks = plan.chunks, slots = plan.slots(), stride = plan.slot_stride;
      AlignedVector<acc_t> grad(slots * d, acc_t(0));
      AlignedVector<double> slot_loss(slots, 0.0), negatives_product(slots, 1.0), exp_sum(slots, 0.0);
      const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
      acc_t* sq_dist = positive_sq_dist.data_ptr<acc_t>();
      const acc_t two_lambda = static_cast<acc_t>(2.0 * proximal);
      score_pairs<scalar_t, bank_t>(
          a, plan, temperature, bad,
          NceEpilogue<scalar_t, acc_t>{.inv_z = inv_z, .c = c, .inv_t = inv_t, .inv_c = inv_c,
                                       .d = d, .stride = stride, .xp = xp, .sq_dist = sq_dist,
                                       .two_lambda = two_lambda, .slot_loss = slot_loss.data(),
                                       .negatives_product = negatives_product.data(),
                                       .exp_sum = exp_sum.data(), .grad_slots = grad.data()},
          grad.data());
      // Each sample's slots added chunk by chunk, in a fixed order.
      double* ep = noise_exp_sum.data_ptr<double>();
      at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          double l = 0, e = 0;
          for (int64_t ch = 0; ch < chunks; ++ch) {
            const int64_t slot = ch * stride + b;
            l += slot_loss[slot] + std::log(negatives_product[slot]);
            e += exp_sum[slot];
            if (ch > 0)
              for (int64_t j = 0; j < d; ++j) grad[b * d + j] += grad[slot * d + j];
          }
          if (proximal != 0) l += proximal * static_cast<double>(sq_dist[b]);
          lp[b] = static_cast<scalar_t>(l);
          ep[b] = e;
          for (int64_t j = 0; j < d; ++j) gp[b * d + j] = static_cast<scalar_t>(grad[b * d + j]);
        }
      });
    });
    report_bad_index(bad, f.rows_name(), n);
  }

  static void softmax_ce_loss(const FusedInputs& f, double temperature, double proximal,
                              at::Tensor& loss, at::Tensor& grad_x,
                              at::Tensor& positive_sq_dist) {
    const FusedArgs a = fused_args(f);
    const int64_t B = a.x.size(0), d = a.x.size(1), n = a.bank.size(0);
    BadIndexFlag bad;
    const PairPlan plan = plan_pairs(a, bad);
    dispatch_features_bank(a.x.scalar_type(), a.bank.scalar_type(), "softmax_ce_loss",
                           [&](auto xt, auto bt) {
      using scalar_t = decltype(xt);
      using bank_t = decltype(bt);
      using acc_t = acc_type_t<scalar_t>;
      const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
      scalar_t* lp = loss.data_ptr<scalar_t>();
      scalar_t* gp = grad_x.data_ptr<scalar_t>();
      // The slots of one sample are merged below as flash-decoding merges its splits.
      const int64_t chunks = plan.chunks, slots = plan.slots(), stride = plan.slot_stride;
      AlignedVector<acc_t> acc(slots * d, acc_t(0)), w0(B * d, acc_t(0));
      AlignedVector<acc_t> m(slots, -std::numeric_limits<acc_t>::infinity()), l(slots, 0);
      ScratchVector<acc_t> s0(B, 0);
      score_pairs<scalar_t, bank_t>(
          a, plan, temperature, bad,
          SoftmaxCeEpilogue<acc_t>{.d = d, .stride = stride, .m = m.data(), .l = l.data(),
                                   .acc = acc.data(), .s0 = s0.data(), .w0 = w0.data()},
          acc.data());
      const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
      acc_t* sq_dist = positive_sq_dist.data_ptr<acc_t>();
      const acc_t two_lambda = static_cast<acc_t>(2.0 * proximal);
      at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          acc_t mb = m[b];
          for (int64_t ch = 1; ch < chunks; ++ch) mb = std::max(mb, m[ch * stride + b]);
          acc_t lb = 0;
          acc_t* ab = acc.data() + b * d;
          for (int64_t ch = 0; ch < chunks; ++ch) {
            const int64_t slot = ch * stride + b;
            if (l[slot] == acc_t(0)) continue;  // no pairs of b in this chunk
            const acc_t scale = std::exp(m[slot] - mb);
            lb += l[slot] * scale;
            if (ch == 0) {
              for (int64_t j = 0; j < d; ++j) ab[j] *= scale;
            } else {
              for (int64_t j = 0; j < d; ++j) ab[j] += acc[slot * d + j] * scale;
            }
          }
          // The proximal term from w0, the positive's row as the pass converted it.
          const scalar_t* xb = xp + b * d;
          const acc_t* wb = w0.data() + b * d;
          sq_dist[b] = positive_proximal(xb, wb, d, acc_t(0), static_cast<acc_t*>(nullptr));
          const acc_t inv_l = acc_t(1) / lb;
          if (proximal == 0) {
            lp[b] = static_cast<scalar_t>(mb + std::log(lb) - s0[b]);
            for (int64_t j = 0; j < d; ++j)
              gp[b * d + j] = static_cast<scalar_t>((ab[j] * inv_l - w0[b * d + j]) * inv_t);
          } else {
            lp[b] = static_cast<scalar_t>(mb + std::log(lb) - s0[b] +
                                          static_cast<acc_t>(proximal) * sq_dist[b]);
            for (int64_t j = 0; j < d; ++j)
              gp[b * d + j] = static_cast<scalar_t>((ab[j] * inv_l - wb[j]) * inv_t +
                                                    two_lambda * (static_cast<acc_t>(xb[j]) - wb[j]));
          }
        }
      });
    });
    report_bad_index(bad, f.rows_name(), n);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(npid, CPU, m) { SampledRowOps<CpuEngine>::register_ops(m); }

}  // namespace cpu
}  // namespace npid
