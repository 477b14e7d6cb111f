// How the fused CPU passes visit their gathered (sample, row) pairs: in sample order
// (scan_rows: each sample's rows in column order, the rows prefetched ahead) or by tiles of bank
// rows (tile order, below), and the plan that picks one (plan_pairs) for score_pairs, which hands
// the scored pairs to a loss epilogue (loss_epilogues.h).
//
// Tile order.
// In sample order each of the B * (K+1) (sample, row) pairs reads its bank row from a random
// address: at B = 64, K = 4096, n = 50,000 that is 134 MB of cache misses per step for a
// 25.6 MB bank, every row fetched ~5 times, and the step is bound by memory latency. Tile order
// cuts the bank into tiles of consecutive rows small enough for L2 (~64 KB) and visits them in
// address order, each tile's rows fetched from memory once (prefetched while the tile before is
// scored). Within a tile the pairs go sample by sample: a sample's ~10 pairs in the tile are
// scored against its features and added into its gradient with that gradient held in vector
// registers, so the accumulator is loaded and stored once per run instead of once per pair.
// (Sorting all pairs by row instead reads each row once for its ~5 samples, but every pair then
// pays an axpy into its own sample's accumulator, 16 stores, most of a pair's time.) Per-sample
// sums (loss, grad_x) are
// accumulated per chunk of tiles and added up chunk by chunk in a fixed order, so the result
// does not depend on the thread count.
//
// Worth it when rows repeat: B * (K+1) at least n (see use_tile_order()).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "cpu_common.h"
#include "npid/dispatch.h"
#include "npid/sampled_row_ops.h"

namespace npid {
namespace cpu {

// Rows are visited in random order; fetch this many rows ahead, enough to cover a row's memory
// latency at the scan's pace (fewer rows ahead leave it waiting; experiments/cpu-step/README.md).
constexpr int64_t kPrefetchDistance = 10;

// The fused passes' view of their inputs: the rows of each sample from its RowSource.
struct FusedArgs {
  at::Tensor x, bank;
  RowSource rows;
  int64_t columns;
};

inline FusedArgs fused_args(const FusedInputs& f) {
  return {f.x, f.bank, row_source(f), f.columns};
}

// Scores every gathered row of samples [lo, hi): `visit(b, k, row_ptr, s)` with
// s = row . x_b / T, between begin_sample(b) and end_sample(b). Out-of-range rows are
// recorded in `bad` and skipped. A sample's rows are resolved first (Philox or idx) so
// the loop can prefetch the row kPrefetchDistance ahead: the rows are random, so the
// hardware prefetcher cannot guess them and each one would otherwise stall on the cache.
template <typename scalar_t, typename bank_t, typename Begin, typename Visit, typename End>
NPID_ALWAYS_INLINE void scan_range(const FusedArgs& a, double temperature, BadIndexFlag& bad,
                                   int64_t lo, int64_t hi, Begin& begin_sample, Visit& visit,
                                   End& end_sample) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t d = a.x.size(1), n = a.bank.size(0), columns = a.columns;
  const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
  const bank_t* bp = a.bank.const_data_ptr<bank_t>();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(bank_t));
  AlignedVector<acc_t> xb(d);
  ScratchVector<int64_t> rows(columns);
  for (int64_t b = lo; b < hi; ++b) {
    for (int64_t j = 0; j < d; ++j) xb[j] = static_cast<acc_t>(xp[b * d + j]);
    a.rows.fill(b, rows.data());
    for (int64_t k = 0; k < columns; ++k) {
      const int64_t r = rows[k];
      if (r < 0 || r >= n) {
        bad.record(r);
        rows[k] = -1;
      }
    }
    begin_sample(b);
    for (int64_t k = 0; k < columns; ++k) {
      if (k + kPrefetchDistance < columns && rows[k + kPrefetchDistance] >= 0)
        prefetch_row(bp + rows[k + kPrefetchDistance] * d, row_bytes);
      if (rows[k] < 0) continue;
      const bank_t* row = bp + rows[k] * d;
      visit(b, k, row, dot_row(row, xb.data(), d) * inv_t);
    }
    end_sample(b);
  }
}

