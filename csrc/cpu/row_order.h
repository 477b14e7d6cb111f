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

// One (sample, row) pair in the sorted order: the row is implied by the position (RowOrder's
// CSR offsets), the code holds the sample b and whether the pair is its positive (column 0).
struct PairCode {
  static uint32_t make(int64_t b, bool positive) {
    return (static_cast<uint32_t>(b) << 1) | static_cast<uint32_t>(positive);
  }
  static int64_t sample(uint32_t code) { return static_cast<int64_t>(code >> 1); }
  static bool positive(uint32_t code) { return (code & 1u) != 0; }
};

// Row order when there are at least as many pairs as bank rows. Measured side by side on the
// 2-core dev VM (NCE training step, B = 64, K = 4096, d = 128, fp32, medians, ms, sample vs row
// order): n = 50k (5.2 pairs per row) 21.2 vs 13.1; 130k (2.0) 23.9 vs 18.4; 260k (1.0) 23.9
// vs 21.0; 400k (0.65) 22.7 vs 25.5; 1.28M (0.2) 45 vs 50. Below one pair per row the sort's
// passes over n counters and the sparser rows are no longer paid back.
// NPID_CPU_PAIR_ORDER=sample|row forces one order (the tests run both). Positions and samples
// are 32-bit, so row order needs fewer than 2^31 pairs.
inline bool use_row_order(int64_t B, int64_t columns, int64_t n) {
  const char* forced = std::getenv("NPID_CPU_PAIR_ORDER");
  if (forced != nullptr && std::strcmp(forced, "sample") == 0) return false;
  const int64_t pairs = B * columns;
  const bool fits = pairs < (int64_t(1) << 31) && n < (int64_t(1) << 31);
  if (forced != nullptr && std::strcmp(forced, "row") == 0) return fits;
  return fits && pairs >= 4096 && pairs >= n;
}

// All in-range pairs sorted by (row, sample), in CSR form: row r's pairs are
// codes[row_begin(r) .. row_end[r]). Rows outside [0, n) are recorded in `bad` and left out.
struct RowOrder {
  std::vector<uint32_t> codes;
  std::vector<int32_t> row_end;
  int64_t size() const { return static_cast<int64_t>(codes.size()); }
  int64_t row_begin(int64_t r) const { return r == 0 ? 0 : row_end[r - 1]; }
  // The row holding sorted position `pos` (< size()).
  int64_t row_of(int64_t pos) const {
    return std::upper_bound(row_end.begin(), row_end.end(), static_cast<int32_t>(pos)) -
           row_end.begin();
  }
};

