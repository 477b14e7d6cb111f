// Per-row loss terms and their derivatives w.r.t. the score s = w . x / T, in every form the
// kernels need: per row (CUDA, the CPU's positives), the running-product factor of the CPU's
// negatives, and on tensors for the ATen path (shared_negatives.cpp). Each form computes the
// same operations in the same order wherever it runs, so the devices agree bit for bit where
// their inputs do. (reference.py is the independent oracle and does not use these.)
#pragma once
#include <ATen/ATen.h>

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
NPID_HOST_DEVICE acc_t nce_negative_dloss_ds(acc_t p, acc_t c) {
  return p / (p + c + static_cast<acc_t>(kNceEps));
}

template <typename acc_t>
NPID_HOST_DEVICE void nce_term_of_exp(acc_t e, bool positive, acc_t inv_z, acc_t c, acc_t& loss,
                                      acc_t& dloss_ds) {
  const acc_t eps = static_cast<acc_t>(kNceEps);
  const acc_t p = e * inv_z;
  if (positive) {
    loss = math::log1p((c + eps) / p);
    dloss_ds = -(c + eps) / (p + c + eps);
  } else {
    loss = math::log1p((p + eps) / c);
    dloss_ds = nce_negative_dloss_ds(p, c);
  }
}

// A negative's term as a factor of a running product: log1p((P + eps) / c) = log(factor), so
// a sample's negatives cost one log of their product instead of one log1p each (the CPU
// epilogue; accurate to ~K * 1e-16 in double). inv_c = 1 / c = n / K.
NPID_HOST_DEVICE double nce_negative_factor(double p, double inv_c) {
  return 1.0 + (p + kNceEps) * inv_c;
}

// The terms on tensors of P = exp(s) / Z (the ATen path), c = K / n a double; the trailing _
// ones work in place on their argument.
struct NceTensorTerms {
  double c;
  at::Tensor negative_loss(const at::Tensor& p) const { return (p + kNceEps).div_(c).log1p_(); }
  at::Tensor& negative_dloss_ds_(at::Tensor& p) const { return p.div_(p + (c + kNceEps)); }
  at::Tensor positive_loss(const at::Tensor& p) const {
    return (p.reciprocal() * (c + kNceEps)).log1p_();
  }
  at::Tensor positive_dloss_ds(const at::Tensor& p) const {
    return (p + (c + kNceEps)).reciprocal_().mul_(-(c + kNceEps));
  }
};

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
