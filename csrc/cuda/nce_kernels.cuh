// Device code of the sampled-row ops (nce_scores and its backward, Z estimation, the fused
// NCE / softmax-CE losses, negative sampling), compiled by nvcc (nce_cuda.cu) or by the host
// compiler for the CUDA emulator (csrc/emu/).
//
// Kernel design:
//  * One block of 256 threads (8 warps) per (sample b, column split). Each warp takes
//    batches of 32 consecutive columns of idx: lane l loads idx[b, k] (coalesced) or draws
//    the Philox row for column k in-kernel (seed/offset read from rng_state on the device),
//    range-checks it, and the rows are handed to the lanes by __shfl_sync.
//  * A bank row is read by a group of G lanes (a power of two) with 16-byte loads
//    (float4 / 2 doubles / 8 halves or bfloat16s) when the bank base and row pitch are
//    16-byte aligned, else element loads. Each lane holds NV vectors of the row (NV = 4 for
//    fp32 / fp64 rows and element loads, 2 or 4 for 16-bit rows) and each group R = 8 / NV
//    rows at once, so every lane issues 8 independent loads before using any (a warp keeps
//    4 KiB in flight with 16-byte loads), and G is as small as the row allows (d = 128 fp32:
//    G = 8, four rows per warp instruction, 3 shuffles to reduce four dot products). x_b
//    sits in registers in the same lane layout; the dot product is reduced inside the group
//    with __shfl_xor_sync (every lane of the group ends with the same score).
//  * Accumulation in fp32 (double for double features): grad_x partial sums live in
//    registers, the per-sample loss is summed in double by the group's first lane.
//    Softmax-CE keeps an online (max, sum) per group, rescaling its accumulators when the
//    max grows.
//  * End of block: groups are merged with shuffles, warps through shared memory, in a fixed
//    order (deterministic, no atomics). With one split the block writes loss and grad_x;
//    with several (small batches: B < #SMs, so that enough blocks are in flight) each block
//    writes a partial state and a finalize kernel merges the splits in order.
//  * Rows too long for the register layout (more than 128 vectors: d > 512 fp32, d > 256
//    fp64, d > 1024 16-bit, or d > 256 without 16-byte alignment, where a lane holds 8 elements
//    and a group one row) go through a general kernel: one warp per row, element
//    loads, the warp's accumulators in a global workspace; the finalize kernel merges the
//    warps' partial states the same way.
// Errors are reported without a host sync (NaN results); see host_common.h.
#pragma once
#include <cstdint>

#include "device_common.cuh"
#include "npid/dispatch.h"
#include "npid/loss_terms.h"
#include "npid/math.h"
#include "npid/philox.h"

