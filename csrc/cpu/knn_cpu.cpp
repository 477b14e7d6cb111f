// The CPU kNN top-k (knn_topk): the similarities of query panels to bank rows formed in vector
// registers and compared there against each query's running k-th best, so that only the few
// rows that can still enter a top-k ever leave the registers. No similarity matrix is stored,
// not even a tile of one: the products run at the FMA units' rate and the selection costs one
// compare per vector of similarities. experiments/knn-faiss/NOTES.md has the measurements
// behind the layout (a GEMM per chunk followed by a scan spent about as long writing and
// re-reading the similarities, and in its own parallel regions, as multiplying).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_common.h"
#include "npid/bank_scan.h"
#include "npid/checks.h"
#include "scratch.h"

namespace npid {
namespace cpu {
namespace {

// A neighbour candidate (similarity, bank row) and the order of the result: larger similarity
// first, NaN before everything (as torch.topk ranks it), ties by the smaller row.
template <typename acc_t>
using Neighbour = std::pair<acc_t, int64_t>;

template <typename acc_t>
NPID_ALWAYS_INLINE bool ranks_before(const Neighbour<acc_t>& a, const Neighbour<acc_t>& b) {
  if (a.first > b.first) return true;
  if (a.first < b.first) return false;
  if (a.first == b.first) return a.second < b.second;
  const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);  // unordered: a NaN
  if (a_nan != b_nan) return a_nan;
  return a.second < b.second;
}

// A lambda, not the function's address, so that nth_element and sort inline the compare
// instead of calling it through a pointer.
template <typename acc_t>
constexpr auto kRanksBefore = [](const Neighbour<acc_t>& a, const Neighbour<acc_t>& b) {
  return ranks_before(a, b);
};

// Keeps the first k entries of buf[0, count) in result order, the others dropped.
template <typename acc_t>
void keep_best(Neighbour<acc_t>* buf, int64_t& count, int64_t k) {
  if (count > k) {
    std::nth_element(buf, buf + (k - 1), buf + count, kRanksBefore<acc_t>);
    count = k;
  }
}

// Queries per work item (a run of panels sharing every bank block it loads into L2): enough to
// reuse each block many times, few enough that two threads get many items to balance.
constexpr int64_t kItemQueries = 128;
// Bank rows per block: 256 KiB of fp32 rows at d = 128, a quarter of a core's L2, so the block
// stays there while every panel of the item passes over it.
constexpr int64_t kBlockBytes = 256 << 10;
// Work items per thread to aim for; a small Q splits the bank into slices until there are
// this many (the threads pull items one at a time, so a core slowed by other work takes fewer).
constexpr int64_t kItemsPerThread = 8;
// A slice holds at least this many times k rows: its top-k is then a small part of it, and the
// merge of the slices' top-k lists stays cheap next to the scan.
constexpr int64_t kSliceRowsPerK = 4;
constexpr int64_t kMinSliceRows = 4096;

// The k-th largest (k >= 1) of values[0, n), none of them NaN; values and spare (room for n)
// are overwritten. A quickselect whose partition writes every element to both ends of the
// other buffer and advances one end: no branch on the data, where std::nth_element's
// partition mispredicts about once per element on similarities (~15 cycles each).
template <typename acc_t>
acc_t kth_largest(acc_t* values, acc_t* spare, int64_t n, int64_t k) {
  acc_t* a = values;
  acc_t* b = spare;
  int64_t want = k - 1;  // rank within a[0, n), 0 = largest
  while (n > 32) {
    acc_t x = a[0], y = a[n / 2], z = a[n - 1];  // median of three as the pivot
    if (x > y) std::swap(x, y);
    if (y > z) std::swap(y, z);
    if (x > y) std::swap(x, y);
    const acc_t pivot = y;
    int64_t left = 0, right = n;  // b[0, left): above the pivot; b[right, n): the rest
    for (int64_t i = 0; i < n; ++i) {
      const acc_t v = a[i];
      const bool above = v > pivot;
      b[left] = v;
      b[right - 1] = v;
      left += above;
      right -= !above;
    }
    if (want < left) {
      n = left;
    } else {
      // The rest holds the pivot itself: it shrinks by one at least (n - left < n).
      b += left;
      n -= left;
      want -= left;
      if (left == 0) {  // all <= pivot: split off the elements equal to it
        int64_t lo = 0, hi = n;
        for (int64_t i = 0; i < n; ++i) {
          const acc_t v = b[i];
          const bool equal = v == pivot;
          a[lo] = v;
          a[hi - 1] = v;
          lo += equal;
          hi -= !equal;
        }
        if (want < lo) return pivot;
        std::swap(a, b);
        b += lo;
        n -= lo;
        want -= lo;
      }
    }
    std::swap(a, b);
  }
  std::sort(a, a + n, std::greater<acc_t>());
  return a[want];
}

// The running top-k lists of one work item's queries (lane j of the item = its query j). Each
// list holds up to `cap` = 2k candidates in the order of their rows; `threshold` is NaN while a
// list fills (every similarity enters) and then the k-th best similarity so far: a later row
// enters only above it (or NaN), so an equal one, whose row is larger, is rightly dropped. A
// full list is cut back to its k best and the threshold raised. Lanes past the item's queries
// (panel padding) have threshold +inf and are never offered.
template <typename acc_t>
struct TopkLists {
  int64_t k = 0, cap = 0;
  ScratchVector<Neighbour<acc_t>> buffers;
  ScratchVector<int64_t> counts;
  AlignedVector<acc_t> thresholds;
  ScratchVector<acc_t> values, spare;  // compact()'s copy of a list's similarities, and room