template <typename scalar_t, typename bank_t, typename Begin, typename Visit, typename End>
inline void scan_rows(const FusedArgs& a, double temperature, BadIndexFlag& bad, Begin begin_sample,
               Visit visit, End end_sample) {
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, a.x.size(0), kSampleGrain, [&](int64_t lo, int64_t hi) {
    run_for_isa(isa, [&](auto) NPID_ALWAYS_INLINE_LAMBDA {
      scan_range<scalar_t, bank_t>(a, temperature, bad, lo, hi, begin_sample, visit, end_sample);
    });
  });
}


// One (sample, row) pair in tile order: the sample is implied by where the code sits
// (TileOrder's per-sample regions), the code holds the row and whether the pair is the
// sample's positive (column 0).
struct TileCode {
  static uint32_t make(int64_t row, bool positive) {
    return static_cast<uint32_t>(row) | (static_cast<uint32_t>(positive) << 31);
  }
  static int64_t row(uint32_t code) { return static_cast<int64_t>(code & 0x7fffffffu); }
  static bool positive(uint32_t code) { return (code >> 31) != 0; }
};

// The order the fused losses visit their pairs in: kAuto picks by problem size
// (use_tile_order()); kSample / kTile force one (the private op npid::_set_cpu_pair_order, for
// the tests, which check both orders, and for timing one against the other). cpu_switches.cpp.
enum class PairOrder { kAuto = 0, kSample = 1, kTile = 2 };
PairOrder forced_pair_order();

// Tile order when there are at least as many pairs as bank rows: below about one pair per row a
// tile's rows are mostly read for one pair each, and the sort costs more than the reads it
// orders save (experiments/cpu-step/README.md has the sample-vs-tile timings across bank sizes).
// Codes and positions are 32-bit, so tile order needs fewer than 2^31 rows and pairs.
inline bool use_tile_order(int64_t B, int64_t columns, int64_t n) {
  const PairOrder forced = forced_pair_order();
  if (forced == PairOrder::kSample) return false;
  const int64_t pairs = B * columns;
  const bool fits = pairs < (int64_t(1) << 31) && n < (int64_t(1) << 31);
  if (forced == PairOrder::kTile) return fits;
  return fits && pairs >= 4096 && pairs >= n;
}

// log2 of the rows per tile: the most rows that fit in 64 KB, a power of two (a tile is a
// shift of the row). The tile being scored and the next one, being prefetched, must stay in L2
// beside the features and accumulators: larger tiles score slower per pair, smaller ones no
// faster (experiments/cpu-step/README.md).
inline int64_t tile_shift_for(int64_t row_bytes) {
  int64_t shift = 0;
  while ((row_bytes << (shift + 1)) <= (int64_t(64) << 10)) ++shift;
  return shift;
}

// Sample b's in-range pairs sit in codes[b * columns ...), grouped by tile in increasing order
// and in column order within a tile: tile t's run is
// codes[b * columns + run_start(b, t) .. b * columns + run_start(b, t + 1)).
// Rows outside [0, n) are recorded in `bad` and left out.
struct TileOrder {
  int64_t columns = 0, tiles = 0, tile_shift = 0, pairs = 0;
  ScratchVector<uint32_t> codes;
  ScratchVector<int32_t> run_starts;  // B x (tiles + 1)
  int64_t run_start(int64_t b, int64_t t) const { return run_starts[b * (tiles + 1) + t]; }
};