// Stable counting sort of the pairs. The counting pass is split into `parts` consecutive slices
// of whole samples, each with its own counters (summed per row by the scan); the placing pass
// into ranges of rows, each placing its rows' pairs in sample order, so the order is the
// sequential one whatever the number of threads. In-kernel rows are drawn (Philox) in the
// counting pass, one sample at a time while its rows are in L1, and kept as int32 for the
// placing pass: no pass of their own and half the bytes of int64.
inline RowOrder sort_pairs_by_row(const RowSource& src, int64_t B, int64_t n, BadIndexFlag& bad) {
  const int64_t columns = src.columns, pairs = B * columns;
  const int64_t parts = std::max<int64_t>(
      1, std::min<int64_t>({at::get_num_threads(), B, std::max<int64_t>(1, 4 * pairs / n)}));
  auto slice = [&](int64_t p) { return std::make_pair(B * p / parts, B * (p + 1) / parts); };
  std::vector<int32_t> counts(parts * n, 0);
  std::vector<int32_t> drawn(src.idx == nullptr ? pairs : 0);  // -1: out of range
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<int64_t> sample_rows(src.idx == nullptr ? columns : 0);
    for (int64_t p = p0; p < p1; ++p) {
      int32_t* count = counts.data() + p * n;
      const auto [b0, b1] = slice(p);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* rows = src.idx + b * columns;
        if (src.idx == nullptr) {
          src.fill(b, sample_rows.data());
          rows = sample_rows.data();
        }
        int32_t* kept = src.idx == nullptr ? drawn.data() + b * columns : nullptr;
        for (int64_t k = 0; k < columns; ++k) {
          const int64_t r = rows[k];
          const bool in_range = r >= 0 && r < n;
          if (!in_range) bad.record(r);
          else ++count[r];
          if (kept != nullptr) kept[k] = in_range ? static_cast<int32_t>(r) : -1;
        }
      }
    }
  });
  // Counts to each row's first position (in the first slice's counters): a parallel scan over
  // ranges of rows.
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / 4096));
  std::vector<int64_t> range_start(ranges + 1, 0);
  auto row_range = [&](int64_t t) { return std::make_pair(n * t / ranges, n * (t + 1) / ranges); };
  at::parallel_for(0, ranges, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t total = 0;
      const auto [r0, r1] = row_range(t);
      for (int64_t p = 0; p < parts; ++p)
        for (int64_t r = r0; r < r1; ++r) total += counts[p * n + r];
      range_start[t + 1] = total;
    }
  });
  for (int64_t t = 0; t < ranges; ++t) range_start[t + 1] += range_start[t];
  at::parallel_for(0, ranges, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t next = range_start[t];
      const auto [r0, r1] = row_range(t);
      for (int64_t r = r0; r < r1; ++r) {
        int64_t c = 0;
        for (int64_t p = 0; p < parts; ++p) c += counts[p * n + r];
        counts[r] = static_cast<int32_t>(next);
        next += c;
      }
    }
  });
  counts.resize(n);  // the cursors: each row's next position
  // Placing: each thread owns a range of rows, so it writes one contiguous part of the codes.
  // (Slices of samples placed in parallel wrote neighbouring positions of every row from both
  // threads, and the two cores passed the lines back and forth: on the dev VM the sort took
  // 1.6 ms on two threads against 1.3 ms on one in some processes.) A thread first copies the
  // pairs of its rows, in sample order, into a buffer of its own (branch-free: every pair is
  // written, the end advances only for the thread's rows), then places them with its rows'
  // cursors, which keeps the sort stable.
  RowOrder order;
  order.codes.resize(range_start[ranges]);
  auto place = [&](auto* rows) {
    if (ranges == 1) {  // one thread: no copy, straight from the rows
      int32_t* cursor = counts.data();
      for (int64_t b = 0; b < B; ++b) {
        const auto* sample_rows = rows + b * columns;
        for (int64_t k = 0; k < columns; ++k) {
          const int64_t r = sample_rows[k];
          if (r >= 0 && r < n) order.codes[cursor[r]++] = PairCode::make(b, k == 0);
        }
      }
      return;
    }
    at::parallel_for(0, ranges, 1, [&](int64_t t0, int64_t t1) {
      std::vector<uint64_t> mine;  // (row << 32) | code
      for (int64_t t = t0; t < t1; ++t) {
        const auto [r0, r1] = row_range(t);
        mine.resize(range_start[t + 1] - range_start[t] + 1);  // + 1: the last pair's spare write
        int64_t kept = 0;
        for (int64_t b = 0; b < B; ++b) {
          const auto* sample_rows = rows + b * columns;
          for (int64_t k = 0; k < columns; ++k) {
            const int64_t r = sample_rows[k];
            mine[kept] = (static_cast<uint64_t>(r) << 32) | PairCode::make(b, k == 0);
            kept += static_cast<int64_t>(static_cast<uint64_t>(r - r0) < static_cast<uint64_t>(r1 - r0));
          }
        }
        int32_t* cursor = counts.data();
        for (int64_t i = 0; i < kept; ++i)
          order.codes[cursor[mine[i] >> 32]++] = static_cast<uint32_t>(mine[i]);
      }
    });
  };
  if (src.idx != nullptr) place(src.idx);
  else place(drawn.data());
  // The cursors now stand at the end of each row's pairs.
  order.row_end = std::move(counts);
  return order;
}

// How many chunks the sorted pairs are cut into: enough for the threads to share (contiguous
// runs of chunks, see score_sorted_pairs_in_chunks), few enough that the per-chunk B x d
// accumulators stay small. Depends only on the problem's size.
inline int64_t row_order_chunks(int64_t pairs, int64_t B, int64_t d) {
  const int64_t by_work = pairs / 16384;
  const int64_t by_memory = (int64_t(64) << 20) / std::max<int64_t>(1, B * d * 8);
  return std::max<int64_t>(1, std::min<int64_t>({16, by_work, by_memory}));
}

// The slots of chunk c are c * chunk_slot_stride(B) + b. Chunks of different threads meet where
// one thread's run of chunks ends and the next one's begins; with a stride of exactly B the
// last samples of one chunk and the first of the next can share a cache line of a per-slot
// array (8-byte sums; d-vectors of floats when B * d is not a multiple of 16), updated on every
// pair by both cores. Rounded up to 16 slots, every chunk's slots start on a cache line of each
// per-slot array allocated as an AlignedVector.
inline int64_t chunk_slot_stride(int64_t B) { return (B + 15) / 16 * 16; }

// Up to kPairBlock scored pairs, handed to the loss together: its epilogue turns the scores
// s (= row . x_b / T) into the coefficients of the rows in the slot's d-vector accumulator
// (exp over the whole block in vector lanes), then each row is added in with its coefficient.
constexpr int64_t kPairBlock = 32;

template <typename acc_t, typename row_t = acc_t>
struct PairBlock {
  int64_t count = 0;
  int64_t slot[kPairBlock];
  bool positive[kPairBlock];
  acc_t s[kPairBlock];  // the scores; the epilogue overwrites them with the rows' coefficients
  const row_t* row[kPairBlock];
};

