// See include/npid/bank_scan.h.
#include "npid/bank_scan.h"

#include "npid/checks.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/version.h>
#ifdef WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>

namespace npid {

namespace {

#ifdef WITH_CUDA
// a (M x K) @ b (K x N), float32 CUDA tensors, on the tensor cores with TF32 inputs: cuBLAS's
// compute type CUBLAS_COMPUTE_32F_FAST_TF32 asks for TF32 in this call only. Torch's own TF32
// switches are global (and in recent versions raise when the legacy and the new API are mixed),
// so they are neither read nor changed.
at::Tensor tf32_mm_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  const at::Tensor a = a_in.contiguous();
  const int64_t M = a.size(0), K = a.size(1), N = b_in.size(1);
  TORCH_INTERNAL_ASSERT(b_in.size(0) == K && a.scalar_type() == at::kFloat &&
                        b_in.scalar_type() == at::kFloat);
  at::Tensor c = at::empty({M, N}, a.options());
  if (M == 0 || N == 0) return c;
  if (K == 0) return c.zero_();
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kIntMax && N <= kIntMax && K <= kIntMax, "tf32 scan: matrix too large for cuBLAS");
  // Row-major C = A B is column-major C^T = B^T A^T. Row-major A is column-major A^T (ld K).
  // b is row-major (read column-major it is b^T, ld N: no transpose) or, for a bank chunk,
  // the transpose of a row-major (N x K) block (read column-major it is b, ld K: transpose).
  at::Tensor b = b_in;
  cublasOperation_t op_b = CUBLAS_OP_N;
  int64_t ldb = N;
  if (b.stride(0) == 1 && b.stride(1) == K) {
    op_b = CUBLAS_OP_T;
    ldb = K;
  } else if (!(b.stride(1) == 1 && b.stride(0) == N)) {
    b = b.contiguous();
  }
  const float alpha = 1.0f, beta = 0.0f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), op_b, CUBLAS_OP_N, static_cast<int>(N),
      static_cast<int>(M), static_cast<int>(K), &alpha, b.const_data_ptr<float>(), CUDA_R_32F,
      static_cast<int>(ldb), a.const_data_ptr<float>(), CUDA_R_32F, static_cast<int>(K), &beta,
      c.data_ptr<float>(), CUDA_R_32F, static_cast<int>(N), CUBLAS_COMPUTE_32F_FAST_TF32,
      CUBLAS_GEMM_DEFAULT));
  return c;
}
#endif

// float32 bits rounded to nearest even keeping the top (23 - kDrop) mantissa bits: 13 for
// TF32, 16 for bfloat16. NaN stays NaN (its payload could otherwise carry into the sign bit);
// infinities stay infinite; values that round past the largest finite become infinite, as a
// conversion does. Branch-free so the loop below vectorises.
template <int kDrop>
inline uint32_t round_mantissa_bits(uint32_t bits) {
  constexpr uint32_t kHalf = (uint32_t(1) << (kDrop - 1)) - 1;
  constexpr uint32_t kMask = ~((uint32_t(1) << kDrop) - 1);
  const uint32_t rounded = (bits + kHalf + ((bits >> kDrop) & 1)) & kMask;
  return (bits & 0x7fffffffu) > 0x7f800000u ? bits : rounded;
}

template <int kDrop>
void round_mantissa_cpu(const float* in, float* out, int64_t count) {
  at::parallel_for(0, count, 1 << 15, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      uint32_t bits;
      std::memcpy(&bits, in + i, sizeof(bits));
      bits = round_mantissa_bits<kDrop>(bits);
      std::memcpy(out + i, &bits, sizeof(bits));
    }
  });
}

// The same with ATen ops, for tensors on other devices.
at::Tensor round_mantissa_aten(const at::Tensor& t, int drop_bits) {
  const at::Tensor nan = at::isnan(t);
  const at::Tensor bits = at::where(nan, at::zeros({}, t.options()), t).view(at::kInt);
  const at::Tensor lsb = bits.bitwise_right_shift(drop_bits).bitwise_and_(1);
  const at::Tensor rounded = (bits + lsb)
                                 .add_((int64_t(1) << (drop_bits - 1)) - 1)
                                 .bitwise_and_(~((int64_t(1) << drop_bits) - 1))
                                 .view(at::kFloat);
  return at::where(nan, t, rounded);
}

// A float32 copy of t rounded to TF32 (drop_bits 13) or bfloat16 (16).
at::Tensor round_float(const at::Tensor& t_in, int drop_bits) {
  const at::Tensor t = t_in.to(at::kFloat);
  if (!t.is_cpu()) return round_mantissa_aten(t, drop_bits);
  const at::Tensor src = t.contiguous();
  at::Tensor out = at::empty_like(src);
  if (drop_bits == 13) {
    round_mantissa_cpu<13>(src.const_data_ptr<float>(), out.data_ptr<float>(), src.numel());
  } else {
    round_mantissa_cpu<16>(src.const_data_ptr<float>(), out.data_ptr<float>(), src.numel());
  }
  return out;
}

}  // namespace