namespace npid {
namespace cuda {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kFinalizeThreads = 128;
constexpr int kReduceThreads = 512;
// A split holds at least one 32-column batch per warp.
constexpr int64_t kMinColsPerSplit = kThreads;
constexpr size_t kMaxFastSmem = 40 * 1024;  // plus a few static bytes, under the 48 KiB default

enum class Mode : int { kScores, kScoresBwd, kEstZ, kNce, kSoftmax };

template <Mode M>
struct ModeTraits {
  static constexpr bool kDot = M != Mode::kScoresBwd;  // needs s = row . x / T
  static constexpr bool kAcc = M == Mode::kScoresBwd || M == Mode::kNce || M == Mode::kSoftmax;
  static constexpr bool kLsum = M == Mode::kNce || M == Mode::kEstZ;  // double sum per sample
};

template <typename scalar_t, typename bank_t>
struct ScanArgs {
  using acc_t = acc_type_t<scalar_t>;
  const scalar_t* x = nullptr;     // (B, d)
  const bank_t* bank = nullptr;    // (n, d)
  const int64_t* idx = nullptr;    // (B, cols) or null: Philox sampling
  const int64_t* y = nullptr;      // (B,) positives when sampling
  const int64_t* rng = nullptr;    // [seed, offset] when sampling
  int64_t B = 0, d = 0, n = 0, cols = 0;
  bool exclude_positive = false;  // sampling: negatives uniform over the rows other than y[b]
  int64_t n_noise = 0;       // NCE / Z estimation: n of Pn = 1/n (the bank's rows unless n_data)
  int64_t cols_per_split = 0;
  int S = 1;  // column splits per sample (blocks per sample)
  int P = 1;  // partial states per sample in the workspace
  double inv_t = 1.0;
  double c = 0.0;            // NCE: K / n
  const void* z = nullptr;   // NCE / Z estimation: float32 or float64 scalar
  bool z_double = false;
  scalar_t* scores = nullptr;          // kScores: (B, cols)
  const scalar_t* go = nullptr;        // kScoresBwd: grad_out (B, cols)
  const scalar_t* so = nullptr;        // kScoresBwd: out (B, cols)
  scalar_t* loss = nullptr;            // (B,)
  scalar_t* grad = nullptr;            // (B, d)
  double* noise_exp = nullptr;         // kNce: (B,) sum of exp(s_k) over the noise columns k >= 1
  acc_t* sq_dist = nullptr;            // kNce / kSoftmax: (B,) positive_sq_dist (schemas.h)
  double proximal = 0.0;               // kNce / kSoftmax: lambda of the proximal term
  // Workspace (partial states), P per sample.
  double* ws_lsum = nullptr;  // (B, P)
  double* ws_esum = nullptr;  // (B, P) kNce: noise_exp partial sums
  acc_t* ws_m = nullptr;      // (B, P)
  acc_t* ws_l = nullptr;      // (B, P)
  acc_t* ws_acc = nullptr;    // (B, P, d)
  acc_t* ws_s0 = nullptr;     // (B,)
};

// ---------------------------------------------------------------------------------------
// Device pieces shared by the kernels

// What every thread of sample b's blocks needs besides the rows: the Philox key and the
// positive (sampling), 1/T, and for NCE 1/Z (NaN when Z is unset or not finite) and c = K/n.
template <typename acc_t>
struct SampleConstants {
  uint64_t seed = 0, offset = 0;
  int64_t yb = 0;
  acc_t inv_t = acc_t(1), inv_z = acc_t(0), c = acc_t(0);
};

template <Mode M, typename acc_t, typename scalar_t, typename bank_t>
__device__ __forceinline__ SampleConstants<acc_t> sample_constants(
    const ScanArgs<scalar_t, bank_t>& a, int64_t b) {
  SampleConstants<acc_t> k;
  if (a.rng != nullptr) {
    k.seed = static_cast<uint64_t>(a.rng[0]);
    k.offset = static_cast<uint64_t>(a.rng[1]);
  }
  k.yb = a.idx != nullptr ? 0 : a.y[b];
  k.inv_t = static_cast<acc_t>(a.inv_t);
  if constexpr (M == Mode::kNce) {
    const double zv = read_z(a.z, a.z_double);
    k.inv_z = (zv > 0.0 && zv <= 1.7976931348623157e308) ? static_cast<acc_t>(1.0 / zv)
                                                        : quiet_nan<acc_t>();
    k.c = static_cast<acc_t>(a.c);
  }
  return k;
}

// Row for column kc of sample b (kc < k1), range-checked: the row, or -2 when it is outside
// the bank (never dereferenced). Lanes with kc >= k1 get -1 (padding).
template <Mode M, typename scalar_t, typename bank_t, typename acc_t>
__device__ __forceinline__ long long stage_row(const ScanArgs<scalar_t, bank_t>& a, int64_t b,
                                               int64_t kc, int64_t k1,
                                               const SampleConstants<acc_t>& k,
                                               acc_t* s0_ptr, acc_t& coef, bool& bad) {
  coef = acc_t(0);
  if (kc >= k1) return -1;
  const int64_t r = a.idx != nullptr
                        ? a.idx[b * a.cols + kc]
                        : sampled_row(b, kc, a.cols - 1, k.yb, k.seed, k.offset, a.n,
                                      a.exclude_positive);
  if (r < 0 || r >= a.n) {
    bad = true;
    if constexpr (M == Mode::kSoftmax) {
      if (kc == 0) *s0_ptr = quiet_nan<acc_t>();
    }
    return -2;
  }
  if constexpr (M == Mode::kScoresBwd) {
    coef = to_acc<acc_t>(a.go[b * a.cols + kc]) * to_acc<acc_t>(a.so[b * a.cols + kc]) * k.inv_t;
  }
  return static_cast<long long>(r);
}

__device__ __forceinline__ int64_t imin64(int64_t p, int64_t q) { return p < q ? p : q; }

template <typename acc_t>
__device__ __forceinline__ acc_t softmax_weight(acc_t m_i, acc_t m_max) {
  return m_i == neg_inf<acc_t>() ? acc_t(0) : math::exp(m_i - m_max);
}

// A list of `count` partial states: lsum[i], esum[i], m[i], l[i], acc[i * stride + j].
template <typename acc_t>
struct PartialList {
  const double* lsum;
  const double* esum;
  const acc_t* m;
  const acc_t* l;
  const acc_t* acc;
  int64_t stride;
  int count;
};

template <Mode M, typename acc_t>
__device__ __forceinline__ void merge_scalars(const PartialList<acc_t>& p, double& lsum,
                                              double& esum, acc_t& m_max, acc_t& l_sum) {
  lsum = 0.0;
  esum = 0.0;
  if constexpr (M == Mode::kNce) {
    for (int i = 0; i < p.count; ++i) esum += p.esum[i];
  }
  m_max = neg_inf<acc_t>();
  l_sum = acc_t(0);
  if constexpr (ModeTraits<M>::kLsum) {
    for (int i = 0; i < p.count; ++i) lsum += p.lsum[i];
  }
  if constexpr (M == Mode::kSoftmax) {
    for (int i = 0; i < p.count; ++i) m_max = p.m[i] > m_max ? p.m[i] : m_max;
    for (int i = 0; i < p.count; ++i) l_sum += softmax_weight(p.m[i], m_max) * p.l[i];
  }
}

template <Mode M, typename acc_t>
__device__ __forceinline__ acc_t merge_elem(const PartialList<acc_t>& p, acc_t m_max, int64_t j) {
  acc_t v = acc_t(0);
  for (int i = 0; i < p.count; ++i) {
    const acc_t a = p.acc[i * p.stride + j];
    if constexpr (M == Mode::kSoftmax) {
      v += softmax_weight(p.m[i], m_max) * a;
    } else {
      v += a;
    }
  }
  return v;
}

// Deterministic block sum of doubles (blockDim.x a multiple of 32, <= 1024); every thread of
// the block calls it once per kernel and gets the total.
__device__ inline double block_sum(double v) {
  NPID_SHARED_ARRAY(double, warp_sums, 32);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  v = group_sum(v, 32);
  if (lane == 0) warp_sums[w] = v;
  __syncthreads();
  double total = 0.0;
  const int nw = blockDim.x >> 5;
  for (int i = 0; i < nw; ++i) total += warp_sums[i];
  return total;
}

// Element j of sample b's positive row bank[r0] in acc_t (NaN when r0 is outside the bank).
template <typename scalar_t, typename bank_t>
__device__ __forceinline__ acc_type_t<scalar_t> positive_elem(const ScanArgs<scalar_t, bank_t>& a,
                                                              int64_t r0, bool ok, int64_t j) {
  using acc_t = acc_type_t<scalar_t>;
  return ok ? to_acc<acc_t>(a.bank[r0 * a.d + j]) : quiet_nan<acc_t>();
}

// Whole block: merge the partial states of sample b and write its loss / grad_x. The losses'
// proximal term (schemas.h) is formed here from the positive's row, which the softmax's
// gradient reads here anyway: its squared distance to x_b summed over the block, written as
// positive_sq_dist, and with lambda > 0 added to the loss and (2 lambda (x_b - v)) to grad_x.
template <Mode M, typename scalar_t, typename bank_t>
__device__ void emit_final(const ScanArgs<scalar_t, bank_t>& a, int64_t b,
                           const PartialList<acc_type_t<scalar_t>>& p, acc_type_t<scalar_t> s0) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t d = a.d;
  double lsum, esum;
  acc_t m_max, l_sum;
  merge_scalars<M>(p, lsum, esum, m_max, l_sum);
  if constexpr (M == Mode::kScoresBwd) {
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x)
      a.grad[b * d + j] = static_cast<scalar_t>(merge_elem<M>(p, m_max, j));
  } else if constexpr (M == Mode::kNce || M == Mode::kSoftmax) {
    const int64_t r0 = a.idx != nullptr ? a.idx[b * a.cols] : a.y[b];
    const bool ok = r0 >= 0 && r0 < a.n;
    const scalar_t* xb = a.x + b * d;
    acc_t part = acc_t(0);
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      const acc_t diff = to_acc<acc_t>(xb[j]) - positive_elem(a, r0, ok, j);
      part += diff * diff;
    }
    const acc_t sq = static_cast<acc_t>(block_sum(static_cast<double>(part)));
    const bool proximal = a.proximal != 0.0;
    const acc_t two_lambda = static_cast<acc_t>(2.0 * a.proximal);
    if constexpr (M == Mode::kNce) {
      if (threadIdx.x == 0) {
        a.loss[b] = static_cast<scalar_t>(proximal ? lsum + a.proximal * static_cast<double>(sq) : lsum);
        a.noise_exp[b] = esum;
        a.sq_dist[b] = sq;
      }
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        acc_t g = merge_elem<M>(p, m_max, j);
        if (proximal) g += two_lambda * (to_acc<acc_t>(xb[j]) - positive_elem(a, r0, ok, j));
        a.grad[b * d + j] = static_cast<scalar_t>(g);
      }
    } else {
      // loss = logsumexp - s0; grad = (softmax-weighted mean of the rows - w0) / T.
      if (threadIdx.x == 0) {
        const acc_t loss = m_max + math::log(l_sum) - s0;
        a.loss[b] = static_cast<scalar_t>(proximal ? loss + static_cast<acc_t>(a.proximal) * sq : loss);
        a.sq_dist[b] = sq;
      }
      const acc_t inv_l = acc_t(1) / l_sum;
      const acc_t inv_t = static_cast<acc_t>(a.inv_t);
      for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
        const acc_t w0 = positive_elem(a, r0, ok, j);
        acc_t g = (merge_elem<M>(p, m_max, j) * inv_l - w0) * inv_t;
        if (proximal) g += two_lambda * (to_acc<acc_t>(xb[j]) - w0);
        a.grad[b * d + j] = static_cast<scalar_t>(g);
      }
    }
  }
}

