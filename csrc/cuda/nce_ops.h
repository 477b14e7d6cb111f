// Launch planning and the operator entry points of the sampled-row ops (host code), shared by
// the CUDA build (nce_cuda.cu) and the emulated build (csrc/emu/): register_nce_ops() binds
// them to a library's dispatch key. See nce_kernels.cuh for the kernel design.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "host_common.h"
#include "nce_kernels.cuh"
#include "npid/checks.h"
#include "npid/dispatch.h"
#include "npid/shared_negatives.h"

namespace npid {
namespace cuda {

constexpr int kSampleThreads = 256;

template <Mode M, typename scalar_t, typename bank_t>
void run_scan(ScanArgs<scalar_t, bank_t> a, const at::TensorOptions& opts) {
  using acc_t = acc_type_t<scalar_t>;
  using Tr = ModeTraits<M>;
  const int64_t B = a.B, d = a.d, cols = a.cols;
  if (B == 0) return;

  // Column splits: enough blocks in flight when the batch is smaller than the GPU.
  const int sms = num_sms();
  int64_t S = 1;
  if (B < sms) {
    const int64_t want = (2 * static_cast<int64_t>(sms) + B - 1) / B;
    const int64_t most = (cols + kMinColsPerSplit - 1) / kMinColsPerSplit;
    S = std::max<int64_t>(1, std::min(want, most));
  }
  int64_t cps = (cols + S - 1) / S;
  cps = (cps + 31) / 32 * 32;
  S = (cols + cps - 1) / cps;
  TORCH_CHECK(B * S <= std::numeric_limits<int>::max(), "batch too large for one launch: ", B);
  a.S = static_cast<int>(S);
  a.cols_per_split = cps;

  // Row layout.
  constexpr int kVec = full_vec<bank_t>();
  const bool vec_ok = aligned16(a.bank) && (d * static_cast<int64_t>(sizeof(bank_t))) % 16 == 0;
  const int vec = vec_ok ? kVec : 1;
  const int64_t nvec = d / vec;
  // Vectors per lane: 4 (fewest lanes per row: fewer shuffles and loss evaluations per
  // row), 2 for 16-bit rows of up to 64 vectors (register budget), 0: general kernel.
  int nv = nvec <= 128 ? 4 : 0;
  if (kVec == 8 && vec == 8 && nvec <= 64) nv = 2;
  // Element loads (an unaligned bank view, or d * sizeof(bank_t) not a multiple of 16, e.g.
  // d = 130) of up to 256 elements: 8 per lane, one row per group, still in registers. Without
  // this such rows took the general kernel, whose accumulators live in global memory.
  if (vec == 1 && nvec > 128 && nvec <= 256) nv = 8;
  const size_t smem = Tr::kAcc ? static_cast<size_t>(kWarps) * d * sizeof(acc_t) : 0;
  const bool fast = nv > 0 && smem <= kMaxFastSmem;
  // Lanes per row: covers the row with nv vectors per lane, at least R = 8 / nv (so that the
  // R rows of every group of a warp come from one 32-column batch), at most 32.
  const int G = nv > 0 ? std::min(32, std::max(8 / nv, next_pow2((nvec + nv - 1) / nv))) : 32;

  // Workspace.
  a.P = static_cast<int>(fast ? S : S * kWarps);
  const bool need_ws = !fast || S > 1 || M == Mode::kEstZ;
  at::Tensor ws;
  if (need_ws && M != Mode::kScores) {
    const int64_t np = B * a.P;
    Carver cv;
    const size_t o_lsum = Tr::kLsum ? cv.reserve<double>(np) : 0;
    const size_t o_esum = M == Mode::kNce ? cv.reserve<double>(np) : 0;
    const size_t o_m = M == Mode::kSoftmax ? cv.reserve<acc_t>(np) : 0;
    const size_t o_l = M == Mode::kSoftmax ? cv.reserve<acc_t>(np) : 0;
    const size_t o_s0 = M == Mode::kSoftmax ? cv.reserve<acc_t>(B) : 0;
    const size_t o_acc = Tr::kAcc ? cv.reserve<acc_t>(np * d) : 0;
    ws = at::empty({static_cast<int64_t>(std::max<size_t>(cv.used, 16))}, opts.dtype(at::kByte));
    char* base = static_cast<char*>(ws.data_ptr());
    if (Tr::kLsum) a.ws_lsum = reinterpret_cast<double*>(base + o_lsum);
    if (M == Mode::kNce) a.ws_esum = reinterpret_cast<double*>(base + o_esum);
    if (M == Mode::kSoftmax) {
      a.ws_m = reinterpret_cast<acc_t*>(base + o_m);
      a.ws_l = reinterpret_cast<acc_t*>(base + o_l);
      a.ws_s0 = reinterpret_cast<acc_t*>(base + o_s0);
    }
    if (Tr::kAcc) a.ws_acc = reinterpret_cast<acc_t*>(base + o_acc);
  }

  const unsigned grid = static_cast<unsigned>(B * S);
  if (fast) {
    auto launch = [&](auto vec_c, auto nv_c) {
      constexpr int V = decltype(vec_c)::value;
      constexpr int NV = decltype(nv_c)::value;
      gpu::launch(scan_fast_kernel<M, scalar_t, bank_t, V, NV>,
                  {"scan_fast_kernel", kThreads, grid, kThreads, smem}, a, G);
    };
    if (vec == 1 && nv == 8) {
      launch(IntC<1>{}, IntC<8>{});
    } else if (vec == 1) {
      launch(IntC<1>{}, IntC<4>{});
    } else if (nv == 4) {
      launch(IntC<kVec>{}, IntC<4>{});
    } else if constexpr (kVec == 8) {
      launch(IntC<kVec>{}, IntC<2>{});
    }
  } else {
    gpu::launch(scan_general_kernel<M, scalar_t, bank_t>,
                {"scan_general_kernel", kThreads, grid, kThreads}, a);
  }

  if constexpr (M == Mode::kEstZ) {
    gpu::launch(set_z_kernel<double>, {"set_z_kernel", kReduceThreads, 1, kReduceThreads},
                static_cast<const double*>(a.ws_lsum), B * a.P, const_cast<void*>(a.z), a.z_double,
                static_cast<double>(B * cols), static_cast<double>(a.n_noise), /*only_finite=*/true);
  } else if constexpr (M != Mode::kScores) {
    if (need_ws) {
      gpu::launch(finalize_kernel<M, scalar_t, bank_t>,
                  {"finalize_kernel", kFinalizeThreads, static_cast<unsigned>(B), kFinalizeThreads}, a);
    }
  }
}

// Validated, contiguous inputs of the fused ops.
struct Fused {
  at::Tensor x, bank, y, idx, rng;
  int64_t columns = 0;
  bool exclude_positive = false;
};

inline Fused prepare_fused(const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
                    const c10::optional<at::Tensor>& idx,
                    const c10::optional<at::Tensor>& rng_state, int64_t num_negatives,
                    double temperature, bool exclude_positive) {
  check_features(x, "x", /*allow_bf16=*/true);
  check_bank(bank, x);
  check_index_vector(y, x, "y");
  check_temperature(temperature);
  Fused f;
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

template <typename scalar_t, typename bank_t>
ScanArgs<scalar_t, bank_t> make_args(const Fused& f, double temperature) {
  ScanArgs<scalar_t, bank_t> a;
  a.x = f.x.data_ptr<scalar_t>();
  a.bank = f.bank.data_ptr<bank_t>();
  a.idx = f.idx.defined() ? f.idx.data_ptr<int64_t>() : nullptr;
  a.y = f.y.defined() ? f.y.data_ptr<int64_t>() : nullptr;
  a.rng = f.rng.defined() ? f.rng.data_ptr<int64_t>() : nullptr;
  a.B = f.x.size(0);
  a.d = f.x.size(1);
  a.n = f.bank.size(0);
  a.n_noise = a.n;
  a.cols = f.columns;
  a.exclude_positive = f.exclude_positive;
  a.inv_t = 1.0 / temperature;
  return a;
}

inline void sync_check_fused_rows(const Fused& f) {
  if (f.idx.defined()) {
    check_rows_in_bank(f.idx, f.bank.size(0), "idx");
  } else {
    check_rows_in_bank(f.y, f.bank.size(0), "y");
  }
}

inline at::Tensor sample_negatives(const at::Tensor& y, const at::Tensor& rng_state, int64_t n_data,
                            int64_t num_negatives, bool exclude_positive) {
  TORCH_CHECK(y.dim() == 1 && y.scalar_type() == at::kLong, "y must be a 1-D int64 tensor, got ",
              y.scalar_type(), " of shape ", y.sizes());
  check_rng_state(rng_state, y);
  TORCH_CHECK(n_data >= 1 && n_data < (int64_t(1) << 31), "n_data must be in [1, 2^31), got ",
              n_data);
  TORCH_CHECK(num_negatives >= 1, "num_negatives must be >= 1, got ", num_negatives);
  TORCH_CHECK(!exclude_positive || n_data >= 2, "exclude_positive needs n_data >= 2, got ", n_data);
  const gpu::DeviceGuard guard(y.device());
  if (sync_checks_enabled()) check_rows_in_bank(y, n_data, "y");
  const at::Tensor yc = y.contiguous(), rc = rng_state.contiguous();
  const int64_t B = y.size(0), columns = num_negatives + 1;
  at::Tensor out = at::empty({B, columns}, y.options());
  const int64_t total = B * columns;
  if (total == 0) return out;
  const int64_t blocks = std::min<int64_t>((total + kSampleThreads - 1) / kSampleThreads, 32LL * num_sms());
  gpu::launch(sample_negatives_kernel,
              {"sample_negatives_kernel", kSampleThreads, static_cast<unsigned>(blocks), kSampleThreads},
              yc.const_data_ptr<int64_t>(), rc.const_data_ptr<int64_t>(), B, num_negatives, n_data,
              exclude_positive, out.data_ptr<int64_t>());
  return out;
}

inline at::Tensor nce_scores(const at::Tensor& x_in, const at::Tensor& bank_in, const at::Tensor& idx,
                      double temperature) {
  check_features(x_in, "x", /*allow_bf16=*/true);
  check_bank(bank_in, x_in);
  check_idx_matrix(idx, x_in);
  check_temperature(temperature);
  const gpu::DeviceGuard guard(x_in.device());
  Fused f;
  f.x = x_in.contiguous();
  f.bank = bank_in.contiguous();
  f.idx = idx.contiguous();
  f.columns = idx.size(1);
  if (sync_checks_enabled()) check_rows_in_bank(f.idx, f.bank.size(0), "idx");
  at::Tensor out = at::empty({f.x.size(0), f.columns}, f.x.options());
  dispatch_features_bank(f.x.scalar_type(), f.bank.scalar_type(), "nce_scores",
                         [&](auto xt, auto bt) {
    using scalar_t = decltype(xt);
    using bank_t = decltype(bt);
    auto a = make_args<scalar_t, bank_t>(f, temperature);
    a.scores = out.data_ptr<scalar_t>();
    run_scan<Mode::kScores>(a, f.x.options());
  });
  return out;
}

inline at::Tensor nce_scores_backward(const at::Tensor& grad_out, const at::Tensor& out,
                               const at::Tensor& x_in, const at::Tensor& bank_in,
                               const at::Tensor& idx, double temperature) {
  check_features(x_in, "x", /*allow_bf16=*/true);
  check_bank(bank_in, x_in);
  check_idx_matrix(idx, x_in);
  check_temperature(temperature);
  TORCH_CHECK(grad_out.sizes() == idx.sizes() && out.sizes() == idx.sizes(),
              "grad_out and out must have idx's shape ", idx.sizes(), ", got ", grad_out.sizes(),
              " and ", out.sizes());
  TORCH_CHECK(grad_out.device() == x_in.device() && out.device() == x_in.device(),
              "grad_out and out must be on ", x_in.device(), ", got ", grad_out.device(), " and ",
              out.device());
  const gpu::DeviceGuard guard(x_in.device());
  Fused f;
  f.x = x_in.contiguous();
  f.bank = bank_in.contiguous();
  f.idx = idx.contiguous();
  f.columns = idx.size(1);
  if (sync_checks_enabled()) check_rows_in_bank(f.idx, f.bank.size(0), "idx");
  const at::Tensor go = grad_out.to(f.x.scalar_type()).contiguous();
  const at::Tensor oc = out.to(f.x.scalar_type()).contiguous();
  at::Tensor grad_x = at::empty_like(f.x);
  dispatch_features_bank(f.x.scalar_type(), f.bank.scalar_type(), "nce_scores_backward",
                         [&](auto xt, auto bt) {
    using scalar_t = decltype(xt);
    using bank_t = decltype(bt);
    auto a = make_args<scalar_t, bank_t>(f, temperature);
    a.go = go.data_ptr<scalar_t>();
    a.so = oc.data_ptr<scalar_t>();
    a.grad = grad_x.data_ptr<scalar_t>();
    run_scan<Mode::kScoresBwd>(a, f.x.options());
  });
  return grad_x;
}

inline void nce_init_z_(at::Tensor& z, const at::Tensor& scores, int64_t n_data) {
  check_z(z, scores);
  TORCH_CHECK(scores.is_floating_point() && scores.numel() > 0,
              "scores must be a non-empty floating tensor");
  TORCH_CHECK(n_data >= 1, "n_data must be >= 1, got ", n_data);
  const gpu::DeviceGuard guard(z.device());
  const at::Tensor sc = scores.contiguous();
  const bool z_double = z.scalar_type() == at::kDouble;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "nce_init_z_", [&] {
    gpu::launch(set_z_kernel<scalar_t>, {"set_z_kernel", kReduceThreads, 1, kReduceThreads},
                sc.const_data_ptr<scalar_t>(), sc.numel(), z.data_ptr(), z_double,
                static_cast<double>(sc.numel()), static_cast<double>(n_data), /*only_finite=*/false);
  });
}

inline void nce_estimate_z_(at::Tensor& z, const at::Tensor& x, const at::Tensor& bank,
                     const at::Tensor& y, const c10::optional<at::Tensor>& idx,
                     const c10::optional<at::Tensor>& rng_state, int64_t num_negatives,
                     double temperature, int64_t n_data, bool exclude_positive) {
  check_z(z, x);
  Fused f = prepare_fused(x, bank, y, idx, rng_state, num_negatives, temperature, exclude_positive);
  const int64_t n_noise = noise_rows(n_data, bank, idx);
  TORCH_CHECK(x.size(0) > 0, "x must hold at least one sample to estimate Z");
  const gpu::DeviceGuard guard(x.device());
  const bool sync_checks = sync_checks_enabled();
  if (sync_checks) {
    if (z.item<double>() > 0) return;
    sync_check_fused_rows(f);
  }
  dispatch_features_bank(f.x.scalar_type(), f.bank.scalar_type(), "nce_estimate_z_",
                         [&](auto xt, auto bt) {
    using scalar_t = decltype(xt);
    using bank_t = decltype(bt);
    auto a = make_args<scalar_t, bank_t>(f, temperature);
    a.n_noise = n_noise;
    a.z = z.data_ptr();
    a.z_double = z.scalar_type() == at::kDouble;
    run_scan<Mode::kEstZ>(a, f.x.options());
  });
  if (sync_checks) {
    const double zv = z.item<double>();
    TORCH_CHECK(zv > 0 && std::isfinite(zv),
                "x (or bank) holds NaN or inf features: the first batch's mean score is not "
                "finite (or zero); z left unset");
  }
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nce_loss(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
    const c10::optional<at::Tensor>& idx, const c10::optional<at::Tensor>& rng_state,
    const at::Tensor& z, int64_t num_negatives, double temperature, int64_t n_data,
    bool exclude_positive, double proximal) {
  check_z(z, x);
  check_proximal(proximal);
  Fused f = prepare_fused(x, bank, y, idx, rng_state, num_negatives, temperature, exclude_positive);
  const int64_t n_noise = noise_rows(n_data, bank, idx);
  const gpu::DeviceGuard guard(x.device());
  if (sync_checks_enabled()) {
    const double zv = z.item<double>();
    TORCH_CHECK(zv > 0 && std::isfinite(zv),
                "z must be set (positive) before nce_loss; estimate it with nce_estimate_z_, got ",
                zv);
    sync_check_fused_rows(f);
  }
  at::Tensor loss = at::empty({f.x.size(0)}, f.x.options());
  at::Tensor grad_x = at::empty_like(f.x);
  // Per sample, sum over the K noise columns of exp(s_k) in float64 (the Z statistic of the
  // "ema" / "batch" Z modes; the positive is not a draw from Pn), from the same pass.
  at::Tensor noise_exp_sum = at::empty({f.x.size(0)}, f.x.options().dtype(at::kDouble));
  at::Tensor positive_sq_dist = at::empty({f.x.size(0)}, f.x.options().dtype(accumulation_type(f.x)));
  dispatch_features_bank(f.x.scalar_type(), f.bank.scalar_type(), "nce_loss",
                         [&](auto xt, auto bt) {
    using scalar_t = decltype(xt);
    using bank_t = decltype(bt);
    auto a = make_args<scalar_t, bank_t>(f, temperature);
    a.z = z.data_ptr();
    a.z_double = z.scalar_type() == at::kDouble;
    a.n_noise = n_noise;
    a.c = static_cast<double>(f.columns - 1) / static_cast<double>(n_noise);
    a.loss = loss.data_ptr<scalar_t>();
    a.grad = grad_x.data_ptr<scalar_t>();
    a.noise_exp = noise_exp_sum.data_ptr<double>();
    a.sq_dist = positive_sq_dist.data_ptr<acc_type_t<scalar_t>>();
    a.proximal = proximal;
    run_scan<Mode::kNce>(a, f.x.options());
  });
  return {loss, grad_x, noise_exp_sum, positive_sq_dist};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_ce_loss(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
    const c10::optional<at::Tensor>& idx, const c10::optional<at::Tensor>& rng_state,
    int64_t num_negatives, double temperature, bool exclude_positive, double proximal) {
  check_proximal(proximal);
  Fused f = prepare_fused(x, bank, y, idx, rng_state, num_negatives, temperature, exclude_positive);
  const gpu::DeviceGuard guard(x.device());
  if (sync_checks_enabled()) sync_check_fused_rows(f);
  at::Tensor loss = at::empty({f.x.size(0)}, f.x.options());
  at::Tensor grad_x = at::empty_like(f.x);
  at::Tensor positive_sq_dist = at::empty({f.x.size(0)}, f.x.options().dtype(accumulation_type(f.x)));
  dispatch_features_bank(f.x.scalar_type(), f.bank.scalar_type(), "softmax_ce_loss",
                         [&](auto xt, auto bt) {
    using scalar_t = decltype(xt);
    using bank_t = decltype(bt);
    auto a = make_args<scalar_t, bank_t>(f, temperature);
    a.loss = loss.data_ptr<scalar_t>();
    a.grad = grad_x.data_ptr<scalar_t>();
    a.sq_dist = positive_sq_dist.data_ptr<acc_type_t<scalar_t>>();
    a.proximal = proximal;
    run_scan<Mode::kSoftmax>(a, f.x.options());
  });
  return {loss, grad_x, positive_sq_dist};
}

// Shared negatives: about 2^24 fp32 scores (64 MiB) per GEMM tile, at least 8192 rows.
inline int64_t shared_chunk_rows(int64_t B) {
  return std::max<int64_t>(8192, (int64_t(1) << 24) / std::max<int64_t>(B, 1));
}

inline SharedNegativesArgs shared_args(SharedLoss loss, double temperature, bool exclude_positive,
                                       int64_t n_data, c10::string_view precision,
                                       int64_t chunk_rows, double proximal) {
  // No host sync unless NPID_CUDA_SYNC_CHECKS asks for the CPU's checks and messages.
  return shared_negatives_args(loss, temperature, exclude_positive, n_data, precision, chunk_rows,
                               /*rows_checked=*/sync_checks_enabled(), proximal);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shared_nce_loss(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
    const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& rng_state,
    const at::Tensor& z, int64_t num_negatives, double temperature, bool exclude_positive,
    int64_t n_data, c10::string_view precision, int64_t chunk_rows, double proximal) {
  const gpu::DeviceGuard guard(x.device());
  return shared_negatives_loss(x, bank, y, rows, rng_state, z, num_negatives,
                               shared_args(SharedLoss::kNce, temperature, exclude_positive, n_data,
                                           precision, chunk_rows, proximal),
                               &sample_negatives, shared_chunk_rows(x.size(0)));
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> shared_softmax_ce_loss(
    const at::Tensor& x, const at::Tensor& bank, const at::Tensor& y,
    const c10::optional<at::Tensor>& rows, const c10::optional<at::Tensor>& rng_state,
    int64_t num_negatives, double temperature, bool exclude_positive, c10::string_view precision,
    int64_t chunk_rows, double proximal) {
  const gpu::DeviceGuard guard(x.device());
  auto out = shared_negatives_loss(x, bank, y, rows, rng_state, c10::nullopt, num_negatives,
                                   shared_args(SharedLoss::kSoftmaxCe, temperature,
                                               exclude_positive, -1, precision, chunk_rows,
                                               proximal),
                                   &sample_negatives, shared_chunk_rows(x.size(0)));
  return {std::get<0>(out), std::get<1>(out), std::get<3>(out)};
}

inline void register_nce_ops(torch::Library& m) {
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

}  // namespace cuda
}  // namespace npid
