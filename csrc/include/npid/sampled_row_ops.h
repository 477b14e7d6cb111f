// The sampled-row ops' fronts (schemas.h ops 1, 2, 3, 7, 8), one per op for every device: checks,
// contiguous inputs, outputs, registration. The device's Engine (cpu::CpuEngine, nce_cpu.cpp;
// cuda::CudaEngine, nce_ops.h) gives its Guard, kBf16Features (may x be bfloat16),
// host_checks() (may z and rows be read on the host: always on the CPU, on CUDA only with
// NPID_CUDA_SYNC_CHECKS), shared_chunk_rows(B) and one kernel entry per op. Rows outside the bank
// are the engine's to report: the CPU raises from its pass, CUDA gives NaN (or raises first).
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "npid/checks.h"
#include "npid/shared_negatives.h"

namespace npid {

// Checked, contiguous inputs of the ops that gather rows: idx (explicit rows) or rng (in-kernel
// sampling) is defined; y is undefined for nce_scores, which reads its rows from idx alone.
struct FusedInputs {
  at::Tensor x, bank, y, idx, rng;
  int64_t columns = 0;  // K + 1
  bool exclude_positive = false;
  // The argument the gathered rows come from, as the row-range message names it.
  const char* rows_name() const { return idx.defined() ? "idx" : "y"; }
};

struct NceLossOutputs {
  at::Tensor loss, grad_x;
  // Per sample, sum_{k >= 1} exp(s_k) over the K noise columns, in float64: the Monte Carlo
  // estimate of Z / n that the "ema" Z mode averages (noise rows only: the positive is not a
  // draw from Pn and would bias the estimate up by up to exp(1/T) / K).
  at::Tensor noise_exp_sum;
  at::Tensor positive_sq_dist;  // in the accumulation dtype (schemas.h)
};

template <typename Engine>
struct SampledRowOps {
  using Guard = typename Engine::Guard;

  static FusedInputs prepare_fused(const at::Tensor& x, const at::Tensor& bank,
                                   const at::Tensor& y, const c10::optional<at::Tensor>& idx,
                                   const c10::optional<at::Tensor>& rng_state,
                                   int64_t num_negatives, double temperature,
                                   bool exclude_positive) {
    check_features(x, "x", Engine::kBf16Features);
    check_bank(bank, x);
    check_index_vector(y, x, "y");
    check_temperature(temperature);
    FusedInputs f;
    f.columns = check_rows_source(x, bank, idx, rng_state, num_negatives, exclude_positive);
    f.exclude_positive = exclude_positive;
    f.x = x.contiguous();
    f.bank = bank.contiguous();
    f.y = y.contiguous();
    if (idx.has_value()) {
      f.idx = idx->contiguous();
    } else {
      f.rng = rng_state->contiguous();
    }
    return f;
  }

  // The inputs of nce_scores and its backward: rows from idx only.
  static FusedInputs prepare_scores(const at::Tensor& x, const at::Tensor& bank,
                                    const at::Tensor& idx, double temperature) {
    check_features(x, "x", Engine::kBf16Features);
    check_bank(bank, x);
    check_idx_matrix(idx, x);
    check_temperature(temperature);
    FusedInputs f;
    f.x = x.contiguous();
    f.bank = bank.contiguous();
    f.idx = idx.contiguous();
    f.columns = idx.size(1);
    return f;
  }

  static at::Tensor sample_negatives(const at::Tensor& y, const at::Tensor& rng_state,
                                     int64_t n_data, int64_t num_negatives,
                                     bool exclude_positive) {
    TORCH_CHECK(y.dim() == 1 && y.scalar_type() == at::kLong,
                "y must be a 1-D int64 tensor, got ", y.scalar_type(), " of shape ", y.sizes());
    check_rng_state(rng_state, y);
    TORCH_CHECK(n_data >= 1 && n_data < (int64_t(1) << 31), "n_data must be in [1, 2^31), got ",
                n_data);
    TORCH_CHECK(num_negatives >= 1, "num_negatives must be >= 1, got ", num_negatives);
    TORCH_CHECK(!exclude_positive || n_data >= 2, "exclude_positive needs n_data >= 2, got ",
                n_data);
    const Guard guard(y.device());
    at::Tensor out = at::empty({y.size(0), num_negatives + 1}, y.options());
    Engine::sample_negatives(y.contiguous(), rng_state.contiguous(), n_data, num_negatives,
                             exclude_positive, out);
    return out;
  }

  static at::Tensor nce_scores(const at::Tensor& x, const at::Tensor& bank, const at::Tensor& idx,
                               double temperature) {
    const FusedInputs f = prepare_scores(x, bank, idx, temperature);
    const Guard guard(x.device());
    at::Tensor out = at::empty({f.x.size(0), f.columns}, f.x.options());
    Engine::nce_scores(f, temperature, out);
    return out;
  }

  static at::Tensor nce_scores_backward(const at::Tensor& grad_out, const at::Tensor& out,
                                        const at::Tensor& x, const at::Tensor& bank,
                                        const at::Tensor& idx, double temperature) {
    const FusedInputs f = prepare_scores(x, bank, idx, temperature);
    TORCH_CHECK(grad_out.sizes() == idx.sizes() && out.sizes() == idx.sizes(),
                "grad_out and out must have idx's shape ", idx.sizes(), ", got ",
                grad_out.sizes(), " and ", out.sizes());
    TORCH_CHECK(grad_out.device() == x.device() && out.device() == x.device(),
                "grad_out and out must be on ", x.device(), ", got ", grad_out.device(), " and ",
                out.device());
    const Guard guard(x.device());
    const at::Tensor go = grad_out.to(f.x.scalar_type()).contiguous();
    const at::Tensor oc = out.to(f.x.scalar_type()).contiguous();
    at::Tensor grad_x = at::empty_like(f.x);
    Engine::nce_scores_backward(f, go, oc, temperature, grad_x);
    return grad_x;
  }