// Whole block: merge the partial states into one and store it as partial `pidx`.
template <Mode M, typename scalar_t, typename bank_t>
__device__ void emit_partial(const ScanArgs<scalar_t, bank_t>& a, int64_t pidx,
                             const PartialList<acc_type_t<scalar_t>>& p) {
  using acc_t = acc_type_t<scalar_t>;
  double lsum, esum;
  acc_t m_max, l_sum;
  merge_scalars<M>(p, lsum, esum, m_max, l_sum);
  if (threadIdx.x == 0) {
    if constexpr (ModeTraits<M>::kLsum) a.ws_lsum[pidx] = lsum;
    if constexpr (M == Mode::kNce) a.ws_esum[pidx] = esum;
    if constexpr (M == Mode::kSoftmax) {
      a.ws_m[pidx] = m_max;
      a.ws_l[pidx] = l_sum;
    }
  }
  if constexpr (ModeTraits<M>::kAcc) {
    for (int64_t j = threadIdx.x; j < a.d; j += blockDim.x)
      a.ws_acc[pidx * a.d + j] = merge_elem<M>(p, m_max, j);
  }
}

// ---------------------------------------------------------------------------------------
// Fast kernel: rows of at most 32 * NV vectors of VEC elements, held in registers.
// Grid: B * S blocks of kThreads; dynamic shared memory kWarps * d acc_t (accumulating modes).
// G (lanes per row) is a power of two in [R, 32], with nvec <= G * NV; a warp holds
// P = 32 / G groups, each working on R rows at a time (P * R <= 32 rows of one batch).

