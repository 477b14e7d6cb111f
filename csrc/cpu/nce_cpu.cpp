// CPU kernels for the sampled-row ops: negative sampling, lemniscate's NCE scores
// and their backward, Z estimation, and the fused one-pass NCE / softmax-CE losses.
// Sample order: each sample b is independent, at::parallel_for over the batch, the sample's
// features held in a small acc_t buffer, each of its K+1 rows read once. The fused losses switch
// to tile order (tile_order.h) when there are at least as many (sample, row) pairs as bank rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu_common.h"
#include "npid/checks.h"
#include "npid/dispatch.h"
#include "npid/loss_terms.h"
#include "npid/sampled_row_ops.h"
#include "tile_order.h"

namespace npid {
namespace cpu {
namespace {

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
  static void sample_negatives(const at::Tensor& y, const at::Tensor& rng_state, int64_t n_data,
                               int64_t num_negatives, bool exclude_positive, at::Tensor& out);
  static void nce_scores(const FusedInputs& f, double temperature, at::Tensor& out);
  static void nce_scores_backward(const FusedInputs& f, const at::Tensor& grad_out,
                                  const at::Tensor& out, double temperature, at::Tensor& grad_x);
  static void nce_init_z_(at::Tensor& z, const at::Tensor& scores, int64_t n_data);
  static void nce_estimate_z_(at::Tensor& z, const FusedInputs& f, double temperature,
                              int64_t n_noise);
  static void nce_loss(const FusedInputs& f, const at::Tensor& z, double temperature,
                       int64_t n_noise, double proximal, NceLossOutputs& out);
  static void softmax_ce_loss(const FusedInputs& f, double temperature, double proximal,
                              at::Tensor& loss, at::Tensor& grad_x, at::Tensor& positive_sq_dist);
};

void report_bad_index(const BadIndexFlag& bad, const char* name, int64_t n_data) {
  if (bad.set.load()) fail_row_outside_bank(name, bad.value, n_data);
}

void CpuEngine::sample_negatives(const at::Tensor& y, const at::Tensor& rng_state,
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

void CpuEngine::nce_scores_backward(const FusedInputs& f, const at::Tensor& go,
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

void CpuEngine::nce_init_z_(at::Tensor& z, const at::Tensor& scores, int64_t n_data) {
  if (z.item<double>() > 0) return;  // already estimated: Z is fixed after the first batch
  const double mean = scores.to(at::kDouble).mean().item<double>();
  z.fill_(mean * static_cast<double>(n_data));
}

// The fused passes' view of their inputs: the rows of each sample from its RowSource.
struct FusedArgs {
  at::Tensor x, bank;
  RowSource rows;
  int64_t columns;
};

FusedArgs fused_args(const FusedInputs& f) {
  return {f.x, f.bank, row_source(f), f.columns};
}

// Scores every gathered row of samples [lo, hi): `visit(b, k, row_ptr, s)` with
// s = row . x_b / T, between begin_sample(b) and end_sample(b). Out-of-range rows are
// recorded in `bad` and skipped. A sample's rows are resolved first (Philox or idx) so
// the loop can prefetch the row kPrefetchDistance ahead: the rows are random, so the
// hardware prefetcher cannot guess them and each one would otherwise stall on the cache.
template <typename scalar_t, typename bank_t, typename Begin, typename Visit, typename End>
NPID_ALWAYS_INLINE void scan_range(const FusedArgs& a, double temperature, BadIndexFlag& bad,
                                   int64_t lo, int64_t hi, Begin& begin_sample, Visit& visit,
                                   End& end_sample) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t d = a.x.size(1), n = a.bank.size(0), columns = a.columns;
  const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
  const bank_t* bp = a.bank.const_data_ptr<bank_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(bank_t));
  AlignedVector<acc_t> xb(d);
  ScratchVector<int64_t> rows(columns);
  for (int64_t b = lo; b < hi; ++b) {
    for (int64_t j = 0; j < d; ++j) xb[j] = static_cast<acc_t>(xp[b * d + j]);
    a.rows.fill(b, rows.data());
    for (int64_t k = 0; k < columns; ++k) {
      const int64_t r = rows[k];
      if (r < 0 || r >= n) {
        bad.record(r);
        rows[k] = -1;
      }
    }
    begin_sample(b);
    for (int64_t k = 0; k < columns; ++k) {
      if (k + kPrefetchDistance < columns && rows[k + kPrefetchDistance] >= 0)
        prefetch_row(bp + rows[k + kPrefetchDistance] * d, row_bytes);
      if (rows[k] < 0) continue;
      const bank_t* row = bp + rows[k] * d;
      visit(b, k, row, dot_row(row, xb.data(), d) * inv_t);
    }
    end_sample(b);
  }
}

// scan_range compiled for AVX-512 and AVX2 (picked at run time, see cpu_isa()) and for
// the baseline ISA: the extension is built without -march flags so one wheel runs anywhere.
#define NPID_DEFINE_SCAN_VARIANT(NAME, TARGET)                                              \
  template <typename scalar_t, typename bank_t, typename Begin, typename Visit, typename End> \
  TARGET void NAME(const FusedArgs& a, double temperature, BadIndexFlag& bad, int64_t lo,    \
                   int64_t hi, Begin& begin_sample, Visit& visit, End& end_sample) {          \
    scan_range<scalar_t, bank_t>(a, temperature, bad, lo, hi, begin_sample, visit,           \
                                 end_sample);                                                \
  }
NPID_DEFINE_SCAN_VARIANT(scan_range_avx512, NPID_TARGET_AVX512)
NPID_DEFINE_SCAN_VARIANT(scan_range_avx2, NPID_TARGET_AVX2)
NPID_DEFINE_SCAN_VARIANT(scan_range_baseline, )
#undef NPID_DEFINE_SCAN_VARIANT

template <typename scalar_t, typename bank_t, typename Begin, typename Visit, typename End>
void scan_rows(const FusedArgs& a, double temperature, BadIndexFlag& bad, Begin begin_sample,
               Visit visit, End end_sample) {
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, a.x.size(0), kSampleGrain, [&](int64_t lo, int64_t hi) {
    switch (isa) {
      case CpuIsa::kAvx512:
        scan_range_avx512<scalar_t, bank_t>(a, temperature, bad, lo, hi, begin_sample, visit,
                                            end_sample);
        break;
      case CpuIsa::kAvx2:
        scan_range_avx2<scalar_t, bank_t>(a, temperature, bad, lo, hi, begin_sample, visit,
                                          end_sample);
        break;
      default:
        scan_range_baseline<scalar_t, bank_t>(a, temperature, bad, lo, hi, begin_sample, visit,
                                              end_sample);
    }
  });
}

void CpuEngine::nce_scores(const FusedInputs& f, double temperature, at::Tensor& out) {
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

void CpuEngine::nce_estimate_z_(at::Tensor& z, const FusedInputs& f, double temperature,
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

// How the fused losses visit their gathered pairs: in sample order (scan_rows), or by tiles of
// bank rows (tile_order.h) when use_tile_order() picks it. Accumulators are indexed by slot =
// chunk * slot_stride + b; sample order has one chunk.
struct PairPlan {
  bool by_tile = false;
  TileOrder order;
  int64_t chunks = 1;
  int64_t slot_stride = 0;  // chunk_slot_stride(B)
  int64_t slots() const { return chunks * slot_stride; }
};

PairPlan plan_pairs(const FusedArgs& a, BadIndexFlag& bad) {
  const int64_t B = a.x.size(0), d = a.x.size(1), n = a.bank.size(0);
  PairPlan plan;
  plan.slot_stride = chunk_slot_stride(B);
  plan.by_tile = use_tile_order(B, a.columns, n);
  if (plan.by_tile) {
    const int64_t row_bytes = d * static_cast<int64_t>(a.bank.element_size());
    plan.order = sort_pairs_by_tile(a.rows, B, n, tile_shift_for(row_bytes), bad);
    plan.chunks = tile_order_chunks(plan.order.pairs, plan.order.tiles, B, d);
  }
  return plan;
}

// Scores every in-range pair of the plan and hands them to the loss in PairBlocks:
// epilogue(block) turns block.s[i] (the score of pair i, in slot block.slot[i]) into the
// coefficient with which its row block.row[i] is added to accumulator[slot * d .. + d). Tile
// order hands blocks of up to kPairBlock pairs of one slot, rows in the accumulation dtype; sample order one
// pair at a time, rows in the bank's dtype (epilogues take `auto& block`). Both orders give the
// same sums up to rounding.
template <typename scalar_t, typename bank_t, typename Epilogue>
void score_pairs(const FusedArgs& a, const PairPlan& plan, double temperature, BadIndexFlag& bad,
                 Epilogue epilogue, acc_type_t<scalar_t>* accumulator) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = a.x.size(0), d = a.x.size(1);
  if (!plan.by_tile) {
    scan_rows<scalar_t, bank_t>(
        a, temperature, bad, [](int64_t) {},
        [&](int64_t b, int64_t k, const bank_t* row, acc_t s) NPID_ALWAYS_INLINE_LAMBDA {
          PairBlock<acc_t, bank_t> pair;
          std::fill(pair.s, pair.s + VectorOf<acc_t>::kLanes, acc_t(0));  // the exp's whole vector
          pair.count = 1;
          pair.slot[0] = b;
          pair.positive[0] = k == 0;
          pair.s[0] = s;
          pair.row[0] = row;
          finish_block(pair, epilogue, accumulator, d);
        },
        [](int64_t) {});
    return;
  }
  const at::Tensor xa = a.x.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  score_tiles_in_chunks<acc_t, bank_t>(plan.order, plan.chunks, B, a.bank.size(0),
                                       xa.const_data_ptr<acc_t>(),
                                       a.bank.const_data_ptr<bank_t>(), d, temperature, epilogue,
                                       accumulator);
}

void CpuEngine::nce_loss(const FusedInputs& f, const at::Tensor& z, double temperature,
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
    // One accumulator set per slot (threads own disjoint slots).
    // The negatives' terms are summed as the log of a running double-precision product of
    // nce_negative_factor()s: one log per slot instead of one log1p per row (the
    // transcendental was a third of the loop).
    const int64_t chunks = plan.chunks, slots = plan.slots(), stride = plan.slot_stride;
    AlignedVector<acc_t> grad(slots * d, acc_t(0));
    AlignedVector<double> slot_loss(slots, 0.0), negatives_product(slots, 1.0), exp_sum(slots, 0.0);
    // The proximal term from the positive's row when its pair is scored: sq_dist[b], and with
    // lambda > 0 its gradient 2 lambda (x_b - v) added into the pair's slot (the slot is one
    // thread's, like the row that follows it into the same accumulator).
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    acc_t* sq_dist = positive_sq_dist.data_ptr<acc_t>();
    const acc_t two_lambda = static_cast<acc_t>(2.0 * proximal);
    // The epilogue captures values and raw pointers, so that each thread's copy of it (see
    // score_tiles_in_chunks) reads nothing from the calling thread's stack.
    score_pairs<scalar_t, bank_t>(
        a, plan, temperature, bad,
        [=, slot_loss = slot_loss.data(), negatives_product = negatives_product.data(),
         exp_sum = exp_sum.data(), grad_slots = grad.data()](auto& block) NPID_ALWAYS_INLINE_LAMBDA {
          const int64_t count = block.count;
          acc_t e[kPairBlock], coef[kPairBlock];
          double factor[kPairBlock];
          exp_whole_vectors(block.s, e, count);
          // Every pair as a negative first, in vector lanes: its coefficient dloss/ds / T and
          // its factor of the running product; the positives (one per sample) are redone below.
#pragma omp simd
          for (int64_t i = 0; i < count; ++i) {
            const acc_t p = e[i] * inv_z;
            coef[i] = nce_negative_dloss_ds(p, c) * inv_t;
            factor[i] = nce_negative_factor(static_cast<double>(p), inv_c);
          }
          // Per run of pairs of one slot (tile order's blocks are one run, sample order's one
          // pair): the exp sum and the product in registers, written to the slot once. Through
          // the slot's memory on every pair they were two store-to-load chains, ~15% of the
          // tile-order scoring loop.
          for (int64_t i = 0; i < count;) {
            const int64_t slot = block.slot[i];
            double run_exp_sum = 0, run_product = 1, run_loss = 0;
            for (; i < count && block.slot[i] == slot; ++i) {
              if (block.positive[i]) {
                acc_t l, dl_ds;
                nce_term_of_exp<acc_t>(e[i], true, inv_z, c, l, dl_ds);
                run_loss += l;
                block.s[i] = dl_ds * inv_t;
                const int64_t b = slot % stride;
                sq_dist[b] = positive_proximal(xp + b * d, block.row[i], d, two_lambda,
                                               grad_slots + slot * d);
                continue;
              }
              run_exp_sum += static_cast<double>(e[i]);
              run_product *= factor[i];
              if (run_product > 1e280) {  // fold into the sum long before double overflows
                run_loss += std::log(run_product);
                run_product = 1.0;
              }
              block.s[i] = coef[i];
            }
            exp_sum[slot] += run_exp_sum;
            // Both products are below 1e280, so theirs can overflow (to inf, which compares
            // greater too): then each is folded into the sum on its own.
            double& prod = negatives_product[slot];
            const double merged = prod * run_product;
            if (merged > 1e280) {
              run_loss += std::log(prod) + std::log(run_product);
              prod = 1.0;
            } else {
              prod = merged;
            }
            slot_loss[slot] += run_loss;
          }
        },
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

void CpuEngine::softmax_ce_loss(const FusedInputs& f, double temperature, double proximal,
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
    // Per slot: running max m, sum l = sum exp(s - m), acc = sum exp(s - m) * row; per sample
    // the positive's score s0 and row w0 (grad = (acc / l - w0) / T). The slots of one sample
    // are merged as flash-decoding merges its splits.
    const int64_t chunks = plan.chunks, slots = plan.slots(), stride = plan.slot_stride;
    AlignedVector<acc_t> acc(slots * d, acc_t(0)), w0(B * d, acc_t(0));
    AlignedVector<acc_t> m(slots, -std::numeric_limits<acc_t>::infinity()), l(slots, 0);
    ScratchVector<acc_t> s0(B, 0);
    // Values and raw pointers captured, as in nce_loss.
    score_pairs<scalar_t, bank_t>(
        a, plan, temperature, bad,
        [=, m = m.data(), l = l.data(), acc = acc.data(), s0 = s0.data(),
         w0 = w0.data()](auto& block) NPID_ALWAYS_INLINE_LAMBDA {
          // Per run of pairs of one slot (tile order's blocks are one run, sample order's one
          // pair): the run's max first, rescaling what earlier blocks summed once if it is a new
          // max; then every pair's exp(s - m) against its slot's max in one vector pass, and the
          // run's sum added to the slot once.
          const int64_t count = block.count;
          for (int64_t i = 0; i < count;) {
            const int64_t slot = block.slot[i];
            acc_t run_max = -std::numeric_limits<acc_t>::infinity();
            for (; i < count && block.slot[i] == slot; ++i) {
              const acc_t s = block.s[i];
              if (block.positive[i]) {  // one positive pair per sample: its slot's b is slot % stride
                const int64_t b = slot % stride;
                s0[b] = s;
                for (int64_t j = 0; j < d; ++j) w0[b * d + j] = static_cast<acc_t>(block.row[i][j]);
              }
              run_max = std::max(run_max, s);
            }
            if (run_max > m[slot]) {  // new running max: rescale what was summed so far
              const acc_t scale = std::exp(m[slot] - run_max);
              l[slot] *= scale;
              acc_t* ab = acc + slot * d;
              for (int64_t j = 0; j < d; ++j) ab[j] *= scale;
              m[slot] = run_max;
            }
          }
          for (int64_t i = 0; i < count; ++i) block.s[i] -= m[block.slot[i]];
          exp_whole_vectors(block.s, block.s, count);
          for (int64_t i = 0; i < count;) {
            const int64_t slot = block.slot[i];
            acc_t run_sum = 0;
            for (; i < count && block.slot[i] == slot; ++i) run_sum += block.s[i];
            l[slot] += run_sum;
          }
        },
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

}  // namespace

TORCH_LIBRARY_IMPL(npid, CPU, m) { SampledRowOps<CpuEngine>::register_ops(m); }

}  // namespace cpu
}  // namespace npid