  void reset(int64_t lanes, int64_t queries, int64_t k_, int64_t cap_) {
    k = k_;
    cap = cap_;
    buffers.resize(static_cast<size_t>(queries * cap));
    counts.assign(static_cast<size_t>(queries), 0);
    values.resize(static_cast<size_t>(cap));
    spare.resize(static_cast<size_t>(cap));
    thresholds.assign(static_cast<size_t>(lanes), std::numeric_limits<acc_t>::infinity());
    std::fill(thresholds.begin(), thresholds.begin() + queries, std::numeric_limits<acc_t>::quiet_NaN());
  }

  // Inlined into the kernels (a few offers per tile on average at k = 200, n = 50,000); the
  // rare compaction is a call.
  NPID_ALWAYS_INLINE void offer(int64_t q, acc_t v, int64_t row) {
    if (v <= thresholds[q]) return;
    Neighbour<acc_t>* buf = buffers.data() + q * cap;
    int64_t& count = counts[q];
    buf[count++] = {v, row};
    if (count == cap) thresholds[q] = compact(buf, count);
  }

  // Cuts the full list buf[0, count) to its k best, still in row order, and returns the k-th
  // best similarity. The k-th value comes from a branch-free select over the bare similarities
  // (nth_element over the pairs, with their NaN-aware compare and a mispredict per element,
  // took a fifth of the kNN's time: NOTES.md); the list then keeps what is above it and, of the
  // rows equal to it, the first ones, i.e. the smaller rows.
  __attribute__((noinline)) acc_t compact(Neighbour<acc_t>* buf, int64_t& count) {
    bool any_nan = false;
    for (int64_t i = 0; i < count; ++i) {
      values[i] = buf[i].first;
      any_nan |= std::isnan(values[i]);
    }
    if (any_nan) {  // NaN ranks first: the full compare, then back to row order
      keep_best(buf, count, k);
      const acc_t kth = buf[k - 1].first;
      std::sort(buf, buf + count, [](const Neighbour<acc_t>& a, const Neighbour<acc_t>& b) { return a.second < b.second; });
      return kth;
    }
    int64_t above = 0;
    const acc_t kth = kth_largest(values.data(), spare.data(), count, k);
    for (int64_t i = 0; i < count; ++i) above += buf[i].first > kth;
    // Without branches: which entries stay is as random as the data (a mispredict each).
    int64_t ties_left = k - above, kept = 0;
    for (int64_t i = 0; i < count; ++i) {
      const acc_t v = buf[i].first;
      const bool tie = v == kth && ties_left > 0;
      ties_left -= tie;
      buf[kept] = buf[i];
      kept += (v > kth) | tie;
    }
    count = kept;
    return kth;
  }

