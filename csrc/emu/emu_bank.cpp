// The whole-bank ops' CUDA code (csrc/cuda/bank_ops.h), emulated on CPU tensors. The GEMMs of
// full_softmax_loss / knn_topk (cuBLAS on a GPU) take bank_scan.cpp's CPU path here.
#include "cuda/bank_ops.h"

TORCH_LIBRARY_IMPL(npid_emu, CPU, m) { npid::cuda::register_bank_ops(m); }
