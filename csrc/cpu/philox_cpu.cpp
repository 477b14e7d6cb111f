// The in-kernel negative draw on the CPU: Philox4x32-10 eight calls (sixteen negatives) at a time
// in AVX2 lanes. One scalar call is ~10 rounds of two dependent 32x32 multiplies; drawn one at a
// time the 4,096 negatives of a sample cost as much as scoring a fifth of its rows, which made
// in-kernel sampling 15-30% slower than passing idx. The lanes compute exactly the scalar
// philox4x32_10 (philox.h), and the 64 random bits of each negative go through the same
// bits_to_negative_row, so every path (CPU scalar, AVX2, CUDA, reference.py) draws the same rows.
#include "cpu_common.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define NPID_HAVE_AVX2_PHILOX 1
#endif

namespace npid {
namespace cpu {
namespace {

#ifdef NPID_HAVE_AVX2_PHILOX
// hi and lo 32 bits of a * m in each of the eight lanes.
NPID_TARGET_AVX2 inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  lo = _mm256_mullo_epi32(a, m);
  const __m256i even = _mm256_mul_epu32(a, m);  // 64-bit products of lanes 0, 2, 4, 6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), _mm256_srli_epi64(m, 32));
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Rows of sample b's columns 0..K into rows[0..K], as fill_sampled_rows.
NPID_TARGET_AVX2 void fill_sampled_rows_avx2(int64_t b, int64_t K, int64_t positive,
                                             uint64_t seed, uint64_t offset, int64_t n_data,
                                             int64_t* rows, bool exclude_positive) {
  rows[0] = positive;
  // Negative k (1..K) is stream element e = b*K + k-1: call e >> 1, half e & 1.
  const uint64_t e_first = static_cast<uint64_t>(b * K), e_end = e_first + K;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i c2_start = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m256i c3_start = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  alignas(32) uint32_t lane_lo[8], lane_hi[8], out[4][8];
  for (uint64_t call0 = e_first >> 1; 2 * call0 < e_end; call0 += 8) {
    for (int i = 0; i < 8; ++i) {
      lane_lo[i] = static_cast<uint32_t>(call0 + i);
      lane_hi[i] = static_cast<uint32_t>((call0 + i) >> 32);
    }
    __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_lo));
    __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_hi));
    __m256i c2 = c2_start, c3 = c3_start;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, hi0, lo0);
      mulhilo8(c2, m1, hi1, lo1);
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1),
                                          _mm256_set1_epi32(static_cast<int>(k0)));
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3),
                                          _mm256_set1_epi32(static_cast<int>(k1)));
      c0 = n0;
      c1 = lo1;
      c2 = n2;
      c3 = lo0;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[0]), c0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[1]), c1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[2]), c2);
    _mm256_store_si256(reinterpret_cast<__m256i*>(out[3]), c3);
    for (int i = 0; i < 8; ++i) {
      for (int half = 0; half < 2; ++half) {
        const uint64_t e = 2 * (call0 + i) + half;
        if (e < e_first || e >= e_end) continue;
        const uint64_t bits = static_cast<uint64_t>(out[2 * half][i]) |
                              (static_cast<uint64_t>(out[2 * half + 1][i]) << 32);
        rows[1 + (e - e_first)] = bits_to_negative_row(bits, n_data, positive, exclude_positive);
      }
    }
  }
}
#endif

}  // namespace

void fill_sampled_rows_cpu(int64_t b, int64_t K, int64_t positive, uint64_t seed,
                           uint64_t offset, int64_t n_data, int64_t* rows,
                           bool exclude_positive) {
#ifdef NPID_HAVE_AVX2_PHILOX
  if (cpu_isa() != CpuIsa::kBaseline) {
    fill_sampled_rows_avx2(b, K, positive, seed, offset, n_data, rows, exclude_positive);
    return;
  }
#endif
  fill_sampled_rows(b, K, positive, seed, offset, n_data, rows, exclude_positive);
}

}  // namespace cpu
}  // namespace npid
