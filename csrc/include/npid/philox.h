// Philox4x32-10 (Salmon et al., SC'11), usable from host and device code.
//
// Negative (b, k), k = 1..K, is element e = b*K + (k-1) of the stream. Two elements
// share one Philox call: counter = (e/2 low, e/2 high, offset low, offset high),
// key = (seed low, seed high); element e takes 64 bits, words 2*(e%2) and 2*(e%2)+1,
// and its row is floor(bits * n_data / 2^64) (Lemire's multiply-shift: no 64-bit division,
// bias below n / 2^64). With exclude_positive the 64 bits pick one of the n_data - 1 rows other
// than the sample's positive instead (bits_to_negative_row). The CPU kernels, the CUDA kernels and reference.py's pure-PyTorch
// Philox all produce the same indices from (seed, offset). Device code (nvcc, or the CUDA
// emulator) takes the __umulhi / __umul64hi path, host code the 64/128-bit products.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define NPID_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define NPID_HOST_DEVICE inline
#endif

namespace npid {

struct Philox4x32Out {
  uint32_t v[4];
};

NPID_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__) || defined(NPID_EMULATE_CUDA)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  hi = static_cast<uint32_t>(p >> 32);
#endif
}

NPID_HOST_DEVICE Philox4x32Out philox4x32_10(uint64_t counter, uint64_t offset, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
    philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4x32Out{{c0, c1, c2, c3}};
}

// floor(bits * n / 2^64): 64 random bits to a row in [0, n).
NPID_HOST_DEVICE int64_t bits_to_row(uint64_t bits, int64_t n_data) {
#if defined(__CUDA_ARCH__) || defined(NPID_EMULATE_CUDA)
  return static_cast<int64_t>(__umul64hi(bits, static_cast<uint64_t>(n_data)));
#else
  return static_cast<int64_t>((static_cast<unsigned __int128>(bits) * static_cast<uint64_t>(n_data)) >> 64);
#endif
}

// The two 64-bit draws of one Philox call: elements 2p (words 0, 1) and 2p + 1 (words 2, 3).
NPID_HOST_DEVICE uint64_t philox_draw_bits(const Philox4x32Out& r, int half) {
  return static_cast<uint64_t>(r.v[2 * half]) | (static_cast<uint64_t>(r.v[2 * half + 1]) << 32);
}

// A negative's row from its 64 random bits: uniform in [0, n_data), or with exclude_positive
// uniform over the n_data - 1 rows other than `positive`. The latter is what redrawing every
// negative equal to the positive until it differs gives, in one draw and no data-dependent
// loop: a row in [0, n_data - 1), moved one up from the positive on (needs n_data >= 2).
NPID_HOST_DEVICE int64_t bits_to_negative_row(uint64_t bits, int64_t n_data, int64_t positive,
                                              bool exclude_positive) {
  if (!exclude_positive) return bits_to_row(bits, n_data);
  const int64_t r = bits_to_row(bits, n_data - 1);
  return r + (r >= positive ? 1 : 0);
}

// Row of negative element e (see the header comment).
NPID_HOST_DEVICE int64_t philox_negative_index(uint64_t e, uint64_t seed, uint64_t offset,
                                               int64_t n_data, int64_t positive = 0,
                                               bool exclude_positive = false) {
  const Philox4x32Out r = philox4x32_10(e >> 1, offset, seed);
  return bits_to_negative_row(philox_draw_bits(r, static_cast<int>(e & 1)), n_data, positive,
                              exclude_positive);
}

// Row for column k of sample b: the positive y_b at k = 0, else a Philox negative.
NPID_HOST_DEVICE int64_t sampled_row(int64_t b, int64_t k, int64_t K, int64_t positive,
                                     uint64_t seed, uint64_t offset, int64_t n_data,
                                     bool exclude_positive = false) {
  if (k == 0) return positive;
  return philox_negative_index(static_cast<uint64_t>(b * K + (k - 1)), seed, offset, n_data,
                               positive, exclude_positive);
}

// Rows of sample b's columns 0..K (column 0 = positive) into rows[0..K]: one Philox call
// per two negatives (sampled_row per element would compute each call twice).
inline void fill_sampled_rows(int64_t b, int64_t K, int64_t positive, uint64_t seed,
                              uint64_t offset, int64_t n_data, int64_t* rows,
                              bool exclude_positive = false) {
  rows[0] = positive;
  const uint64_t e0 = static_cast<uint64_t>(b * K);
  Philox4x32Out r{};
  for (int64_t k = 1; k <= K; ++k) {
    const uint64_t e = e0 + static_cast<uint64_t>(k - 1);
    if (k == 1 || (e & 1) == 0) r = philox4x32_10(e >> 1, offset, seed);
    rows[k] = bits_to_negative_row(philox_draw_bits(r, static_cast<int>(e & 1)), n_data, positive,
                                   exclude_positive);
  }
}

}  // namespace npid
