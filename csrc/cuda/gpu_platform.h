// What the CUDA kernels and their launchers take from the platform, in one place, so that the
// same sources build with nvcc for a GPU and with the host compiler for the CUDA emulator
// (-DNPID_EMULATE_CUDA, csrc/emu/): the device headers, kernel launches (one helper instead of
// <<<>>>), shared-memory declarations, the stream, the device guard and the device queries.
//
// Knobs read on every call (tests use them to force the launch plans):
//   NPID_CUDA_SM_COUNT=N     plan launches as if the device had N SMs (split / single-split paths)
//   NPID_CUDA_SYNC_CHECKS=1  validate on the device and raise after a sync (see host_common.h)
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <utility>

#ifdef NPID_EMULATE_CUDA
#include "../emu/cuda_emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// Shared memory declarations: a static array, a static scalar, and the kernel's dynamic
// shared memory (16-byte aligned bytes reinterpreted by the kernel).
#define NPID_SHARED_ARRAY(type, name, count) __shared__ type name[count]
#define NPID_SHARED(type, name) __shared__ type name
#define NPID_DYNAMIC_SHARED(type, name) extern __shared__ __align__(16) type name[]
#define NPID_NOINLINE __noinline__
#endif

namespace npid {
namespace gpu {

// A kernel launch: the kernel's name (emulator messages), the maximum block size its
// __launch_bounds__ declares (checked by the emulator), grid, block, dynamic shared memory.
struct LaunchConfig {
  const char* name;
  int max_threads;
  dim3 grid;
  dim3 block;
  size_t dynamic_smem = 0;
};

#ifdef NPID_EMULATE_CUDA

struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline int device_sm_count() { return 132; }  // an H100 SXM / H200
inline bool stream_is_capturing() { return false; }

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& cfg, Args&&... args) {
  npid_emu::run({cfg.name, cfg.max_threads, cfg.grid, cfg.block, cfg.dynamic_smem},
                [&] { kernel(args...); });
}

#else

using DeviceGuard = c10::cuda::CUDAGuard;
inline int device_sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
inline bool stream_is_capturing() {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), const LaunchConfig& cfg, Args&&... args) {
  kernel<<<cfg.grid, cfg.block, cfg.dynamic_smem, at::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

// The SM count the launch planning uses: NPID_CUDA_SM_COUNT when set (tests), else the device's.
inline int num_sms() {
  const char* v = std::getenv("NPID_CUDA_SM_COUNT");
  if (v != nullptr && v[0] != '\0') {
    const long n = std::strtol(v, nullptr, 10);
    TORCH_CHECK(n >= 1 && n <= 65536, "NPID_CUDA_SM_COUNT must be an integer in [1, 65536], got '",
                v, "'");
    return static_cast<int>(n);
  }
  return device_sm_count();
}

}  // namespace gpu
}  // namespace npid