// A stable counting sort of each sample's pairs by tile, within the sample's own region: the
// samples are independent, so the threads split them with nothing shared, and the counters
// (one per tile, 1.6 KB at n = 50k) stay in L1. In-kernel rows are drawn (Philox) one sample
// at a time right before its sort, while they are in L1. (One global counting sort of all pairs
// would need n counters and a scan, and its placing pass does not split over threads.)
inline TileOrder sort_pairs_by_tile(const RowSource& src, int64_t B, int64_t n,
                                    int64_t tile_shift, BadIndexFlag& bad) {
  TileOrder order;
  const int64_t columns = src.columns;
  order.columns = columns;
  order.tile_shift = tile_shift;
  order.tiles = ((n - 1) >> tile_shift) + 1;
  const int64_t tiles = order.tiles;
  order.codes.resize(B * columns);
  order.run_starts.resize(B * (tiles + 1));
  ScratchVector<int64_t> kept(B, 0);
  at::parallel_for(0, B, kSampleGrain, [&](int64_t b0, int64_t b1) {
    ScratchVector<int64_t> sample_rows(src.idx == nullptr ? columns : 0);
    // The sample's rows as int32 (-1: out of range), written by the counting pass and read by
    // the placing pass from L1 instead of the caller's int64 idx a second time.
    ScratchVector<int32_t> rows32(columns);
    ScratchVector<int32_t> cursor(tiles + 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t* rows = src.idx + b * columns;
      if (src.idx == nullptr) {
        src.fill(b, sample_rows.data());
        rows = sample_rows.data();
      }
      std::fill(cursor.begin(), cursor.end(), 0);
      for (int64_t k = 0; k < columns; ++k) {
        const int64_t r = rows[k];
        const bool in_range = r >= 0 && r < n;
        if (in_range) ++cursor[(r >> tile_shift) + 1];
        else bad.record(r);
        rows32[k] = in_range ? static_cast<int32_t>(r) : -1;
      }
      int32_t* start = order.run_starts.data() + b * (tiles + 1);
      start[0] = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        start[t + 1] = start[t] + cursor[t + 1];
        cursor[t] = start[t];
      }
      kept[b] = start[tiles];
      uint32_t* codes = order.codes.data() + b * columns;
      for (int64_t k = 0; k < columns; ++k) {
        const int32_t r = rows32[k];
        if (r >= 0) codes[cursor[r >> tile_shift]++] = TileCode::make(r, k == 0);
      }
    }
  });
  for (int64_t b = 0; b < B; ++b) order.pairs += kept[b];
  return order;
}

// How many chunks the tiles are cut into: enough for the threads to share (contiguous runs of
// chunks, see score_tiles_in_chunks), few enough that the per-chunk B x d accumulators stay
// small. Depends only on the problem's size.
inline int64_t tile_order_chunks(int64_t pairs, int64_t tiles, int64_t B, int64_t d) {
  const int64_t by_work = pairs / 16384;
  const int64_t by_memory = (int64_t(64) << 20) / std::max<int64_t>(1, B * d * 8);
  return std::max<int64_t>(1, std::min<int64_t>({16, by_work, by_memory, tiles}));
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
// (exp over the whole block in vector lanes), then the rows are added in with their
// coefficients. Tile order fills a block with pairs of one slot; sample order hands one pair.
constexpr int64_t kPairBlock = 32;

template <typename acc_t, typename row_t = acc_t>
struct PairBlock {
  int64_t count = 0;
  int64_t slot[kPairBlock];
  bool positive[kPairBlock];
  // The scores; the epilogue overwrites them with the rows' coefficients. Zeros from count up to
  // the next whole vector of acc_t lanes (exp_whole_vectors reads whole vectors).
  acc_t s[kPairBlock];
  const row_t* row[kPairBlock];
};

// How many rows are scored together against one sample's features (dot_products_lanes).
constexpr int64_t kRowsTogether = 4;

// f(std::integral_constant<int, k>{}) for k = count in [1, kRowsTogether]: the row count as a
// compile-time constant, so the per-row accumulators of dot_products_lanes stay in registers.
template <typename F>
NPID_ALWAYS_INLINE void with_rows_together(int64_t count, F&& f) {
  static_assert(kRowsTogether == 4, "the cases below handle 1 to 4 rows");
  switch (count) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{});
  }
}

// epilogue(block), then accumulator[slot * d] += coefficient * row for each pair of the block,
// one pair at a time (sample order's blocks of one pair; blocks of mixed slots).
template <typename acc_t, typename row_t, typename Epilogue>
NPID_ALWAYS_INLINE void finish_block(PairBlock<acc_t, row_t>& block, Epilogue& epilogue,
                                     acc_t* accumulator, int64_t d) {
  epilogue(block);
  for (int64_t i = 0; i < block.count; ++i)
    axpy_row(block.s[i], block.row[i], accumulator + block.slot[i] * d, d);
  block.count = 0;
}

