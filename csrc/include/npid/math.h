// Transcendentals in the precision of their argument, the same on every compiler.
//
// Under g++, the global ::exp(float) is the C library's double exp (the float overloads live in
// std::); under nvcc it is the float device function. So kernels that wrote ::exp computed the
// fp32 terms in double on the CPU and in float on the GPU. These call expf / logf / log1pf /
// sqrtf for float and exp / log / log1p / sqrt for double explicitly: fp32 features get fp32
// math everywhere (what the GPU computes, and what an fp32 result needs: the terms are summed in
// fp32 or double anyway), double features get double math. Host code uses glibc's functions
// (correctly rounded or within 1 ulp), device code CUDA's (within 2 ulp for the float ones):
// results may differ in the last bits between the two, never in precision class.
#pragma once
#include <math.h>

#include "npid/philox.h"  // NPID_HOST_DEVICE

namespace npid {
namespace math {

NPID_HOST_DEVICE float exp(float v) { return ::expf(v); }
NPID_HOST_DEVICE double exp(double v) { return ::exp(v); }
NPID_HOST_DEVICE float log(float v) { return ::logf(v); }
NPID_HOST_DEVICE double log(double v) { return ::log(v); }
NPID_HOST_DEVICE float log1p(float v) { return ::log1pf(v); }
NPID_HOST_DEVICE double log1p(double v) { return ::log1p(v); }
NPID_HOST_DEVICE float sqrt(float v) { return ::sqrtf(v); }
NPID_HOST_DEVICE double sqrt(double v) { return ::sqrt(v); }

}  // namespace math
}  // namespace npid