  // The list of query q cut to its best min(k, count), sorted; returns that count.
  int64_t finish(int64_t q) {
    Neighbour<acc_t>* buf = buffers.data() + q * cap;
    int64_t count = counts[q];
    keep_best(buf, count, k);
    std::sort(buf, buf + count, kRanksBefore<acc_t>);
    return count;
  }
  const Neighbour<acc_t>* list(int64_t q) const { return buffers.data() + q * cap; }
};

// Queries packed for the kernel: panels of `width` queries, each stored d-major (element j of
// the panel's queries at [j * width, (j + 1) * width)), so one vector load gives one feature of
// `width` / vecs queries; lanes past Q are zeros. A few queries alone (Q <= kDotQueries) form
// one kDotPanel instead: the queries as rows, for dot products along the features.
constexpr int kDotPanel = 3;
constexpr int64_t kDotQueries = 6;
struct Panel {
  int64_t lane0;   // first lane within its work item
  int64_t query0;  // first query
  int kind;        // index into the ISA's panel shapes (0 widest), or kDotPanel
  int64_t width;   // lanes
  int64_t offset;  // where its d x width values start in the packed buffer
};

// Bit l set where lane l of the compare result m is true (all ones), for 16- and 32-byte
// vectors of 4- or 8-byte lanes: one movmsk instruction on x86.
template <int kVecBytes, typename M>
NPID_ALWAYS_INLINE uint32_t sign_bits(const M& m) {
  static_assert(kVecBytes == 16 || kVecBytes == 32, "sign_bits: 16- or 32-byte vectors");
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  if constexpr (sizeof(m[0]) == 4) {
    using F = typename VectorOf<float, kVecBytes>::type;
    if constexpr (kVecBytes == 32) return __builtin_ia32_movmskps256(reinterpret_cast<const F&>(m));
    else return __builtin_ia32_movmskps(reinterpret_cast<const F&>(m));
  } else {
    using F = typename VectorOf<double, kVecBytes>::type;
    if constexpr (kVecBytes == 32) return __builtin_ia32_movmskpd256(reinterpret_cast<const F&>(m));
    else return __builtin_ia32_movmskpd(reinterpret_cast<const F&>(m));
  }
#else
  uint32_t bits = 0;
  for (size_t l = 0; l < kVecBytes / sizeof(m[0]); ++l) bits |= uint32_t(m[l] != 0) << l;
  return bits;
#endif
}

// Both kernels read a tile's rows a feature at a time, or a short stretch of each, which the
// hardware prefetchers do not follow well: with few queries (little work per row) the panel
// kernel waited on memory at ~5 GB/s. Where nothing fetched a block earlier, the first panel's
// pass over it requests the rows this many tiles ahead; the later panels find it in L2.
constexpr int64_t kPrefetchTiles = 4;

// With many panels per item, the first pass over each block still waited on memory (a 256 KiB
// block from DRAM in the time of one panel's products; ~6% of the kernel at Q = 1,000, NOTES.md).
// So every panel pass over a block also requests its share of the item's next block into the
// cache, a few lines per tile, and that block's first pass then reads it from L2.
struct Lookahead {
  const char* begin = nullptr;
  int64_t lines = 0, lines_per_tile = 0;
};
constexpr int64_t kLookaheadMinPanels = 4;

// The kernel: kRows bank rows x (kVecs vectors of queries) per tile, all in registers. For each
// feature j, one load per query vector and one broadcast per row feed kRows * kVecs FMAs; the
// tile's similarities are then compared with the panel's thresholds (a NaN threshold, or a NaN
// similarity, passes: the negated <=); only a tile with a passing lane is looked at, and in it
// only the passing lanes. Rows past r_end (a block's ragged end) repeat the last row and are
// skipped there.
template <typename acc_t, int kVecBytes, int kVecs, int kRows>
NPID_ALWAYS_INLINE void scan_panel(const acc_t* __restrict__ panel, int64_t d,
                                   const acc_t* __restrict__ rows, int64_t row_stride, int64_t r_begin,
                                   int64_t r_end, int64_t first_row_index, TopkLists<acc_t>& lists,
                                   int64_t lane0, int64_t valid_lanes, bool prefetch_rows,
                                   Lookahead ahead) {
  using V = typename VectorOf<acc_t, kVecBytes>::type;
  using M = typename VectorOf<std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>, kVecBytes>::type;
  constexpr int64_t L = kVecBytes / sizeof(acc_t);
  constexpr int64_t W = L * kVecs;
  V thr[kVecs];
  for (int v = 0; v < kVecs; ++v) thr[v] = load_vector<V>(lists.thresholds.data() + lane0 + v * L);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRows) {
    const acc_t* rp[kRows];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) rp[i] = rows + std::min<int64_t>(r0 + i, r_end - 1) * row_stride;
    if (prefetch_rows)
      for (int64_t r = r0 + kPrefetchTiles * kRows, stop = std::min(r + kRows, r_end); r < stop; ++r)
        prefetch_row(rows + r * row_stride, d * static_cast<int64_t>(sizeof(acc_t)));
    for (int64_t l = 0, n = std::min(ahead.lines_per_tile, ahead.lines); l < n; ++l)
      __builtin_prefetch(ahead.begin + 64 * l, 0, 2);
    ahead.begin += 64 * ahead.lines_per_tile;
    ahead.lines -= ahead.lines_per_tile;
    V acc[kRows][kVecs];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) acc[i][v] = V{};
    const acc_t* p = panel;
    for (int64_t j = 0; j < d; ++j, p += W) {
      V q[kVecs];
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) q[v] = load_vector<V>(p + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        const acc_t b = rp[i][j];
#pragma GCC unroll 4
        for (int v = 0; v < kVecs; ++v) acc[i][v] += q[v] * b;
      }
    }
    M pass = M{};
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) pass |= ~(acc[i][v] <= thr[v]);
    if (sign_bits<kVecBytes>(pass) == 0) continue;
    // Some similarity beats its query's k-th best (after the first rows, a few per tile at
    // most): offer just those, row by row so that each query sees its rows in order.
    const int64_t rows_here = std::min<int64_t>(kRows, r_end - r0);
    for (int64_t i = 0; i < rows_here; ++i) {
      for (int v = 0; v < kVecs; ++v) {
        const int64_t first = lane0 + v * L;
        const int64_t lanes = std::min<int64_t>(L, valid_lanes - first);
        if (lanes <= 0) break;
        uint32_t bits = sign_bits<kVecBytes>(M(~(acc[i][v] <= thr[v])));
        if (lanes < L) bits &= (uint32_t(1) << lanes) - 1;
        for (; bits != 0; bits &= bits - 1) {
          const int lane = __builtin_ctz(bits);
          lists.offer(first + lane, acc[i][v][lane], first_row_index + r0 + i);
        }
      }
    }
    for (int v = 0; v < kVecs; ++v) thr[v] = load_vector<V>(lists.thresholds.data() + lane0 + v * L);
  }
}