// Scores the tiles [t0, t1) of one chunk (slot = slot_base + b) and adds their rows into the
// slots' accumulators. `xa` is x in the accumulation dtype, B x d. Each sample's run of pairs
// in a tile is cut into blocks of up to kPairBlock: the block's rows scored kRowsTogether at a
// time against x_b (x_b's vectors loaded once for four rows), each dot product kept as vector
// lanes until the block's are summed together (lane_sums), the epilogue, then the rows added
// into the slot's accumulator held in registers. While a tile is scored the next one is
// prefetched into L2, a share of its lines before each sample's run: a tile's rows are read in
// random order, once per pair, which the hardware prefetcher does not follow.
// A bank in another dtype than the accumulation (bf16, fp16) has each pair's row converted into
// the block first.
template <typename acc_t, typename bank_t, typename Epilogue>
NPID_ALWAYS_INLINE void score_tiles(const TileOrder& order, int64_t t0, int64_t t1, int64_t B,
                                    int64_t n, int64_t slot_base, const acc_t* xa,
                                    const bank_t* bank, int64_t d, acc_t inv_t,
                                    Epilogue& epilogue, acc_t* accumulator) {
  constexpr bool kConvert = !std::is_same_v<acc_t, bank_t>;
  AlignedVector<acc_t> converted(kConvert ? kPairBlock * d : 0);
  using V = typename VectorOf<acc_t>::type;
  constexpr int64_t L = VectorOf<acc_t>::kLanes;
  static_assert(kPairBlock % L == 0, "whole vectors of lane sums per block");
  const int64_t row_bytes = d * static_cast<int64_t>(sizeof(bank_t));
  const int64_t columns = order.columns, tile_rows = int64_t(1) << order.tile_shift;
  PairBlock<acc_t> block;
  V lanes[kPairBlock];  // each pair's dot product as vector lanes, summed a vector at a time
  for (int64_t t = t0; t < t1; ++t) {
    // The next tile's bytes, prefetched a share before each sample's run.
    const int64_t next_first = std::min(n, (t + 1) * tile_rows);
    const int64_t next_bytes = (std::min(n, (t + 2) * tile_rows) - next_first) * row_bytes;
    const char* next = reinterpret_cast<const char*>(bank + next_first * d);
    const int64_t share = (next_bytes / 64 + B - 1) / B * 64;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t off = b * share; off < std::min(next_bytes, (b + 1) * share); off += 64)
        __builtin_prefetch(next + off, 0, 2);
      const uint32_t* codes = order.codes.data() + b * columns;
      const int64_t hi = order.run_start(b, t + 1);
      const acc_t* xb = xa + b * d;
      const int64_t slot = slot_base + b;
      for (int64_t pos = order.run_start(b, t); pos < hi;) {
        const int64_t count = std::min(kPairBlock, hi - pos);
        for (int64_t i = 0; i < count; ++i) {
          const uint32_t code = codes[pos + i];
          const bank_t* bank_row = bank + TileCode::row(code) * d;
          if constexpr (kConvert) {
            acc_t* dst = converted.data() + i * d;
#pragma omp simd
            for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<acc_t>(bank_row[j]);
            block.row[i] = dst;
          } else {
            block.row[i] = bank_row;
          }
          block.slot[i] = slot;
          block.positive[i] = TileCode::positive(code);
        }
        for (int64_t i = 0; i < count; i += kRowsTogether) {
          with_rows_together(std::min(kRowsTogether, count - i), [&](auto k) NPID_ALWAYS_INLINE_LAMBDA {
            dot_products_lanes<decltype(k)::value>(xb, block.row + i, d, lanes + i);
          });
        }
        for (int64_t i = count; i % L != 0; ++i) lanes[i] = V{};
        // Whole vectors: the epilogue's exp loads them back as vectors, and a vector load of
        // eight scalar stores waits for them to leave the store buffer.
        for (int64_t i = 0; i < count; i += L)
          store_vector(block.s + i, lane_sums<acc_t>(lanes + i) * inv_t);
        block.count = count;
        epilogue(block);
        add_rows_in_registers(block.s, block.row, count, accumulator + slot * d, d);
        pos += count;
      }
    }
  }
}

