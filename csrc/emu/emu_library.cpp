// The emulated-CUDA operator library `npid_emu`: the same schemas as `npid`, implemented by the
// CUDA launchers (csrc/cuda/*_ops.h) built with the host compiler against the emulator, and
// registered for CPU tensors. Built by scripts/build_emu.py for the tests only; never installed.
#include <torch/library.h>

#include "npid/autograd.h"
#include "npid/schemas.h"

TORCH_LIBRARY(npid_emu, m) { npid::define_schemas(m); }
TORCH_LIBRARY_IMPL(npid_emu, Autograd, m) { npid::register_fused_loss_autograd(m); }