// The kernel for a few queries: rows x query by dot products along the features (one vector
// load per kLanes features of a row, where the panel kernel broadcasts every feature), kLanes
// rows at a time, their sums formed in one vector and compared with the query's threshold.
// With one query the panel kernel computes 4 lanes for 1 and loads each feature alone; at
// n = 1.28M, one thread, it took 120 ms for 1 to 8 queries, this kernel 41 ms for 1 query and
// about 10 ms more per query (NOTES.md), hence up to kDotQueries queries.
template <typename acc_t>
NPID_ALWAYS_INLINE void scan_dot(const acc_t* __restrict__ queries, int64_t nq, int64_t d,
                                 const acc_t* __restrict__ rows, int64_t row_stride, int64_t r_end,
                                 int64_t first_row_index, TopkLists<acc_t>& lists, int64_t lane0) {
  using V = typename VectorOf<acc_t>::type;
  using M = typename VectorOf<std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>, sizeof(V)>::type;
  constexpr int64_t L = VectorOf<acc_t>::kLanes;
  for (int64_t r0 = 0; r0 < r_end; r0 += L) {
    const acc_t* rp[L];
    for (int64_t i = 0; i < L; ++i) rp[i] = rows + std::min<int64_t>(r0 + i, r_end - 1) * row_stride;
    for (int64_t r = r0 + kPrefetchTiles * L, stop = std::min(r + L, r_end); r < stop; ++r)
      prefetch_row(rows + r * row_stride, d * static_cast<int64_t>(sizeof(acc_t)));
    const int64_t rows_here = std::min<int64_t>(L, r_end - r0);
    for (int64_t q = 0; q < nq; ++q) {
      V parts[L];
      dot_products_lanes<L, acc_t>(queries + q * d, rp, d, parts);
      const V sims = lane_sums<acc_t>(parts);
      const M pass = ~(sims <= (V{} + lists.thresholds[lane0 + q]));
      uint32_t bits = 0;
      for (int64_t l = 0; l < rows_here; ++l) bits |= uint32_t(pass[l] != 0) << l;
      for (; bits != 0; bits &= bits - 1) {
        const int lane = __builtin_ctz(bits);
        lists.offer(lane0 + q, sims[lane], first_row_index + r0 + lane);
      }
    }
  }
}