ScanPrecision parse_precision(std::string_view precision) {
  if (precision == "fp32") return ScanPrecision::kFP32;
  if (precision == "tf32") return ScanPrecision::kTF32;
  if (precision == "bf16") return ScanPrecision::kBF16;
  TORCH_CHECK(false, "precision must be 'fp32', 'tf32' or 'bf16', got '", std::string(precision),
              "'");
}

at::Tensor round_to_precision(const at::Tensor& t, ScanPrecision precision) {
  switch (precision) {
    case ScanPrecision::kFP32:
      return t;
    case ScanPrecision::kBF16:
      return round_float(t, /*drop_bits=*/16).to(t.scalar_type());
    case ScanPrecision::kTF32:
      return round_float(t, /*drop_bits=*/13).to(t.scalar_type());
  }
  return t;
}

at::Tensor scan_operand(const at::Tensor& t, at::ScalarType acc_type, ScanPrecision precision) {
  if (precision == ScanPrecision::kFP32) return t.to(acc_type);
  if (t.is_cuda() && acc_type == at::kFloat) {
    // cuBLAS sets the precision (scan_mm): the tensor cores round fp32 to TF32 themselves;
    // bf16 operands are converted once here. Elsewhere the operands are rounded.
    return t.to(precision == ScanPrecision::kBF16 ? at::kBFloat16 : at::kFloat);
  }
  return round_to_precision(t.to(acc_type), precision);
}

