// Per-row loss terms and their derivatives w.r.t. the score s = w . x / T.
// Shared by the CPU and CUDA kernels so both compute the same arithmetic.
#pragma once
#include "npid/math.h"
#include "npid/philox.h"

namespace npid {

// lemniscate's NCECriterion eps.
constexpr double kNceEps = 1e-7;

// NCE with P = exp(s) / Z and c = K / n (K noise samples from the uniform P_n = 1/n):
//   positive (k = 0): -log(P / (P + c + eps)) = log1p((c + eps) / P)
//   negative (k > 0): -log(c / (P + c + eps)) = log1p((P + eps) / c)
// log1p keeps the negatives' terms, often ~P/c << 1, to full relative precision
// (log(c / (P + c)) in fp32 loses about four digits).
// dloss/ds: positive -(c + eps) / (P + c + eps), negative P / (P + c + eps).
// The same from e = exp(s) (the CUDA kernels also sum e over the noise columns for Z).
template <typename acc_t>
NPID_HOST_DEVICE void nce_term_of_exp(acc_t e, bool positive, acc_t inv_z, acc_t c, acc_t& loss,
                                      acc_t& dloss_ds) {
  const acc_t eps = static_cast<acc_t>(kNceEps);
  const acc_t p = e * inv_z;
  const acc_t denom = p + c + eps;
  if (positive) {
    loss = math::log1p((c + eps) / p);
    dloss_ds = -(c + eps) / denom;
  } else {
    loss = math::log1p((p + eps) / c);
    dloss_ds = p / denom;
  }
}

template <typename acc_t>
NPID_HOST_DEVICE void nce_term(acc_t s, bool positive, acc_t inv_z, acc_t c, acc_t& loss,
                               acc_t& dloss_ds) {
  nce_term_of_exp<acc_t>(math::exp(s), positive, inv_z, c, loss, dloss_ds);
}

// Online softmax state (flash-attention style): max m, sum l of exp(s - m).
template <typename acc_t>
struct OnlineSoftmax {
  acc_t m;
  acc_t l;
};

}  // namespace npid