// Panel shapes per ISA: (vector bytes, vectors, rows) for the widest panel and two narrower
// ones for the last queries, so a Q that is not a multiple of the widest panel (Q = 1, 100)
// computes few padding lanes. Register budget: AVX-512 has 32 vector registers (16 + 2 + 1
// for the widest), AVX2 and SSE 16 (12 + 2 + 1). AVX-512 still gets 256-bit vectors: on the
// AMD EPYC (Zen 4) the issue was measured on, the 512-bit kernel ran at 61-71 GFLOP/s per core
// and the 256-bit one at 78-99 (experiments/knn-faiss/NOTES.md); the upper 16 registers that
// the AVX-512 encoding adds are what its wider tile uses.
struct PanelShape {
  int vec_bytes, vecs, rows;
};
constexpr PanelShape kAvx512Shapes[3] = {{32, 2, 8}, {32, 1, 8}, {16, 1, 8}};
constexpr PanelShape kAvx2Shapes[3] = {{32, 2, 6}, {32, 1, 8}, {16, 1, 8}};
constexpr PanelShape kBaselineShapes[3] = {{16, 2, 6}, {16, 1, 8}, {16, 1, 8}};

constexpr const PanelShape* shapes_for(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return kAvx512Shapes;
    case CpuIsa::kAvx2:
      return kAvx2Shapes;
    default:
      return kBaselineShapes;
  }
}

template <typename acc_t>
int64_t panel_width(const PanelShape& s) {
  return s.vecs * s.vec_bytes / static_cast<int64_t>(sizeof(acc_t));
}