// Two blocks per SM (<= 128 registers) except for the widest register layouts.
template <typename scalar_t, int VEC, int NV>
constexpr int fast_min_blocks() {
  return (VEC == 8 && (NV >= 4 || sizeof(acc_type_t<scalar_t>) == 8)) ? 1 : 2;
}

template <Mode M, typename scalar_t, typename bank_t, int VEC, int NV>
__global__ void __launch_bounds__(kThreads, (fast_min_blocks<scalar_t, VEC, NV>()))
    scan_fast_kernel(const ScanArgs<scalar_t, bank_t> a, const int G) {
  using acc_t = acc_type_t<scalar_t>;
  using Tr = ModeTraits<M>;
  using raw_t = typename RawOf<bank_t, VEC>::type;
  constexpr int R = 8 / NV;  // rows in flight per group
  static_assert(R >= 1 && R * NV == 8, "8 loads in flight per lane");

  NPID_DYNAMIC_SHARED(unsigned char, smem_raw);
  NPID_SHARED_ARRAY(double, sm_lsum, kWarps);
  NPID_SHARED_ARRAY(double, sm_esum, kWarps);
  NPID_SHARED_ARRAY(acc_t, sm_m, kWarps);
  NPID_SHARED_ARRAY(acc_t, sm_l, kWarps);
  NPID_SHARED(acc_t, sm_s0);

  const int64_t b = blockIdx.x / a.S;
  const int split = static_cast<int>(blockIdx.x - b * a.S);
  const int64_t k0 = static_cast<int64_t>(split) * a.cols_per_split;
  const int64_t k1 = imin64(a.cols, k0 + a.cols_per_split);
  const int lane = threadIdx.x & 31;
  const int w = threadIdx.x >> 5;
  const int P = 32 / G;       // groups per warp
  const int g = lane / G;     // this lane's group
  const int li = lane & (G - 1);
  const int64_t d = a.d;
  const int64_t nvec = d / VEC;

  if constexpr (M == Mode::kEstZ) {
    if (read_z(a.z, a.z_double) > 0) return;  // Z already set: nothing to do (whole block)
  }

  const SampleConstants<acc_t> consts = sample_constants<M, acc_t>(a, b);
  const acc_t inv_t = consts.inv_t;
  acc_t* s0_ptr = a.S > 1 ? a.ws_s0 + b : &sm_s0;

  // x_b in the lane layout of the rows: vector t = li + G * s.
  acc_t xr[NV][VEC];
#pragma unroll
  for (int s = 0; s < NV; ++s) {
    const int64_t t = li + static_cast<int64_t>(G) * s;
#pragma unroll
    for (int e = 0; e < VEC; ++e)
      xr[s][e] = (Tr::kDot && t < nvec) ? to_acc<acc_t>(a.x[b * d + t * VEC + e]) : acc_t(0);
  }
  acc_t acc[NV][VEC];
#pragma unroll
  for (int s = 0; s < NV; ++s)
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[s][e] = acc_t(0);
  double lsum = 0.0, esum = 0.0;  // esum: kNce's noise_exp (each group's lane 0)
  acc_t m = neg_inf<acc_t>(), l = acc_t(0);
  bool bad = false;

  for (int64_t kb = k0 + 32 * w; kb < k1; kb += 32 * kWarps) {
    acc_t my_coef;
    const long long my_row = stage_row<M>(a, b, kb + lane, k1, consts, s0_ptr, my_coef, bad);
    const int nvalid = static_cast<int>(imin64(32, k1 - kb));
    for (int j0 = 0; j0 < nvalid; j0 += P * R) {
      long long rr[R];
      acc_t cf[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int src = j0 + r * P + g;  // < 32: P * R divides 32
        rr[r] = __shfl_sync(kFullMask, my_row, src);
        cf[r] = Tr::kAcc && !Tr::kDot ? __shfl_sync(kFullMask, my_coef, src) : acc_t(0);
      }
      raw_t raw[R][NV];
#pragma unroll
      for (int r = 0; r < R; ++r) {
#pragma unroll
        for (int s = 0; s < NV; ++s) {
          const int64_t t = li + static_cast<int64_t>(G) * s;
          raw[r][s] = (rr[r] >= 0 && t < nvec) ? load_raw<bank_t, VEC>(a.bank + rr[r] * d, t)
                                               : raw_zero<bank_t, VEC>();
        }
      }

      if constexpr (M == Mode::kSoftmax) {
        acc_t sr[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          acc_t dot = acc_t(0);
#pragma unroll
          for (int s = 0; s < NV; ++s) {
            acc_t v[VEC];
            decode<acc_t, bank_t, VEC>(raw[r][s], v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) dot += xr[s][e] * v[e];
          }
          sr[r] = group_sum(dot, G) * inv_t;
        }
        acc_t m_new = m;
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (rr[r] >= 0 && sr[r] > m_new) m_new = sr[r];
        if (m_new > m) {  // new running max: rescale what was summed so far
          const acc_t scale = math::exp(m - m_new);
          l *= scale;
#pragma unroll
          for (int s = 0; s < NV; ++s)
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[s][e] *= scale;
          m = m_new;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (rr[r] < 0) continue;
          const int64_t kcol = kb + j0 + r * P + g;
          if (kcol == 0 && li == 0) *s0_ptr = sr[r];
          const acc_t ex = math::exp(sr[r] - m);
          l += ex;
#pragma unroll
          for (int s = 0; s < NV; ++s) {
            acc_t v[VEC];
            decode<acc_t, bank_t, VEC>(raw[r][s], v);
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[s][e] += ex * v[e];
          }
        }
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          acc_t v[NV][VEC];
#pragma unroll
          for (int s = 0; s < NV; ++s) decode<acc_t, bank_t, VEC>(raw[r][s], v[s]);
          acc_t sc = acc_t(0);
          if constexpr (Tr::kDot) {
            acc_t dot = acc_t(0);
#pragma unroll
            for (int s = 0; s < NV; ++s)
#pragma unroll
              for (int e = 0; e < VEC; ++e) dot += xr[s][e] * v[s][e];
            sc = group_sum(dot, G) * inv_t;
          }
          const int64_t kcol = kb + j0 + r * P + g;
          if constexpr (M == Mode::kScores) {
            if (li == 0 && rr[r] != -1)
              a.scores[b * a.cols + kcol] =
                  static_cast<scalar_t>(rr[r] >= 0 ? math::exp(sc) : quiet_nan<acc_t>());
          } else if constexpr (M == Mode::kEstZ) {
            if (li == 0 && rr[r] >= 0) lsum += math::exp(static_cast<double>(sc));
          } else if constexpr (M == Mode::kNce) {
            if (rr[r] >= 0) {
              acc_t term, dl_ds;
              const acc_t e = math::exp(sc);
              nce_term_of_exp<acc_t>(e, kcol == 0, consts.inv_z, consts.c, term, dl_ds);
              if (li == 0) {
                lsum += static_cast<double>(term);
                if (kcol != 0) esum += static_cast<double>(e);
              }
              const acc_t coef = dl_ds * inv_t;
#pragma unroll
              for (int s = 0; s < NV; ++s)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[s][e] += coef * v[s][e];
            }
          } else {  // kScoresBwd
            if (rr[r] >= 0) {
#pragma unroll
              for (int s = 0; s < NV; ++s)
#pragma unroll
                for (int e = 0; e < VEC; ++e) acc[s][e] += cf[r] * v[s][e];
            }
          }
        }
      }
    }
  }

  if constexpr (M != Mode::kScores) {
    // Merge the groups of each warp (lanes li, li + G, ... hold the same elements).
    const bool warp_bad = __any_sync(kFullMask, bad);
    if constexpr (M == Mode::kSoftmax) {
      const acc_t m_w = across_groups_max(m, G);
      const acc_t scale = softmax_weight(m, m_w);
      l = across_groups_sum(l * scale, G);
#pragma unroll
      for (int s = 0; s < NV; ++s)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[s][e] *= scale;
      m = m_w;
    }
    if constexpr (Tr::kAcc) {
#pragma unroll
      for (int s = 0; s < NV; ++s)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[s][e] = across_groups_sum(acc[s][e], G);
    }
    if constexpr (Tr::kLsum) lsum = group_sum(lsum, 32);  // only each group's lane 0 summed
    if constexpr (M == Mode::kNce) esum = group_sum(esum, 32);
    if (warp_bad) {
      lsum = quiet_nan<double>();
      esum = quiet_nan<double>();
      l = quiet_nan<acc_t>();
#pragma unroll
      for (int s = 0; s < NV; ++s)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[s][e] = quiet_nan<acc_t>();
    }
    acc_t* sm_acc = reinterpret_cast<acc_t*>(smem_raw);  // (kWarps, d)
    if constexpr (Tr::kAcc) {
      if (g == 0) {
#pragma unroll
        for (int s = 0; s < NV; ++s) {
          const int64_t t = li + static_cast<int64_t>(G) * s;
          if (t < nvec) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) sm_acc[w * d + t * VEC + e] = acc[s][e];
          }
        }
      }
    }
    if (lane == 0) {
      sm_lsum[w] = lsum;
      sm_esum[w] = esum;
      sm_m[w] = m;
      sm_l[w] = l;
    }
    __syncthreads();
    const PartialList<acc_t> parts{sm_lsum, sm_esum, sm_m, sm_l, sm_acc, d, kWarps};
    if (a.S == 1 && M != Mode::kEstZ) {
      emit_final<M>(a, b, parts, M == Mode::kSoftmax ? sm_s0 : acc_t(0));
    } else {
      emit_partial<M>(a, b * a.S + split, parts);
    }
  }
}

