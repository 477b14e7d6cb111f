// The whole-bank ops for CUDA: the momentum update's kernel in momentum_kernels.cuh, the
// entry points in bank_ops.h (also built for the CPU emulator, csrc/emu/).
#include "bank_ops.h"

TORCH_LIBRARY_IMPL(npid, CUDA, m) { npid::cuda::register_bank_ops(m); }
