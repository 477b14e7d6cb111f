// The sampled-row ops for CUDA: kernels in nce_kernels.cuh, launch planning and entry points
// in nce_ops.h (also built for the CPU emulator, csrc/emu/).
#include "nce_ops.h"

TORCH_LIBRARY_IMPL(npid, CUDA, m) { npid::cuda::register_nce_ops(m); }