  static void nce_init_z_(at::Tensor& z, const at::Tensor& scores, int64_t n_data) {
    check_z(z, scores);
    TORCH_CHECK(scores.is_floating_point() && scores.numel() > 0,
                "scores must be a non-empty floating tensor");
    TORCH_CHECK(n_data >= 1, "n_data must be >= 1, got ", n_data);
    const Guard guard(z.device());
    Engine::nce_init_z_(z, scores.contiguous(), n_data);
  }

  static void nce_estimate_z_(at::Tensor& z, const at::Tensor& x, const at::Tensor& bank,
                              const at::Tensor& y, const c10::optional<at::Tensor>& idx,
                              const c10::optional<at::Tensor>& rng_state, int64_t num_negatives,
                              double temperature, int64_t n_data, bool exclude_positive) {
    check_z(z, x);
    const FusedInputs f = prepare_fused(x, bank, y, idx, rng_state, num_negatives, temperature,
                                        exclude_positive);
    const int64_t n_noise = noise_rows(n_data, bank, idx);
    TORCH_CHECK(x.size(0) > 0, "x must hold at least one sample to estimate Z");
    const Guard guard(x.device());
    Engine::nce_estimate_z_(z, f, temperature, n_noise);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nce_loss(
      const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
      const c10::optional<at::Tensor>& idx, const c10::optional<at::Tensor>& rng_state,
      const at::Tensor& z, int64_t num_negatives, double temperature, int64_t n_data,
      bool exclude_positive, double proximal) {
    check_z(z, x);
    check_proximal(proximal);
    const FusedInputs f = prepare_fused(x, bank, y, idx, rng_state, num_negatives, temperature,
                                        exclude_positive);
    const int64_t n_noise = noise_rows(n_data, bank, idx);
    const Guard guard(x.device());
    if (Engine::host_checks()) {
      const double zv = z.item<double>();
      TORCH_CHECK(zv > 0 && std::isfinite(zv),
                  "z must be set (positive) before nce_loss; estimate it with nce_estimate_z_, "
                  "got ", zv);
    }
    const int64_t B = f.x.size(0);
    NceLossOutputs out;
    out.loss = at::empty({B}, f.x.options());
    out.grad_x = at::empty_like(f.x);
    out.noise_exp_sum = at::empty({B}, f.x.options().dtype(at::kDouble));
    out.positive_sq_dist = at::empty({B}, f.x.options().dtype(accumulation_type(f.x)));
    Engine::nce_loss(f, z, temperature, n_noise, proximal, out);
    return {out.loss, out.grad_x, out.noise_exp_sum, out.positive_sq_dist};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_ce_loss(
      const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
      const c10::optional<at::Tensor>& idx, const c10::optional<at::Tensor>& rng_state,
      int64_t num_negatives, double temperature, bool exclude_positive, double proximal) {
    check_proximal(proximal);
    const FusedInputs f = prepare_fused(x, bank, y, idx, rng_state, num_negatives, temperature,
                                        exclude_positive);
    const Guard guard(x.device());
    const int64_t B = f.x.size(0);
    at::Tensor loss = at::empty({B}, f.x.options());
    at::Tensor grad_x = at::empty_like(f.x);
    at::Tensor positive_sq_dist = at::empty({B}, f.x.options().dtype(accumulation_type(f.x)));
    Engine::softmax_ce_loss(f, temperature, proximal, loss, grad_x, positive_sq_dist);
    return {loss, grad_x, positive_sq_dist};
  }

  // The shared-negative losses: shared_negatives_loss checks their arguments; the engine
  // gives its sampler, its GEMM tile and whether rows may be checked on the host.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_nce_loss(
      const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
      const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& rng_state,
      const at::Tensor& z, int64_t num_negatives, double temperature, bool exclude_positive,
      int64_t n_data, c10::string_view precision, int64_t chunk_rows, double proximal) {
    const Guard guard(x.device());
    return shared_negatives_loss(
        x, bank, y, rows, rng_state, z, num_negatives,
        SharedNegativesArgs{SharedLoss::kNce, temperature, exclude_positive, n_data, precision,
                            chunk_rows, Engine::host_checks(), proximal},
        &sample_negatives, Engine::shared_chunk_rows(x.size(0)));
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_softmax_ce_loss(
      const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
      const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& rng_state,
      int64_t num_negatives, double temperature, bool exclude_positive,
      c10::string_view precision, int64_t chunk_rows, double proximal) {
    const Guard guard(x.device());
    auto out = shared_negatives_loss(
        x, bank, y, rows, rng_state, c10::nullopt, num_negatives,
        SharedNegativesArgs{SharedLoss::kSoftmaxCe, temperature, exclude_positive, -1, precision,
                            chunk_rows, Engine::host_checks(), proximal},
        &sample_negatives, Engine::shared_chunk_rows(x.size(0)));
    return {std::get<0>(out), std::get<1>(out), std::get<3>(out)};
  }

  static void register_ops(torch::Library& m) {
    m.impl("sample_negatives", &sample_negatives);
    m.impl("nce_scores", &nce_scores);
    m.impl("nce_scores_backward", &nce_scores_backward);
    m.impl("nce_init_z_", &nce_init_z_);
    m.impl("nce_estimate_z_", &nce_estimate_z_);
    m.impl("nce_loss", &nce_loss);
    m.impl("softmax_ce_loss", &softmax_ce_loss);
    m.impl("shared_nce_loss", &shared_nce_loss);
    m.impl("shared_softmax_ce_loss", &shared_softmax_ce_loss);
  }
};

}  // namespace npid