// How many pairs of one row are scored together (dot_rows_lanes).
constexpr int64_t kRowPairs = 4;

// f(std::integral_constant<int, k>{}) for k = count in [1, kRowPairs]: the pair count as a
// compile-time constant, so the per-pair accumulators of dot_rows_lanes stay in registers.
template <typename F>
NPID_ALWAYS_INLINE void with_row_pairs(int64_t count, F&& f) {
  static_assert(kRowPairs == 4, "the cases below handle 1 to 4 pairs");
  switch (count) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// epilogue(block), then accumulator[slot * d] += coefficient * row for each pair of the block,
// one pair at a time. (Adding a row into up to kRowPairs accumulators in one pass over it, each
// row vector loaded once, was slower: the loop is bound by the accumulators' stores, and
// interleaving four of them per row vector cost more than the row reloads it saved, which hit
// L1; in a microbenchmark of the scoring loop 49 against 45 cycles per pair with the rows in
// cache, 75 against 73 with the n = 50k bank streamed from memory.)
template <typename acc_t, typename row_t, typename Epilogue>
NPID_ALWAYS_INLINE void finish_block(PairBlock<acc_t, row_t>& block, Epilogue& epilogue,
                                     acc_t* accumulator, int64_t d) {
  epilogue(block);
  for (int64_t i = 0; i < block.count; ++i)
    axpy_row(block.s[i], block.row[i], accumulator + block.slot[i] * d, d);
  block.count = 0;
}

constexpr int64_t kPairPrefetchDistance = 48;

// Scores the sorted pairs [lo, hi) of one chunk in blocks (slot = slot_base + b). `xa` is
// x in the accumulation dtype, B x d. A row's pairs are scored kRowPairs at a time, each dot
// product kept as vector lanes until the block's are summed together (lane_sums): the row's
// vectors are loaded once for up to four pairs, and no pair has a horizontal sum of its own.
// The row of the pair `kPairPrefetchDistance` ahead is fetched early: consecutive pairs mostly
// share a row or sit a few rows apart, but when the pairs are sparse the rows are far enough
// apart for the hardware prefetcher to miss them.
// A bank in another dtype than the accumulation (bf16, fp16) has each row converted once into
// the block (its ~5 pairs at the shape use the copy): the vectorised dot and axpy of
// the accumulation dtype instead of a conversion per element and pair.
template <typename acc_t, typename bank_t, typename Epilogue>
NPID_ALWAYS_INLINE void score_sorted_pairs(const RowOrder& order, int64_t lo, int64_t hi,
                                           int64_t slot_base, const acc_t* xa,
                                           const bank_t* bank, int64_t d, acc_t inv_t,
                                           Epilogue& epilogue, acc_t* accumulator) {
  if (lo >= hi) return;
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(bank_t));
  constexpr bool kConvert = !std::is_same_v<acc_t, bank_t>;
  AlignedVector<acc_t> converted(kConvert ? kPairBlock * d : 0);
  using V = typename VectorOf<acc_t>::type;
  constexpr int64_t L = VectorOf<acc_t>::kLanes;
  static_assert(kPairBlock % L == 0, "whole vectors of lane sums per block");
  PairBlock<acc_t> block;
  V lanes[kPairBlock];  // each pair's dot product as vector lanes, summed a vector at a time
  auto finish = [&]() NPID_ALWAYS_INLINE_LAMBDA {
    for (int64_t i = block.count; i % L != 0; ++i) lanes[i] = V{};
    for (int64_t i = 0; i < block.count; i += L) {
      const V sums = lane_sums<acc_t>(lanes + i);
      for (int64_t l = 0; l < L; ++l) block.s[i + l] = sums[l] * inv_t;
    }
    finish_block(block, epilogue, accumulator, d);
  };
  const int32_t* row_end = order.row_end.data();
  const uint32_t* codes = order.codes.data();
  const int64_t rows = static_cast<int64_t>(order.row_end.size());
  int64_t ahead_row = order.row_of(lo), prefetched = -1;
  for (int64_t r = order.row_of(lo), pos = lo; pos < hi; ++r) {
    const int64_t end = std::min<int64_t>(row_end[r], hi);
    if (pos >= end) continue;  // no pair draws this row
    const bank_t* bank_row = bank + r * d;
    const acc_t* row = nullptr;
    int64_t converted_in_block = -1;
    while (pos < end) {
      if (pos + kPairPrefetchDistance < hi) {
        while (row_end[ahead_row] <= pos + kPairPrefetchDistance && ahead_row + 1 < rows) ++ahead_row;
        if (ahead_row != prefetched) {
          prefetch_row<RowReuse::kOnce>(bank + ahead_row * d, row_bytes);
          prefetched = ahead_row;
        }
      }
      if constexpr (kConvert) {
        if (converted_in_block < 0) {  // first pair of this row in this block
          acc_t* dst = converted.data() + block.count * d;
#pragma omp simd
          for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<acc_t>(bank_row[j]);
          row = dst;
          converted_in_block = 1;
        }
      } else {
        row = bank_row;
      }
      // Up to kRowPairs pairs of this row scored together (the row's vectors loaded once).
      const int64_t take = std::min<int64_t>({kRowPairs, end - pos, kPairBlock - block.count});
      const acc_t* x_of[kRowPairs];
      for (int64_t t = 0; t < take; ++t) {
        const uint32_t code = codes[pos + t];
        const int64_t b = PairCode::sample(code), i = block.count + t;
        block.slot[i] = slot_base + b;
        block.positive[i] = PairCode::positive(code);
        block.row[i] = row;
        x_of[t] = xa + b * d;
      }
      V* out = lanes + block.count;
      with_row_pairs(take, [&](auto k) NPID_ALWAYS_INLINE_LAMBDA {
        dot_rows_lanes<decltype(k)::value>(row, x_of, d, out);
      });
      block.count += take;
      pos += take;
      if (block.count == kPairBlock) {
        finish();
        converted_in_block = -1;  // the next block converts the row again
      }
    }
  }
  if (block.count > 0) finish();
}