// Runs the chunks of tiles in parallel, chunk c's pairs into the slots
// c * chunk_slot_stride(B) + b of `accumulator` (chunks * chunk_slot_stride(B) x d). The chunks
// are fixed by the problem's size, so their sums do not depend on the thread count; each thread
// scores a contiguous run of them (tiles far apart from the other thread's), not the next
// unclaimed chunk: two threads scoring neighbouring chunks at the same time slow each other down,
// by about a third per chunk in about half of the processes (experiments/cpu-step/README.md).
template <typename acc_t, typename bank_t, typename Epilogue>
void score_tiles_in_chunks(const TileOrder& order, int64_t chunks, int64_t B, int64_t n,
                           const acc_t* xa, const bank_t* bank, int64_t d, double temperature,
                           Epilogue epilogue, acc_t* accumulator) {
  const CpuIsa isa = cpu_isa();
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const int64_t tiles = order.tiles;
  // Computed here: inside the parallel region get_num_threads() is the nested level's.
  const int64_t tasks = std::min<int64_t>(chunks, at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t task_begin, int64_t task_end) {
    // Each thread's own copy, on its own stack: the epilogue is called for every block, and
    // reading its captures from the calling thread's stack shares cache lines with whatever
    // that thread writes there.
    Epilogue thread_epilogue = epilogue;
    for (int64_t c = chunks * task_begin / tasks; c < chunks * task_end / tasks; ++c) {
      const int64_t t0 = tiles * c / chunks, t1 = tiles * (c + 1) / chunks;
      const int64_t base = c * chunk_slot_stride(B);
      run_for_isa(isa, [&](auto) NPID_ALWAYS_INLINE_LAMBDA {
        score_tiles<acc_t, bank_t>(order, t0, t1, B, n, base, xa, bank, d, inv_t,
                                   thread_epilogue, accumulator);
      });
    }
  });
}

// How the fused losses visit their gathered pairs: in sample order (scan_rows), or by tiles of
// bank rows (above) when use_tile_order() picks it. Accumulators are indexed by slot =
// chunk * slot_stride + b; sample order has one chunk.
struct PairPlan {
  bool by_tile = false;
  TileOrder order;
  int64_t chunks = 1;
  int64_t slot_stride = 0;  // chunk_slot_stride(B)
  int64_t slots() const { return chunks * slot_stride; }
};

inline PairPlan plan_pairs(const FusedArgs& a, BadIndexFlag& bad) {
  const int64_t B = a.x.size(0), d = a.x.size(1), n = a.bank.size(0);
  PairPlan plan;
  plan.slot_stride = chunk_slot_stride(B);
  plan.by_tile = use_tile_order(B, a.columns, n);
  if (plan.by_tile) {
    const int64_t row_bytes = d * static_cast<int64_t>(a.bank.element_size());
    plan.order = sort_pairs_by_tile(a.rows, B, n, tile_shift_for(row_bytes), bad);
    plan.chunks = tile_order_chunks(plan.order.pairs, plan.order.tiles, B, d);
  }
  return plan;
}

// Scores every in-range pair of the plan and hands them to the loss in PairBlocks:
// epilogue(block) turns block.s[i] (the score of pair i, in slot block.slot[i]) into the
// coefficient with which its row block.row[i] is added to accumulator[slot * d .. + d). Tile
// order hands blocks of up to kPairBlock pairs of one slot, rows in the accumulation dtype; sample order one
// pair at a time, rows in the bank's dtype (epilogues take `auto& block`). Both orders give the
// same sums up to rounding.
template <typename scalar_t, typename bank_t, typename Epilogue>
void score_pairs(const FusedArgs& a, const PairPlan& plan, double temperature, BadIndexFlag& bad,
                 Epilogue epilogue, acc_type_t<scalar_t>* accumulator) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t B = a.x.size(0), d = a.x.size(1);
  if (!plan.by_tile) {
    scan_rows<scalar_t, bank_t>(
        a, temperature, bad, [](int64_t) {},
        [&](int64_t b, int64_t k, const bank_t* row, acc_t s) NPID_ALWAYS_INLINE_LAMBDA {
          PairBlock<acc_t, bank_t> pair;
          std::fill(pair.s, pair.s + VectorOf<acc_t>::kLanes, acc_t(0));  // the exp's whole vector
          pair.count = 1;
          pair.slot[0] = b;
          pair.positive[0] = k == 0;
          pair.s[0] = s;
          pair.row[0] = row;
          finish_block(pair, epilogue, accumulator, d);
        },
        [](int64_t) {});
    return;
  }
  const at::Tensor xa = a.x.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  score_tiles_in_chunks<acc_t, bank_t>(plan.order, plan.chunks, B, a.bank.size(0),
                                       xa.const_data_ptr<acc_t>(),
                                       a.bank.const_data_ptr<bank_t>(), d, temperature, epilogue,
                                       accumulator);
}

}  // namespace cpu
}  // namespace npid
