// The sampled-row ops' CUDA code (csrc/cuda/nce_ops.h), emulated on CPU tensors.
#include "cuda/nce_ops.h"

TORCH_LIBRARY_IMPL(npid_emu, CPU, m) { npid::cuda::register_nce_ops(m); }