// One work item: the panels [p_begin, p_end) against bank rows [r_begin, r_end), block by block.
template <typename acc_t>
struct ItemArgs {
  const Panel* panels;
  int64_t p_begin, p_end;
  const acc_t* packed;
  int64_t d;
  // Rows in the accumulation dtype at the scan's precision: the bank itself when it already is,
  // else each block is converted (scan_operand) from `bank`.
  const acc_t* direct_rows;
  int64_t row_stride;
  const at::Tensor* bank;
  ScanPrecision precision;
  int64_t r_begin, r_end, block_rows;
  TopkLists<acc_t>* lists;
  int64_t valid_lanes;
};

template <typename acc_t, const PanelShape* kShapes>
NPID_ALWAYS_INLINE void scan_item(const ItemArgs<acc_t>& a) {
  constexpr PanelShape s0 = kShapes[0], s1 = kShapes[1], s2 = kShapes[2];
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  bool block_fetched = false;  // by the previous block's passes
  for (int64_t b0 = a.r_begin; b0 < a.r_end; b0 += a.block_rows) {
    const int64_t rows = std::min(a.block_rows, a.r_end - b0);
    at::Tensor converted;
    const acc_t* base;
    int64_t stride;
    if (a.direct_rows != nullptr) {
      base = a.direct_rows + b0 * a.row_stride;
      stride = a.row_stride;
    } else {
      converted = scan_operand(a.bank->narrow(0, b0, rows), acc_type, a.precision).contiguous();
      base = converted.const_data_ptr<acc_t>();
      stride = a.d;
    }
    // The next block, when it is read in place and there are panels enough to share it.
    const int64_t npanels = a.p_end - a.p_begin;
    const int64_t next_rows = std::min(a.block_rows, a.r_end - (b0 + rows));
    const bool look_ahead = a.direct_rows != nullptr && a.row_stride == a.d && npanels >= kLookaheadMinPanels &&
                            next_rows > 0;
    const char* next_block = reinterpret_cast<const char*>(base + rows * stride);
    const int64_t next_lines = (next_rows * a.d * static_cast<int64_t>(sizeof(acc_t)) + 63) / 64;
    const int64_t tiles = (rows + 7) / 8;  // about: every shape here has 6 or 8 rows a tile
    for (int64_t p = a.p_begin; p < a.p_end; ++p) {
      const Panel& panel = a.panels[p];
      const acc_t* data = a.packed + panel.offset;
      const bool first_pass = p == a.p_begin && !block_fetched;
      Lookahead ahead;
      if (look_ahead) {
        const int64_t i = p - a.p_begin, from = next_lines * i / npanels, to = next_lines * (i + 1) / npanels;
        ahead = {next_block + 64 * from, to - from, (to - from + tiles - 1) / tiles};
      }
      switch (panel.kind) {
        case 0:
          scan_panel<acc_t, s0.vec_bytes, s0.vecs, s0.rows>(data, a.d, base, stride, 0, rows, b0, *a.lists,
                                                            panel.lane0, a.valid_lanes, first_pass, ahead);
          break;
        case 1:
          scan_panel<acc_t, s1.vec_bytes, s1.vecs, s1.rows>(data, a.d, base, stride, 0, rows, b0, *a.lists,
                                                            panel.lane0, a.valid_lanes, first_pass, ahead);
          break;
        case 2:
          scan_panel<acc_t, s2.vec_bytes, s2.vecs, s2.rows>(data, a.d, base, stride, 0, rows, b0, *a.lists,
                                                            panel.lane0, a.valid_lanes, first_pass, ahead);
          break;
        default:
          scan_dot<acc_t>(data, panel.width, a.d, base, stride, rows, b0, *a.lists, panel.lane0);
          break;
      }
    }
    block_fetched = look_ahead;
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> register_topk(const at::Tensor& query, const at::Tensor& bank,
                                                 int64_t k, ScanPrecision precision) {
  const int64_t Q = query.size(0), n = bank.size(0), d = query.size(1);
  at::Tensor out_sims = at::empty({Q, k}, query.options());
  at::Tensor out_idx = at::empty({Q, k}, query.options().dtype(at::kLong));
  if (Q == 0) return {out_sims, out_idx};
  acc_t* sims_out = out_sims.data_ptr<acc_t>();
  int64_t* idx_out = out_idx.data_ptr<int64_t>();
  const auto acc_type = query.scalar_type();
  const CpuIsa isa = cpu_isa();
  const PanelShape* shapes = shapes_for(isa);

  // Panels: the widest shape for all but the last few queries, then the narrowest shape that
  // holds the rest. Items: runs of panels of up to kItemQueries queries.
  ScratchVector<Panel> panels;
  ScratchVector<std::pair<int64_t, int64_t>> item_panels;  // [first, last) panel of each item
  int64_t offset = 0;
  {
    const int64_t widths[3] = {panel_width<acc_t>(shapes[0]), panel_width<acc_t>(shapes[1]),
                               panel_width<acc_t>(shapes[2])};
    int64_t item_first = 0, item_lanes = 0;
    for (int64_t q0 = 0; q0 < Q;) {
      const int64_t rest = Q - q0;
      int kind = 0;
      if (rest < widths[0]) kind = rest <= widths[2] ? 2 : (rest <= widths[1] ? 1 : 0);
      const int64_t width = Q <= kDotQueries ? Q : widths[kind];
      if (Q <= kDotQueries) kind = kDotPanel;
      if (item_lanes >= kItemQueries) {
        item_panels.emplace_back(item_first, static_cast<int64_t>(panels.size()));
        item_first = static_cast<int64_t>(panels.size());
        item_lanes = 0;
      }
      panels.push_back({item_lanes, q0, kind, width, offset});
      item_lanes += width;
      offset += width * d;
      q0 += width;
    }
    item_panels.emplace_back(item_first, static_cast<int64_t>(panels.size()));
  }
  const int64_t max_item_lanes = [&] {
    int64_t m = 0;
    for (const auto& ip : item_panels) {
      const Panel& last = panels[ip.second - 1];
      m = std::max(m, last.lane0 + last.width);
    }
    return m;
  }();

  // Pack the queries, rounded to the precision.
  AlignedVector<acc_t> packed(static_cast<size_t>(offset), acc_t(0));
  {
    const at::Tensor qa = scan_operand(query, acc_type, precision).contiguous();
    const acc_t* qp = qa.const_data_ptr<acc_t>();
    at::parallel_for(0, static_cast<int64_t>(panels.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t p = lo; p < hi; ++p) {
        const Panel& panel = panels[p];
        const int64_t width = panel.width;
        const int64_t valid = std::min(width, Q - panel.query0);
        acc_t* dst = packed.data() + panel.offset;
        if (panel.kind == kDotPanel) {
          std::copy(qp + panel.query0 * d, qp + (panel.query0 + valid) * d, dst);
          continue;
        }
        for (int64_t lane = 0; lane < valid; ++lane) {
          const acc_t* src = qp + (panel.query0 + lane) * d;
          for (int64_t j = 0; j < d; ++j) dst[j * width + lane] = src[j];
        }
      }
    });
  }

  // Bank slices: a few queries leave too few items to share among the threads (or to balance
  // them), so the bank is split and each slice keeps its own lists, merged at the end.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t query_items = static_cast<int64_t>(item_panels.size());
  int64_t slices = 1;
  if (query_items < kItemsPerThread * threads) {
    slices = (kItemsPerThread * threads + query_items - 1) / query_items;
    slices = std::min(slices, n / std::max(kMinSliceRows, kSliceRowsPerK * k));
    slices = std::max<int64_t>(slices, 1);
  }
  const int64_t items = query_items * slices;

  const bool direct = bank.scalar_type() == acc_type && precision == ScanPrecision::kFP32 && bank.stride(1) == 1;
  const int64_t block_rows =
      std::max<int64_t>(64, kBlockBytes / std::max<int64_t>(1, d * static_cast<int64_t>(sizeof(acc_t))));
  // Slices' lists cut to k, for the merge (only when the bank is split).
  ScratchVector<Neighbour<acc_t>> slice_best;
  ScratchVector<int64_t> slice_counts;
  if (slices > 1) {
    slice_best.resize(static_cast<size_t>(Q * slices * k));
    slice_counts.assign(static_cast<size_t>(Q * slices), 0);
  }

  std::atomic<int64_t> next_item{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    TopkLists<acc_t> lists;
    for (int64_t item = next_item.fetch_add(1); item < items; item = next_item.fetch_add(1)) {
      const int64_t qi = item / slices, slice = item % slices;
      const auto [p_begin, p_end] = item_panels[qi];
      const int64_t query0 = panels[p_begin].query0;
      const Panel& last = panels[p_end - 1];
      const int64_t valid_here = std::min(last.lane0 + last.width, Q - query0);
      const int64_t r_begin = n * slice / slices, r_end = n * (slice + 1) / slices;
      lists.reset(max_item_lanes, valid_here, k, std::min(2 * k, k + (r_end - r_begin)));
      ItemArgs<acc_t> args{panels.data(), p_begin, p_end, packed.data(), d,
                           direct ? bank.const_data_ptr<acc_t>() : nullptr, bank.stride(0), &bank,
                           precision, r_begin, r_end, block_rows, &lists, valid_here};
      run_for_isa(isa, [&](auto isa_c) NPID_ALWAYS_INLINE_LAMBDA {
        scan_item<acc_t, shapes_for(decltype(isa_c)::value)>(args);
      });
      for (int64_t lane = 0; lane < valid_here; ++lane) {
        const int64_t count = lists.finish(lane);
        const Neighbour<acc_t>* best = lists.list(lane);
        const int64_t q = query0 + lane;
        if (slices == 1) {
          for (int64_t i = 0; i < k; ++i) {
            sims_out[q * k + i] = best[i].first;
            idx_out[q * k + i] = best[i].second;
          }
        } else {
          std::copy(best, best + count, slice_best.data() + (q * slices + slice) * k);
          slice_counts[q * slices + slice] = count;
        }
      }
    }
  });

  if (slices > 1) {
    at::parallel_for(0, Q, 1, [&](int64_t lo, int64_t hi) {
      ScratchVector<Neighbour<acc_t>> merged;
      for (int64_t q = lo; q < hi; ++q) {
        merged.clear();
        for (int64_t s = 0; s < slices; ++s) {
          const Neighbour<acc_t>* src = slice_best.data() + (q * slices + s) * k;
          merged.insert(merged.end(), src, src + slice_counts[q * slices + s]);
        }
        int64_t count = static_cast<int64_t>(merged.size());
        keep_best(merged.data(), count, k);
        std::sort(merged.begin(), merged.begin() + k, kRanksBefore<acc_t>);
        for (int64_t i = 0; i < k; ++i) {
          sims_out[q * k + i] = merged[i].first;
          idx_out[q * k + i] = merged[i].second;
        }
      }
    });
  }
  return {out_sims, out_idx};
}

std::tuple<at::Tensor, at::Tensor> knn_topk(const at::Tensor& query_in, const at::Tensor& bank,
                                            int64_t k, c10::string_view precision) {
  const ScanPrecision scan_precision = check_knn_args(query_in, bank, k, precision);
  const auto acc_type = query_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor query = query_in.to(acc_type).contiguous();
  at::Tensor sims, indices;
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "knn_topk", [&] {
    std::tie(sims, indices) = register_topk<scalar_t>(query, bank, k, scan_precision);
  });
  return {sims.to(query_in.scalar_type()), indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(npid, CPU, m) { m.impl("knn_topk", &knn_topk); }

}  // namespace cpu
}  // namespace npid
