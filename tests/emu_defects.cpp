// Deliberately broken kernels, one per defect class the emulated CUDA runs must catch
// (tests/test_emulator.py): each detector is shown to fire on a known defect, so a clean run
// means something. Built by scripts/build_emu.py (target "defects") with the emulator runtime;
// registers torch.ops.npid_emu_defects.run(name, x).
#include <torch/library.h>

#include <string>

#include "cuda/device_common.cuh"
#include "cuda/gpu_platform.h"

namespace {

using npid::cuda::kFullMask;
constexpr int kThreads = 64;

// Reads one element past the end of each row (AddressSanitizer: heap-buffer-overflow on the
// last row; elsewhere it silently reads the next row).
__global__ void __launch_bounds__(kThreads) read_past_row(const float* x, float* out, int d) {
  const int r = blockIdx.x;
  if (threadIdx.x == 0) {
    float s = 0;
    for (int j = 0; j <= d; ++j) s += x[r * d + j];  // j == d: one past the row
    out[r] = s;
  }
}

// Each thread writes its shared slot and reads its neighbour's with no __syncthreads between:
// ThreadSanitizer reports the race; the poisoned shared memory makes the result NaN.
__global__ void __launch_bounds__(kThreads) missing_syncthreads(const float* x, float* out) {
  NPID_SHARED_ARRAY(float, slots, kThreads);
  const int t = threadIdx.x;
  slots[t] = x[t];
  // __syncthreads();  <- the defect: missing
  out[t] = slots[(t + 1) % kThreads];
}

// The same kernel, correct: the control that the two detectors stay quiet on good code.
__global__ void __launch_bounds__(kThreads) with_syncthreads(const float* x, float* out) {
  NPID_SHARED_ARRAY(float, slots, kThreads);
  const int t = threadIdx.x;
  slots[t] = x[t];
  __syncthreads();
  out[t] = slots[(t + 1) % kThreads];
}

// Full-mask shuffles in the two sides of a branch that splits the warp: two collectives, each
// reached by half of the lanes its mask names.
__global__ void __launch_bounds__(kThreads) divergent_shuffle(const float* x, float* out) {
  const int t = threadIdx.x;
  float v = x[t];
  if ((t & 31) < 16) {
    v = __shfl_sync(kFullMask, v, 0);
  } else {
    v = __shfl_sync(kFullMask, v, 31);
  }
  out[t] = v;
}

// Half the warp returns, the other half shuffles with the full mask.
__global__ void __launch_bounds__(kThreads) shuffle_after_return(const float* x, float* out) {
  const int t = threadIdx.x;
  if ((t & 31) >= 16) return;
  out[t] = __shfl_xor_sync(kFullMask, x[t], 1);
}

// A barrier inside a branch of one warp while the other warp waits at a different barrier.
__global__ void __launch_bounds__(kThreads) divergent_barrier(const float* x, float* out) {
  const int t = threadIdx.x;
  if (t < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[t] = x[t];
}

// A reduction that reads shared memory nobody wrote (poisoned: NaN).
__global__ void __launch_bounds__(kThreads) uninitialised_shared(const float* x, float* out) {
  NPID_SHARED_ARRAY(float, partial, kThreads * 2);
  const int t = threadIdx.x;
  partial[t] = x[t];
  __syncthreads();
  out[t] = partial[t] + partial[t + kThreads];  // the upper half was never written
}

at::Tensor run(c10::string_view name_view, const at::Tensor& x_in) {
  const std::string name(name_view);
  const at::Tensor x = x_in.contiguous().to(at::kFloat);
  at::Tensor out = at::zeros({kThreads}, x.options());
  using npid::gpu::launch;
  if (name == "read_past_row") {
    TORCH_CHECK(x.dim() == 2, "x must be 2-D");
    out = at::zeros({x.size(0)}, x.options());
    launch(read_past_row, {"read_past_row", kThreads, static_cast<unsigned>(x.size(0)), kThreads},
           x.const_data_ptr<float>(), out.data_ptr<float>(), static_cast<int>(x.size(1)));
    return out;
  }
  TORCH_CHECK(x.numel() >= kThreads, "x needs ", kThreads, " elements");
  const float* xp = x.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (name == "missing_syncthreads") {
    launch(missing_syncthreads, {"missing_syncthreads", kThreads, 1, kThreads}, xp, op);
  } else if (name == "with_syncthreads") {
    launch(with_syncthreads, {"with_syncthreads", kThreads, 1, kThreads}, xp, op);
  } else if (name == "divergent_shuffle") {
    launch(divergent_shuffle, {"divergent_shuffle", kThreads, 1, kThreads}, xp, op);
  } else if (name == "shuffle_after_return") {
    launch(shuffle_after_return, {"shuffle_after_return", kThreads, 1, kThreads}, xp, op);
  } else if (name == "divergent_barrier") {
    launch(divergent_barrier, {"divergent_barrier", kThreads, 1, kThreads}, xp, op);
  } else if (name == "uninitialised_shared") {
    launch(uninitialised_shared, {"uninitialised_shared", kThreads, 1, kThreads}, xp, op);
  } else if (name == "block_over_launch_bounds") {
    launch(with_syncthreads, {"with_syncthreads", kThreads, 1, 2 * kThreads}, xp, op);
  } else if (name == "empty_grid") {
    launch(with_syncthreads, {"with_syncthreads", kThreads, 0, kThreads}, xp, op);
  } else if (name == "too_much_dynamic_shared") {
    launch(with_syncthreads, {"with_syncthreads", kThreads, 1, kThreads, 64 * 1024}, xp, op);
  } else {
    TORCH_CHECK(false, "unknown defect '", name, "'");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(npid_emu_defects, m) {
  m.def("run(str name, Tensor x) -> Tensor");
  m.impl("run", c10::DispatchKey::CPU, &run);
}