at::Tensor scan_mm(const at::Tensor& a, const at::Tensor& b, ScanPrecision precision) {
  // scan_operand() gives float (fp32, tf32) or bfloat16 operands on the cuBLAS path, and
  // double ones (already rounded) everywhere else on CUDA.
  if (a.is_cuda() && a.scalar_type() != at::kDouble) {
    switch (precision) {
      case ScanPrecision::kFP32: {
        const at::NoTF32Guard exact;  // fp32 means fp32, whatever allow_tf32 says
        return at::mm(a, b);
      }
      case ScanPrecision::kTF32:
#ifdef WITH_CUDA
        return tf32_mm_cuda(a, b);
#else
        break;  // no CUDA tensors reach a CPU-only build
#endif
      case ScanPrecision::kBF16:
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
        // bf16 tensor cores with float32 output: the logits keep fp32 precision.
        return at::mm(a, b, at::kFloat);
#else
        return at::mm(a, b).to(at::kFloat);
#endif
    }
  }
  return at::mm(a, b);  // operands already rounded (or exact): products in a's dtype
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> streamed_logsumexp(const at::Tensor& xa,
                                                                 const at::Tensor& bank,
                                                                 double inv_t, int64_t chunk,
                                                                 ScanPrecision precision,
                                                                 bool with_acc) {
  const int64_t B = xa.size(0), n = bank.size(0);
  at::Tensor m = at::full({B}, -std::numeric_limits<double>::infinity(), xa.options());
  at::Tensor l = at::zeros({B}, xa.options());
  at::Tensor acc = with_acc ? at::zeros_like(xa) : at::Tensor();
  // fp32: 1/T folded into x (one pass less over the logits). The rounded modes scale the
  // logits instead: x / T is not representable in TF32 / bf16.
  const bool fold_scale = precision == ScanPrecision::kFP32;
  const auto acc_type = xa.scalar_type();
  const at::Tensor x_op = scan_operand(fold_scale ? xa * inv_t : xa, acc_type, precision);
  for (int64_t start = 0; start < n; start += chunk) {
    // Each chunk converted (and rounded) once, for both GEMMs.
    const at::Tensor w = scan_operand(bank.narrow(0, start, std::min(chunk, n - start)), acc_type,
                                      precision);
    at::Tensor s = scan_mm(x_op, w.t(), precision);
    if (!fold_scale) s.mul_(inv_t);
    const at::Tensor m_new = at::maximum(m, std::get<0>(s.max(1)));
    const at::Tensor scale = (m - m_new).exp_();
    const at::Tensor p = s.sub_(m_new.unsqueeze(1)).exp_();  // in place: s is not needed again
    l = l.mul_(scale).add_(p.sum(1));
    if (with_acc) {
      acc = acc.mul_(scale.unsqueeze(1)).add_(scan_mm(scan_operand(p, acc_type, precision), w, precision));
    }
    m = m_new;
  }
  return {m, l, acc};
}

std::tuple<at::Tensor, at::Tensor> streamed_topk(const at::Tensor& query, const at::Tensor& bank,
                                                 int64_t k, int64_t query_chunk,
                                                 int64_t bank_chunk, ScanPrecision precision) {
  const int64_t n = bank.size(0), Q = query.size(0);
  at::Tensor out_sims = at::empty({Q, k}, query.options());
  at::Tensor out_idx = at::empty({Q, k}, query.options().dtype(at::kLong));
  for (int64_t q0 = 0; q0 < Q; q0 += query_chunk) {
    const int64_t qn = std::min(query_chunk, Q - q0);
    const at::Tensor q = scan_operand(query.narrow(0, q0, qn), query.scalar_type(), precision);
    // Running top-k, merged with each chunk's similarities by one topk over k + chunk columns.
    at::Tensor best_sims = at::empty({qn, 0}, query.options());
    at::Tensor best_idx = at::empty({qn, 0}, out_idx.options());
    for (int64_t start = 0; start < n; start += bank_chunk) {
      const int64_t rows = std::min(bank_chunk, n - start);
      const at::Tensor s = scan_mm(
          q, scan_operand(bank.narrow(0, start, rows), query.scalar_type(), precision).t(), precision);
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> full_softmax_streamed(
    const at::Tensor& x_in, const at::Tensor& bank, const at::Tensor& y_in, double temperature,
    std::string_view precision, bool compute_grad, int64_t chunk, bool y_checked,
    double proximal) {
  const ScanPrecision scan_precision = parse_precision(precision);
  check_proximal(proximal);
  const int64_t B = x_in.size(0), n = bank.size(0);
  const auto acc_type = accumulation_type(x_in);
  if (B == 0) {
    return {at::empty({0}, x_in.options()), at::empty_like(x_in, at::MemoryFormat::Contiguous),
            at::empty({0}, x_in.options().dtype(acc_type))};
  }
  const at::Tensor xa = x_in.to(acc_type).contiguous();
  const at::Tensor y = y_in.contiguous();
  const double inv_t = 1.0 / temperature;

  at::Tensor m, l, acc;
  std::tie(m, l, acc) = streamed_logsumexp(xa, bank, inv_t, chunk, scan_precision, compute_grad);
  // The positive's logit and row with the same rounding as the scan's products; the proximal
  // term (schemas.h) from the row as stored.
  const at::Tensor w_stored = bank.index_select(0, y_checked ? y : y.clamp(0, n - 1)).to(acc_type);
  const at::Tensor w_pos = round_to_precision(w_stored, scan_precision);
  const at::Tensor s_pos = (round_to_precision(xa, scan_precision) * w_pos).sum(1).mul_(inv_t);
  at::Tensor loss = m + l.log() - s_pos;
  at::Tensor grad_x = compute_grad ? (acc / l.unsqueeze(1) - w_pos).mul_(inv_t) : at::zeros_like(xa);
  const at::Tensor diff = xa - w_stored;
  at::Tensor sq_dist = (diff * diff).sum(1);
  if (proximal != 0) {
    loss = loss + sq_dist * proximal;
    if (compute_grad) grad_x = grad_x + diff * (2.0 * proximal);
  }
  if (!y_checked) {  // rows outside [0, n) give NaN instead of a host sync
    const at::Tensor valid = y.ge(0).logical_and_(y.lt(n));
    const double nan = std::numeric_limits<double>::quiet_NaN();
    loss = at::where(valid, loss, nan);
    grad_x = at::where(valid.unsqueeze(1), grad_x, nan);
    sq_dist = at::where(valid, sq_dist, nan);
  }
  return {loss.to(x_in.scalar_type()), grad_x.to(x_in.scalar_type()), sq_dist};
}

ScanPrecision check_knn_args(const at::Tensor& query, const at::Tensor& bank, int64_t k,
                             std::string_view precision) {
  check_features(query, "query", /*allow_bf16=*/true);
  check_bank(bank, query, "query");
  const int64_t n = bank.size(0);
  TORCH_CHECK(k >= 1 && k <= n, "k must be in [1, n_data = ", n, "], got ", k);
  return parse_precision(precision);
}

std::tuple<at::Tensor, at::Tensor> knn_topk_streamed(const at::Tensor& query_in, const at::Tensor& bank,
                                                     int64_t k, std::string_view precision,
                                                     int64_t query_chunk, int64_t bank_chunk) {
  const ScanPrecision scan_precision = check_knn_args(query_in, bank, k, precision);
  const auto acc_type = query_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor sims, indices;
  std::tie(sims, indices) =
      streamed_topk(query_in.to(acc_type).contiguous(), bank, k, query_chunk, bank_chunk,
                    scan_precision);
  return {sims.to(query_in.scalar_type()), indices};
}

}  // namespace npid
