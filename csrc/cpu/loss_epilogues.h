// The fused losses' epilogues: what each does with a block of scored pairs (pair_order.h's
// PairBlock), turning every score into its row's coefficient in the slot's gradient (or
// online-softmax) accumulator and keeping the slot's per-sample sums. Each holds values and raw
// pointers only, so that each thread's copy of it (see score_tiles_in_chunks) reads nothing
// from the calling thread's stack.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "npid/loss_terms.h"
#include "pair_order.h"
#include "simd.h"

namespace npid {
namespace cpu {

// The proximal term of a sample's positive row v (the paper's eq. 10), from the features x and
// the row the fused pass already holds: returns sum_j (x_j - v_j)^2 in acc_t and, when
// two_lambda != 0, adds two_lambda * (x_j - v_j) into grad. A plain loop in a fixed order: d
// operations per sample next to the pass's K * d, and the same sum on every ISA path.
template <typename acc_t, typename x_t, typename row_t>
NPID_ALWAYS_INLINE acc_t positive_proximal(const x_t* __restrict__ x, const row_t* __restrict__ v,
                                           int64_t d, acc_t two_lambda, acc_t* __restrict__ grad) {
  acc_t sq = 0;
  for (int64_t j = 0; j < d; ++j) {
    const acc_t diff = static_cast<acc_t>(x[j]) - static_cast<acc_t>(v[j]);
    sq += diff * diff;
  }
  if (two_lambda != acc_t(0)) {
    for (int64_t j = 0; j < d; ++j)
      grad[j] += two_lambda * (static_cast<acc_t>(x[j]) - static_cast<acc_t>(v[j]));
  }
  return sq;
}

// NCE (loss_terms.h). One accumulator set per slot (threads own disjoint slots). The
// negatives' terms are summed as the log of a running double-precision product of
// nce_negative_factor()s: one log per slot instead of one log1p per row (the transcendental was
// a third of the loop). The proximal term comes from the positive's row when its pair is scored:
// sq_dist[b], and with lambda > 0 its gradient 2 lambda (x_b - v) added into the pair's slot (the
// slot is one thread's, like the row that follows it into the same accumulator).
template <typename scalar_t, typename acc_t>
struct NceEpilogue {
  acc_t inv_z, c, inv_t;
  double inv_c;  // 1 / c
  int64_t d, stride;  // stride: PairPlan::slot_stride
  const scalar_t* xp;
  acc_t* sq_dist;
  acc_t two_lambda;
  double *slot_loss, *negatives_product, *exp_sum;  // per slot
  acc_t* grad_slots;                                // per slot, d each

  template <typename Block>
  NPID_ALWAYS_INLINE void operator()(Block& block) const {
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
  }
};

// Softmax cross-entropy. Per slot: running max m, sum l = sum exp(s - m), acc = sum exp(s - m)
// * row; per sample the positive's score s0 and row w0 (grad = (acc / l - w0) / T). The slots of
// one sample are merged afterwards as flash-decoding merges its splits.
template <typename acc_t>
struct SoftmaxCeEpilogue {
  int64_t d, stride;  // stride: PairPlan::slot_stride
  acc_t *m, *l, *acc;  // per slot (acc: d each)
  acc_t *s0, *w0;      // per sample (w0: d each)

  template <typename Block>
  NPID_ALWAYS_INLINE void operator()(Block& block) const {
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
  }
};

}  // namespace cpu
}  // namespace npid
