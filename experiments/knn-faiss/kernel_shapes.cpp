// One core's FMA rate of register-tile shapes for the fused CPU kNN kernel (csrc/cpu/knn_cpu.cpp
// scan_panel): <vector bytes, query vectors, bank rows> per tile, d = 128, a 512-row block of
// rows (256 KiB) and 4 query panels, thresholds that nothing passes (the products alone).
//   g++ -O3 -std=c++20 -o /tmp/kernel_shapes experiments/knn-faiss/kernel_shapes.cpp && taskset -c 1 /tmp/kernel_shapes
// NOTES.md has the numbers (256-bit vectors beat 512-bit ones on the Zen 4 VM).
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <chrono>
#include <vector>
#include <algorithm>
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma")))
#define AI inline __attribute__((always_inline))
template <typename V, typename T> AI V ld(const T* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }

template <int VB, int NV, int MR, typename F = float>
AI int64_t kern(const F* __restrict__ panel, int64_t d, const F* __restrict__ rows, int64_t stride, int64_t nrows, const F* thrp) {
  typedef F V __attribute__((vector_size(VB)));
  typedef int32_t M __attribute__((vector_size(VB)));
  constexpr int L = VB / 4, W = L * NV;
  V thr[NV]; for (int v = 0; v < NV; ++v) thr[v] = ld<V>(thrp + v * L);
  int64_t hits = 0;
  for (int64_t r0 = 0; r0 < nrows; r0 += MR) {
    const F* rp[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) rp[i] = rows + std::min<int64_t>(r0 + i, nrows - 1) * stride;
    V acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[i][v] = V{};
    const F* p = panel;
    for (int64_t j = 0; j < d; ++j, p += W) {
      V q[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) q[v] = ld<V>(p + v * L);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const F b = rp[i][j];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[i][v] += q[v] * b;
      }
    }
    M pass = M{};
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) pass |= ~(acc[i][v] <= thr[v]);
    uint64_t w[VB / 8]; std::memcpy(w, &pass, sizeof(w));
    uint64_t any = 0; for (int k = 0; k < VB / 8; ++k) any |= w[k];
    if (any) ++hits;
  }
  return hits;
}

template <int VB, int NV, int MR>
T512 __attribute__((noinline)) int64_t run(const float* panel, int64_t d, const float* rows, int64_t nrows, const float* thr, int reps, int panels) {
  int64_t h = 0;
  for (int r = 0; r < reps; ++r)
    for (int p = 0; p < panels; ++p)
      h += kern<VB, NV, MR>(panel + p * d * (VB / 4 * NV), d, rows, d, nrows, thr);
  return h;
}

template <int VB, int NV, int MR>
void bench(const char* name) {
  const int64_t d = 128, nrows = 512, panels = 4; const int W = VB / 4 * NV;
  std::vector<float> panel(panels * d * W, 0.01f), rows(nrows * d, 0.02f), thr(64, 1e9f);
  int reps = 400;
  double best = 1e9;
  for (int t = 0; t < 5; ++t) {
    auto t0 = std::chrono::steady_clock::now();
    volatile int64_t h = run<VB, NV, MR>(panel.data(), d, rows.data(), nrows, thr.data(), reps, panels);
    (void)h;
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  double flop = 2.0 * d * nrows * W * panels * reps;
  printf("%-14s %.1f GFLOP/s\n", name, flop / best / 1e9);
}
int main() {
  for (int rep = 0; rep < 2; ++rep) {
  bench<64, 2, 8>("512 x2 r8");
  bench<32, 2, 6>("256 x2 r6");
  bench<32, 1, 8>("256 x1 r8");
  bench<32, 1, 12>("256 x1 r12");
  bench<32, 2, 8>("256 x2 r8");
  bench<32, 2, 12>("256 x2 r12");
  bench<32, 3, 8>("256 x3 r8");
  bench<32, 4, 6>("256 x4 r6");
  bench<32, 4, 4>("256 x4 r4");
  bench<16, 2, 6>("128 x2 r6");
  }
}