// ---------------------------------------------------------------------------------------
// General kernel: any d, element loads, one row per warp at a time. Each warp is its own
// partial state (P = S * kWarps per sample), its accumulators a lane-owned slice of the
// workspace (element j belongs to lane j % 32). Grid: B * S blocks of kThreads.

template <Mode M, typename scalar_t, typename bank_t>
__global__ void __launch_bounds__(kThreads)
    scan_general_kernel(const ScanArgs<scalar_t, bank_t> a) {
  using acc_t = acc_type_t<scalar_t>;
  using Tr = ModeTraits<M>;
  const int64_t b = blockIdx.x / a.S;
  const int split = static_cast<int>(blockIdx.x - b * a.S);
  const int64_t k0 = static_cast<int64_t>(split) * a.cols_per_split;
  const int64_t k1 = imin64(a.cols, k0 + a.cols_per_split);
  const int lane = threadIdx.x & 31;
  const int w = threadIdx.x >> 5;
  const int64_t d = a.d;
  const int64_t pidx = b * a.P + static_cast<int64_t>(split) * kWarps + w;

  if constexpr (M == Mode::kEstZ) {
    if (read_z(a.z, a.z_double) > 0) return;
  }

  const SampleConstants<acc_t> consts = sample_constants<M, acc_t>(a, b);
  const acc_t inv_t = consts.inv_t;
  acc_t* s0_ptr = a.ws_s0 != nullptr ? a.ws_s0 + b : nullptr;
  acc_t* accp = Tr::kAcc ? a.ws_acc + pidx * d : nullptr;
  if constexpr (Tr::kAcc) {
    for (int64_t j = lane; j < d; j += 32) accp[j] = acc_t(0);
  }
  const scalar_t* xb = a.x + b * d;

  double lsum = 0.0, esum = 0.0;  // esum: kNce's noise_exp (each group's lane 0)
  acc_t m = neg_inf<acc_t>(), l = acc_t(0);
  bool bad = false;
  for (int64_t kb = k0 + 32 * w; kb < k1; kb += 32 * kWarps) {
    acc_t my_coef;
    const long long my_row = stage_row<M>(a, b, kb + lane, k1, consts, s0_ptr, my_coef, bad);
    const int nvalid = static_cast<int>(imin64(32, k1 - kb));
    for (int jl = 0; jl < nvalid; ++jl) {
      const long long r = __shfl_sync(kFullMask, my_row, jl);
      const acc_t cf = Tr::kAcc && !Tr::kDot ? __shfl_sync(kFullMask, my_coef, jl) : acc_t(0);
      const int64_t kcol = kb + jl;
      if (r < 0) {  // warp-uniform
        if constexpr (M == Mode::kScores) {
          if (r == -2 && lane == 0) a.scores[b * a.cols + kcol] = static_cast<scalar_t>(quiet_nan<acc_t>());
        }
        continue;
      }
      const bank_t* row = a.bank + r * d;
      acc_t sc = acc_t(0);
      if constexpr (Tr::kDot) {
        acc_t dot = acc_t(0);
        for (int64_t j = lane; j < d; j += 32) dot += to_acc<acc_t>(xb[j]) * to_acc<acc_t>(row[j]);
        sc = group_sum(dot, 32) * inv_t;
      }
      if constexpr (M == Mode::kScores) {
        if (lane == 0) a.scores[b * a.cols + kcol] = static_cast<scalar_t>(math::exp(sc));
      } else if constexpr (M == Mode::kEstZ) {
        if (lane == 0) lsum += math::exp(static_cast<double>(sc));
      } else if constexpr (M == Mode::kNce) {
        acc_t term, dl_ds;
        const acc_t e = math::exp(sc);
        nce_term_of_exp<acc_t>(e, kcol == 0, consts.inv_z, consts.c, term, dl_ds);
        if (lane == 0) {
          lsum += static_cast<double>(term);
          if (kcol != 0) esum += static_cast<double>(e);
        }
        const acc_t coef = dl_ds * inv_t;
        for (int64_t j = lane; j < d; j += 32) accp[j] += coef * to_acc<acc_t>(row[j]);
      } else if constexpr (M == Mode::kScoresBwd) {
        for (int64_t j = lane; j < d; j += 32) accp[j] += cf * to_acc<acc_t>(row[j]);
      } else {  // kSoftmax
        if (kcol == 0 && lane == 0) *s0_ptr = sc;
        if (sc > m) {
          const acc_t scale = math::exp(m - sc);
          l *= scale;
          for (int64_t j = lane; j < d; j += 32) accp[j] *= scale;
          m = sc;
        }
        const acc_t ex = math::exp(sc - m);
        l += ex;
        for (int64_t j = lane; j < d; j += 32) accp[j] += ex * to_acc<acc_t>(row[j]);
      }
    }
  }

  if constexpr (M != Mode::kScores) {
    const bool warp_bad = __any_sync(kFullMask, bad);
    if (lane == 0) {
      if constexpr (Tr::kLsum) a.ws_lsum[pidx] = warp_bad ? quiet_nan<double>() : lsum;
      if constexpr (M == Mode::kNce) a.ws_esum[pidx] = warp_bad ? quiet_nan<double>() : esum;
      if constexpr (M == Mode::kSoftmax) {
        a.ws_m[pidx] = m;
        a.ws_l[pidx] = warp_bad ? quiet_nan<acc_t>() : l;
      }
    }
    if constexpr (Tr::kAcc) {
      if (warp_bad)
        for (int64_t j = lane; j < d; j += 32) accp[j] = quiet_nan<acc_t>();
    }
  }
}

