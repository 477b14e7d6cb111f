// Launch planning and the CUDA engine of the sampled-row ops (host code), shared by the CUDA
// build (nce_cuda.cu) and the emulated build (csrc/emu/): register_nce_ops() binds their fronts
// (include/npid/sampled_row_ops.h) to a library's dispatch key. See nce_kernels.cuh for the
// kernel design.
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
#include "npid/sampled_row_ops.h"

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

template <typename scalar_t, typename bank_t>
ScanArgs<scalar_t, bank_t> make_args(const FusedInputs& f, double temperature) {
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

// The kernels behind the fronts of include/npid/sampled_row_ops.h.
struct CudaEngine {
  using Guard = gpu::DeviceGuard;
  static constexpr bool kBf16Features = true;
  // No host sync unless NPID_CUDA_SYNC_CHECKS asks for the CPU's checks and messages.
  static bool host_checks() { return sync_checks_enabled(); }
  // Shared negatives: about 2^24 fp32 scores (64 MiB) per GEMM tile, at least 8192 rows.
  static int64_t shared_chunk_rows(int64_t B) {
    return std::max<int64_t>(8192, (int64_t(1) << 24) / std::max<int64_t>(B, 1));
  }

  static void check_fused_rows(const FusedInputs& f) {
    check_rows_in_bank(f.idx.defined() ? f.idx : f.y, f.bank.size(0), f.rows_name());
  }

  static void sample_negatives(const at::Tensor& y, const at::Tensor& rng_state, int64_t n_data,
                               int64_t num_negatives, bool exclude_positive, at::Tensor& out) {
    if (host_checks()) check_rows_in_bank(y, n_data, "y");
    const int64_t total = out.numel();
    if (total == 0) return;
    const int64_t blocks =
        std::min<int64_t>((total + kSampleThreads - 1) / kSampleThreads, 32LL * num_sms());
    gpu::launch(sample_negatives_kernel,
                {"sample_negatives_kernel", kSampleThreads, static_cast<unsigned>(blocks),
                 kSampleThreads},
                y.const_data_ptr<int64_t>(), rng_state.const_data_ptr<int64_t>(), y.size(0),
                num_negatives, n_data, exclude_positive, out.data_ptr<int64_t>());
  }

  // run_scan<M> over f, with set(a) pointing the ScanArgs at the op's outputs.
  template <Mode M, typename Set>
  static void scan(const FusedInputs& f, double temperature, const char* name, Set set) {
    dispatch_features_bank(f.x.scalar_type(), f.bank.scalar_type(), name, [&](auto xt, auto bt) {
      auto a = make_args<decltype(xt), decltype(bt)>(f, temperature);
      set(a);
      run_scan<M>(a, f.x.options());
    });
  }

  template <typename T>
  static void point(T*& field, const at::Tensor& t) {
    field = static_cast<T*>(t.data_ptr());
  }

  static void nce_scores(const FusedInputs& f, double temperature, at::Tensor& out) {
    if (host_checks()) check_fused_rows(f);
    scan<Mode::kScores>(f, temperature, "nce_scores", [&](auto& a) { point(a.scores, out); });
  }

  static void nce_scores_backward(const FusedInputs& f, const at::Tensor& grad_out,
                                  const at::Tensor& out, double temperature, at::Tensor& grad_x) {
    if (host_checks()) check_fused_rows(f);
    scan<Mode::kScoresBwd>(f, temperature, "nce_scores_backward", [&](auto& a) {
      point(a.go, grad_out);
      point(a.so, out);
      point(a.grad, grad_x);
    });
  }

  static void nce_init_z_(at::Tensor& z, const at::Tensor& scores, int64_t n_data) {
    const bool z_double = z.scalar_type() == at::kDouble;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "nce_init_z_",
                                    [&] {
      gpu::launch(set_z_kernel<scalar_t>, {"set_z_kernel", kReduceThreads, 1, kReduceThreads},
                  scores.const_data_ptr<scalar_t>(), scores.numel(), z.data_ptr(), z_double,
                  static_cast<double>(scores.numel()), static_cast<double>(n_data),
                  /*only_finite=*/false);
    });
  }

  static void nce_estimate_z_(at::Tensor& z, const FusedInputs& f, double temperature,
                              int64_t n_noise) {
    const bool sync_checks = host_checks();
    if (sync_checks) {
      if (z.item<double>() > 0) return;
      check_fused_rows(f);
    }
    scan<Mode::kEstZ>(f, temperature, "nce_estimate_z_", [&](auto& a) {
      a.n_noise = n_noise;
      a.z = z.data_ptr();
      a.z_double = z.scalar_type() == at::kDouble;
    });
    if (sync_checks) {
      const double zv = z.item<double>();
      TORCH_CHECK(zv > 0 && std::isfinite(zv),
                  "x (or bank) holds NaN or inf features: the first batch's mean score is not "
                  "finite (or zero); z left unset");
    }
  }

  static void nce_loss(const FusedInputs& f, const at::Tensor& z, double temperature,
                       int64_t n_noise, double proximal, NceLossOutputs& out) {
    if (host_checks()) check_fused_rows(f);
    scan<Mode::kNce>(f, temperature, "nce_loss", [&](auto& a) {
      a.z = z.data_ptr();
      a.z_double = z.scalar_type() == at::kDouble;
      a.n_noise = n_noise;
      a.c = static_cast<double>(f.columns - 1) / static_cast<double>(n_noise);
      point(a.loss, out.loss);
      point(a.grad, out.grad_x);
      point(a.noise_exp, out.noise_exp_sum);
      point(a.sq_dist, out.positive_sq_dist);
      a.proximal = proximal;
    });
  }

  static void softmax_ce_loss(const FusedInputs& f, double temperature, double proximal,
                              at::Tensor& loss, at::Tensor& grad_x, at::Tensor& positive_sq_dist) {
    if (host_checks()) check_fused_rows(f);
    scan<Mode::kSoftmax>(f, temperature, "softmax_ce_loss", [&](auto& a) {
      point(a.loss, loss);
      point(a.grad, grad_x);
      point(a.sq_dist, positive_sq_dist);
      a.proximal = proximal;
    });
  }
};

inline void register_nce_ops(torch::Library& m) { SampledRowOps<CudaEngine>::register_ops(m); }

}  // namespace cuda
}  // namespace npid
