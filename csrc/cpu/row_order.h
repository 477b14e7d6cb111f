// The gathered set of the fused CPU losses visited in bank-row order instead of sample order.
//
// In sample order each of the B * (K+1) (sample, row) pairs reads its bank row from a random
// address: at B = 64, K = 4096, n = 50,000 that is 134 MB of cache misses per step for a
// 25.6 MB bank, every row fetched ~5 times, and the step is bound by memory latency. Sorted by
// row (a stable counting sort of the pairs), the same pairs read each touched row once, in
// increasing address order, and the rows a sample meets are scored against its features held
// in cache (B x d, 32 KB at B = 64). Per-sample sums (loss, grad_x) are then accumulated per
// chunk of the sorted pairs and added up chunk by chunk in a fixed order, so the result does not
// depend on the thread count.
//
// Worth it when rows repeat: B * (K+1) at least n (see use_row_order()).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_common.h"

namespace npid {
namespace cpu {

// One (sample, row) pair: row in the high 32 bits, then the sample b, then whether the pair is
// the sample's positive (column 0). Sorting by the whole key orders by row, then by sample.
struct RowPair {
  static uint64_t key(int64_t row, int64_t b, bool positive) {
    return (static_cast<uint64_t>(row) << 32) | (static_cast<uint64_t>(b) << 1) |
           static_cast<uint64_t>(positive);
  }
  static int64_t row(uint64_t key) { return static_cast<int64_t>(key >> 32); }
  static int64_t sample(uint64_t key) { return static_cast<int64_t>((key & 0xFFFFFFFFu) >> 1); }
  static bool positive(uint64_t key) { return (key & 1u) != 0; }
};

// Row order when there are at least as many pairs as bank rows. Measured side by side on the
// 2-core dev VM (NCE training step, B = 64, K = 4096, d = 128, fp32, medians, ms, sample vs row
// order): n = 50k (5.2 pairs per row) 21.2 vs 13.1; 130k (2.0) 23.9 vs 18.4; 260k (1.0) 23.9
// vs 21.0; 400k (0.65) 22.7 vs 25.5; 1.28M (0.2) 45 vs 50. Below one pair per row the sort's
// passes over n counters and the sparser rows are no longer paid back.
// NPID_CPU_PAIR_ORDER=sample|row forces one order (the tests run both).
inline bool use_row_order(int64_t B, int64_t columns, int64_t n) {
  const char* forced = std::getenv("NPID_CPU_PAIR_ORDER");
  if (forced != nullptr && std::strcmp(forced, "sample") == 0) return false;
  const bool fits = B < (int64_t(1) << 31) && n < (int64_t(1) << 31);
  if (forced != nullptr && std::strcmp(forced, "row") == 0) return fits;
  const int64_t pairs = B * columns;
  return fits && pairs >= 4096 && pairs >= n;
}

// All B * columns pairs sorted by (row, sample). Rows outside [0, n) are recorded in `bad` and
// left out.
struct RowOrder {
  std::vector<uint64_t> keys;
};

inline RowOrder sort_pairs_by_row(const RowSource& src, int64_t B, int64_t n, BadIndexFlag& bad) {
  const int64_t columns = src.columns, pairs = B * columns;
  // The rows themselves: the idx tensor, or drawn here (Philox), one sample per task.
  std::vector<int64_t> drawn;
  const int64_t* rows = src.idx;
  if (rows == nullptr) {
    drawn.resize(pairs);
    at::parallel_for(0, B, kSampleGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) src.fill(b, drawn.data() + b * columns);
    });
    rows = drawn.data();
  }
  RowOrder order;
  // Stable counting sort, the pairs split into `parts` consecutive slices of whole samples, each
  // with its own counters: slice p's pairs of row r go after slices 0..p-1's pairs of row r, so
  // the order is the sequential one whatever the number of slices.
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), B, std::max<int64_t>(1, 4 * pairs / n)}));
  std::vector<int64_t> counts(parts * n, 0);
  auto slice = [&](int64_t p) { return std::make_pair(B * p / parts, B * (p + 1) / parts); };
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* count = counts.data() + p * n;
      const auto [b0, b1] = slice(p);
      for (int64_t e = b0 * columns; e < b1 * columns; ++e) {
        const int64_t r = rows[e];
        if (r < 0 || r >= n) {
          bad.record(r);
          continue;
        }
        ++count[r];
      }
    }
  });
  // Turn the counts into each slice's first position per row.
  int64_t next = 0;
  for (int64_t r = 0; r < n; ++r) {
    for (int64_t p = 0; p < parts; ++p) {
      const int64_t c = counts[p * n + r];
      counts[p * n + r] = next;
      next += c;
    }
  }
  order.keys.resize(next);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int64_t* cursor = counts.data() + p * n;
      const auto [b0, b1] = slice(p);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* sample_rows = rows + b * columns;
        for (int64_t k = 0; k < columns; ++k) {
          const int64_t r = sample_rows[k];
          if (r < 0 || r >= n) continue;
          order.keys[cursor[r]++] = RowPair::key(r, b, k == 0);
        }
      }
    }
  });
  return order;
}

