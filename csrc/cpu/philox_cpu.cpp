// The in-kernel negative draw on the CPU: Philox4x32-10 sixteen calls (32 negatives) at a time
// in AVX2 lanes, and the rows mapped from their bits in lanes too. One scalar call is ~10 rounds
// of two dependent 32x32 multiplies; drawn one at a time the 4,096 negatives of a sample cost
// as much as scoring a fifth of its rows, which made in-kernel sampling 15-30% slower than
// passing idx. The lanes compute exactly the scalar philox4x32_10 (philox.h), and the 64 random
// bits of each negative give the row bits_to_negative_row gives, so every path (CPU scalar,
// AVX2, CUDA, reference.py) draws the same rows.
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

// Groups of eight calls computed together. One group's ten rounds are one chain of dependent
// multiplies, shifts and xors, which leaves the multiplier idle between its steps; two
// independent chains keep it busy. (Drawing B = 64, K = 4096 on one thread of the dev VM:
// 870 us with one group and each row mapped on its own, 545 us with two groups and
// bits_to_rows4; three or four groups 585-600 us.)
constexpr int kGroups = 2;
constexpr int kCallsPerIteration = 8 * kGroups;

// The ten rounds of philox4x32_10 on kGroups x 8 counters (c[g][word], lane = call).
NPID_TARGET_AVX2 inline void philox_rounds(__m256i (&c)[kGroups][4], uint64_t seed) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < kGroups; ++g) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c[g][0], m0, hi0, lo0);
      mulhilo8(c[g][2], m1, hi1, lo1);
      c[g][0] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[g][1]), key0);
      c[g][1] = lo1;
      c[g][2] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[g][3]), key1);
      c[g][3] = lo0;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// bits_to_negative_row in 64-bit lanes, for the bits hi:lo held in the low 32 bits of each
// lane of `lo` and `hi`, and n = n_data (n_data - 1 with exclude_positive) below 2^32:
// floor((hi:lo) * n / 2^64) = floor((hi * n + floor(lo * n / 2^32)) / 2^32) exactly, and
// neither product nor their sum overflows 64 bits.
NPID_TARGET_AVX2 inline __m256i bits_to_rows4(__m256i lo, __m256i hi, __m256i n,
                                              bool exclude_positive, __m256i positive) {
  const __m256i carry = _mm256_srli_epi64(_mm256_mul_epu32(lo, n), 32);
  const __m256i row = _mm256_srli_epi64(_mm256_add_epi64(_mm256_mul_epu32(hi, n), carry), 32);
  if (!exclude_positive) return row;
  // row + (row >= positive): the mask is -1 where row > positive - 1.
  const __m256i past = _mm256_cmpgt_epi64(row, _mm256_sub_epi64(positive, _mm256_set1_epi64x(1)));
  return _mm256_sub_epi64(row, past);
}

// The 16 rows of one group of eight calls (call i's elements 2i and 2i + 1), in element order,
// to rows[0..16).
NPID_TARGET_AVX2 inline void store_group_rows(const __m256i (&c)[4], __m256i n,
                                              bool exclude_positive, __m256i positive,
                                              int64_t* rows) {
  // Element 2i takes words 0 (lo) and 1 (hi) of call i, element 2i + 1 words 2 and 3; the even
  // calls sit in the low halves of the 64-bit lanes, the odd ones are shifted down.
  const __m256i first_even = bits_to_rows4(c[0], c[1], n, exclude_positive, positive);
  const __m256i second_even = bits_to_rows4(c[2], c[3], n, exclude_positive, positive);
  const __m256i first_odd = bits_to_rows4(_mm256_srli_epi64(c[0], 32),
                                          _mm256_srli_epi64(c[1], 32), n, exclude_positive,
                                          positive);
  const __m256i second_odd = bits_to_rows4(_mm256_srli_epi64(c[2], 32),
                                           _mm256_srli_epi64(c[3], 32), n, exclude_positive,
                                           positive);
  // Both elements of calls (0, 4), (2, 6), (1, 5) and (3, 7), then the calls in order.
  const __m256i calls_0_4 = _mm256_unpacklo_epi64(first_even, second_even);
  const __m256i calls_2_6 = _mm256_unpackhi_epi64(first_even, second_even);
  const __m256i calls_1_5 = _mm256_unpacklo_epi64(first_odd, second_odd);
  const __m256i calls_3_7 = _mm256_unpackhi_epi64(first_odd, second_odd);
  __m256i* out = reinterpret_cast<__m256i*>(rows);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(calls_0_4, calls_1_5, 0x20));
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(calls_2_6, calls_3_7, 0x20));
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(calls_0_4, calls_1_5, 0x31));
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(calls_2_6, calls_3_7, 0x31));
}

// Rows of sample b's columns 0..K into rows[0..K], as fill_sampled_rows.
NPID_TARGET_AVX2 void fill_sampled_rows_avx2(int64_t b, int64_t K, int64_t positive,
                                             uint64_t seed, uint64_t offset, int64_t n_data,
                                             int64_t* rows, bool exclude_positive) {
  rows[0] = positive;
  // Negative k (1..K) is stream element e = b*K + k-1: call e >> 1, half e & 1.
  const uint64_t e_first = static_cast<uint64_t>(b * K), e_end = e_first + K;
  const int64_t n = exclude_positive ? n_data - 1 : n_data;
  const bool map_in_lanes = n < (int64_t(1) << 32);
  const __m256i n_lanes = _mm256_set1_epi64x(n), positive_lanes = _mm256_set1_epi64x(positive);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i offset_lo = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  const __m256i offset_hi =
      _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  alignas(32) uint32_t out[4][8];
  for (uint64_t call0 = e_first >> 1; 2 * call0 < e_end; call0 += kCallsPerIteration) {
    __m256i c[kGroups][4];
    for (int g = 0; g < kGroups; ++g) {
      const uint64_t first = call0 + 8 * g;
      if ((first >> 32) == ((first + 7) >> 32)) {  // the eight counters share their high word
        c[g][0] = _mm256_add_epi32(
            _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first))), iota);
        c[g][1] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(first >> 32)));
      } else {
        alignas(32) uint32_t lane_lo[8], lane_hi[8];
        for (int i = 0; i < 8; ++i) {
          lane_lo[i] = static_cast<uint32_t>(first + i);
          lane_hi[i] = static_cast<uint32_t>((first + i) >> 32);
        }
        c[g][0] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_lo));
        c[g][1] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_hi));
      }
      c[g][2] = offset_lo;
      c[g][3] = offset_hi;
    }
    philox_rounds(c, seed);
    for (int g = 0; g < kGroups; ++g) {
      const uint64_t first = call0 + 8 * g, e0 = 2 * first;
      if (e0 >= e_end) break;
      if (map_in_lanes && e0 >= e_first && e0 + 16 <= e_end) {  // all sixteen are this sample's
        store_group_rows(c[g], n_lanes, exclude_positive, positive_lanes,
                         rows + 1 + (e0 - e_first));
        continue;
      }
      for (int w = 0; w < 4; ++w) _mm256_store_si256(reinterpret_cast<__m256i*>(out[w]), c[g][w]);
      for (int i = 0; i < 8; ++i) {
        for (int half = 0; half < 2; ++half) {
          const uint64_t e = 2 * (first + i) + half;
          if (e < e_first || e >= e_end) continue;
          const uint64_t bits = static_cast<uint64_t>(out[2 * half][i]) |
                                (static_cast<uint64_t>(out[2 * half + 1][i]) << 32);
          rows[1 + (e - e_first)] = bits_to_negative_row(bits, n_data, positive, exclude_positive);
        }
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