// One block per sample: merge its P partial states, write loss / grad_x.
template <Mode M, typename scalar_t, typename bank_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const ScanArgs<scalar_t, bank_t> a) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t b = blockIdx.x;
  const PartialList<acc_t> parts{a.ws_lsum != nullptr ? a.ws_lsum + b * a.P : nullptr,
                                 a.ws_esum != nullptr ? a.ws_esum + b * a.P : nullptr,
                                 a.ws_m != nullptr ? a.ws_m + b * a.P : nullptr,
                                 a.ws_l != nullptr ? a.ws_l + b * a.P : nullptr,
                                 a.ws_acc != nullptr ? a.ws_acc + b * a.P * a.d : nullptr,
                                 a.d, a.P};
  emit_final<M>(a, b, parts, M == Mode::kSoftmax ? a.ws_s0[b] : acc_t(0));
}

__device__ inline void write_z(void* z, bool z_double, double value) {
  if (z_double) {
    *static_cast<double*>(z) = value;
  } else {
    *static_cast<float*>(z) = static_cast<float>(value);
  }
}

// z = sum(values) / denom * n_data where z <= 0 (or NaN); one block. With only_finite, a
// non-finite result (NaN / inf features, or an out-of-range row, whose partial is NaN)
// leaves z unset, as the CPU nce_estimate_z_ does (it raises there).
template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    set_z_kernel(const T* values, int64_t count, void* z, bool z_double, double denom,
                 double n_data, bool only_finite) {
  if (read_z(z, z_double) > 0) return;  // every thread reads z before thread 0 writes it
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) s += static_cast<double>(values[i]);
  const double total = block_sum(s);
  const double value = total / denom * n_data;
  if (threadIdx.x == 0 && (!only_finite || isfinite(value))) write_z(z, z_double, value);
}

__global__ void sample_negatives_kernel(const int64_t* y, const int64_t* rng, int64_t B,
                                        int64_t K, int64_t n, bool exclude_positive, int64_t* out) {
  const uint64_t seed = static_cast<uint64_t>(rng[0]), offset = static_cast<uint64_t>(rng[1]);
  const int64_t cols = K + 1, total = B * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = e / cols, k = e - b * cols;
    out[e] = sampled_row(b, k, K, y[b], seed, offset, n, exclude_positive);
  }
}

}  // namespace cuda
}  // namespace npid