// How many chunks the sorted pairs are cut into: enough for the threads to share, few enough
// that the per-chunk B x d accumulators stay small. Depends only on the problem's size.
inline int64_t row_order_chunks(int64_t pairs, int64_t B, int64_t d) {
  const int64_t by_work = pairs / 16384;
  const int64_t by_memory = (int64_t(64) << 20) / std::max<int64_t>(1, B * d * 8);
  return std::max<int64_t>(1, std::min<int64_t>({16, by_work, by_memory}));
}

constexpr int64_t kPairPrefetchDistance = 48;

// Scores the sorted pairs [lo, hi): visit(b, positive, row_ptr, s) with s = row . x_b / T.
// `xa` is x in the accumulation dtype, B x d. The row of the pair `kPairPrefetchDistance` ahead
// is fetched early: consecutive pairs mostly share a row or sit a few rows apart, but when the
// pairs are sparse the rows are far enough apart for the hardware prefetcher to miss them.
// A bank in another dtype than the accumulation (bf16, fp16) has each row converted once, when
// the pairs reach it, and its ~5 pairs (at the shape) use the converted copy: the
// vectorised dot and axpy of the accumulation dtype instead of a conversion per element and pair.
template <typename acc_t, typename bank_t, typename Visit>
NPID_ALWAYS_INLINE void score_sorted_pairs(const uint64_t* keys, int64_t lo, int64_t hi,
                                           const acc_t* xa, const bank_t* bank, int64_t d,
                                           acc_t inv_t, Visit& visit) {
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(bank_t));
  constexpr bool kConvert = !std::is_same_v<acc_t, bank_t>;
  std::vector<acc_t> converted(kConvert ? d : 0);
  int64_t prefetched = -1, converted_row = -1;
  for (int64_t i = lo; i < hi; ++i) {
    if (i + kPairPrefetchDistance < hi) {
      const int64_t ahead = RowPair::row(keys[i + kPairPrefetchDistance]);
      if (ahead != prefetched) {
        prefetch_row(bank + ahead * d, row_bytes);
        prefetched = ahead;
      }
    }
    const uint64_t key = keys[i];
    const int64_t b = RowPair::sample(key), r = RowPair::row(key);
    if constexpr (kConvert) {
      if (r != converted_row) {
        const bank_t* src = bank + r * d;
        acc_t* dst = converted.data();
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<acc_t>(src[j]);
        converted_row = r;
      }
      visit(b, RowPair::positive(key), static_cast<const acc_t*>(converted.data()),
            dot_row(static_cast<const acc_t*>(converted.data()), xa + b * d, d) * inv_t);
    } else {
      const bank_t* row = bank + r * d;
      visit(b, RowPair::positive(key), row, dot_row(row, xa + b * d, d) * inv_t);
    }
  }
}

#define NPID_DEFINE_PAIRS_VARIANT(NAME, TARGET)                                             \
  template <typename acc_t, typename bank_t, typename Visit>                               \
  TARGET void NAME(const uint64_t* keys, int64_t lo, int64_t hi, const acc_t* xa,          \
                   const bank_t* bank, int64_t d, acc_t inv_t, Visit& visit) {              \
    score_sorted_pairs<acc_t, bank_t>(keys, lo, hi, xa, bank, d, inv_t, visit);                   \
  }
NPID_DEFINE_PAIRS_VARIANT(score_sorted_pairs_avx512, NPID_TARGET_AVX512)
NPID_DEFINE_PAIRS_VARIANT(score_sorted_pairs_avx2, NPID_TARGET_AVX2)
NPID_DEFINE_PAIRS_VARIANT(score_sorted_pairs_baseline, )
#undef NPID_DEFINE_PAIRS_VARIANT

// Runs the chunks of the sorted pairs in parallel: begin_chunk(c) before chunk c's pairs,
// visit(c, b, positive, row_ptr, s) per pair. The chunks are fixed by the problem's size.
template <typename acc_t, typename bank_t, typename Visit>
void score_sorted_pairs_in_chunks(const RowOrder& order, int64_t chunks, const acc_t* xa,
                           const bank_t* bank, int64_t d, double temperature, Visit visit) {
  const CpuIsa isa = cpu_isa();
  const int64_t total = static_cast<int64_t>(order.keys.size());
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto in_chunk = [&](int64_t b, bool positive, const auto* row, acc_t s)
          NPID_ALWAYS_INLINE_LAMBDA { visit(c, b, positive, row, s); };
      const int64_t lo = total * c / chunks, hi = total * (c + 1) / chunks;
      switch (isa) {
        case CpuIsa::kAvx512:
          score_sorted_pairs_avx512<acc_t, bank_t>(order.keys.data(), lo, hi, xa, bank, d, inv_t, in_chunk);
          break;
        case CpuIsa::kAvx2:
          score_sorted_pairs_avx2<acc_t, bank_t>(order.keys.data(), lo, hi, xa, bank, d, inv_t, in_chunk);
          break;
        default:
          score_sorted_pairs_baseline<acc_t, bank_t>(order.keys.data(), lo, hi, xa, bank, d, inv_t,
                                              in_chunk);
      }
    }
  });
}

}  // namespace cpu
}  // namespace npid