#define NPID_DEFINE_PAIRS_VARIANT(NAME, TARGET)                                              \
  template <typename acc_t, typename bank_t, typename Epilogue>                             \
  TARGET void NAME(const RowOrder& order, int64_t lo, int64_t hi, int64_t slot_base,        \
                   const acc_t* xa, const bank_t* bank, int64_t d, acc_t inv_t,             \
                   Epilogue& epilogue, acc_t* accumulator) {                                \
    score_sorted_pairs<acc_t, bank_t>(order, lo, hi, slot_base, xa, bank, d, inv_t, epilogue, \
                                      accumulator);                                          \
  }
NPID_DEFINE_PAIRS_VARIANT(score_sorted_pairs_avx512, NPID_TARGET_AVX512)
NPID_DEFINE_PAIRS_VARIANT(score_sorted_pairs_avx2, NPID_TARGET_AVX2)
NPID_DEFINE_PAIRS_VARIANT(score_sorted_pairs_baseline, )
#undef NPID_DEFINE_PAIRS_VARIANT

// Runs the chunks of the sorted pairs in parallel, chunk c's pairs into the slots
// c * chunk_slot_stride(B) + b of `accumulator` (chunks * chunk_slot_stride(B) x d). The chunks
// are fixed by the problem's size, so their sums do not depend on the thread count; each thread
// scores a contiguous run of them (rows far apart from the other thread's). Threads that took
// the next unclaimed chunk as they finished scored neighbouring chunks at the same time, and on
// the 2-core dev VM each chunk then took 0.61-0.65 ms in about half of the processes against
// 0.44-0.50 ms with contiguous runs (NCE forward at the shape: 7.0 against 5.8 ms in
// those processes, 5.2 against 5.0 in the others; the cause was not pinned down).
template <typename acc_t, typename bank_t, typename Epilogue>
void score_sorted_pairs_in_chunks(const RowOrder& order, int64_t chunks, int64_t B,
                                  const acc_t* xa, const bank_t* bank, int64_t d,
                                  double temperature, Epilogue epilogue, acc_t* accumulator) {
  const CpuIsa isa = cpu_isa();
  const int64_t total = order.size();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  // Computed here: inside the parallel region get_num_threads() is the nested level's.
  const int64_t tasks = std::min<int64_t>(chunks, at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    // Each thread's own copy, on its own stack: the epilogue is called for every block, and
    // reading its captures from the calling thread's stack shares cache lines with whatever
    // that thread writes there.
    Epilogue thread_epilogue = epilogue;
    for (int64_t c = chunks * task_begin / tasks; c < chunks * task_end / tasks; ++c) {
      const int64_t lo = total * c / chunks, hi = total * (c + 1) / chunks;
      const int64_t base = c * chunk_slot_stride(B);
      switch (isa) {
        case CpuIsa::kAvx512:
          score_sorted_pairs_avx512<acc_t, bank_t>(order, lo, hi, base, xa, bank, d, inv_t,
                                                   thread_epilogue, accumulator);
          break;
        case CpuIsa::kAvx2:
          score_sorted_pairs_avx2<acc_t, bank_t>(order, lo, hi, base, xa, bank, d, inv_t,
                                                 thread_epilogue, accumulator);
          break;
        default:
          score_sorted_pairs_baseline<acc_t, bank_t>(order, lo, hi, base, xa, bank, d, inv_t,
                                                     thread_epilogue, accumulator);
      }
    }
  });
}

}  // namespace cpu
}  // namespace npid
