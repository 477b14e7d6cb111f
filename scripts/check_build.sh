#!/usr/bin/env bash
# Build checks CI runs besides the tests: the CUDA kernels really hold sm_90 machine code,
# and CMakeLists.txt still builds a library that loads and runs (so it cannot rot).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
so=$($PY -c "import npid_kernels._C as c; print(c.__file__)")
has_cuda=OFF
if $PY -c "import sys, torch, npid_kernels; sys.exit(0 if torch._C._dispatch_has_kernel_for_dispatch_key('npid::nce_loss', 'CUDA') else 1)"; then
    has_cuda=ON
    # cuobjdump: on PATH, in the toolkit, or (some toolkits ship without it) in Triton's wheel.
    cuobjdump_bin=""
    triton_bin=$($PY -c "import os, triton; print(os.path.dirname(triton.__file__))" 2>/dev/null || true)/backends/nvidia/bin/cuobjdump
    for candidate in "$(command -v cuobjdump || true)" "${CUDA_HOME:-/nonexistent}/bin/cuobjdump" \
                     "$($PY scripts/find_cuda_home.py)/bin/cuobjdump" "$triton_bin"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then cuobjdump_bin=$candidate; break; fi
    done
    [ -n "$cuobjdump_bin" ] || { echo "cuobjdump not found"; exit 1; }
    echo "CUDA kernels in $so:"
    "$cuobjdump_bin" --list-elf "$so" | tee /tmp/npid_elf.txt
    grep -q "sm_90" /tmp/npid_elf.txt || { echo "no sm_90 SASS in $so"; exit 1; }
else
    echo "CPU-only build: no CUDA kernels to inspect"
fi

# CMake builds the CUDA kernels too when setup.py did (NPID_CMAKE_WITH_CUDA=ON/OFF overrides).
with_cuda=${NPID_CMAKE_WITH_CUDA:-$has_cuda}
bdir=build/cmake-cuda-$with_cuda  # one folder per mode: switching WITH_CUDA needs a fresh configure
mkdir -p build
echo "CMake build (WITH_CUDA=$with_cuda)"
prefix=$($PY -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
# A CUDA build of torch makes its CMake config look for the toolkit even for a CPU-only library.
cuda_args=()
cuda_home=$($PY scripts/find_cuda_home.py)
if [ -n "$cuda_home" ]; then
    cuda_args=(-DCUDAToolkit_ROOT="$cuda_home" -DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc")
fi
cmake -S . -B "$bdir" -DCMAKE_PREFIX_PATH="$prefix" -DWITH_CUDA="$with_cuda" "${cuda_args[@]}" \
      -DPython3_EXECUTABLE="$(command -v $PY)" -G Ninja > "$bdir".log 2>&1 || { cat "$bdir".log; exit 1; }
cmake --build "$bdir" -j2 >> "$bdir".log 2>&1 || { tail -50 "$bdir".log; exit 1; }
lib=$(ls "$bdir"/libnpid_ops.so)
$PY - "$lib" "$with_cuda" <<'PY'
import sys
import torch
torch.ops.load_library(sys.argv[1])
has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("npid::nce_loss", "CUDA")
assert has_cuda == (sys.argv[2] == "ON"), f"CUDA kernels registered: {has_cuda}, WITH_CUDA={sys.argv[2]}"
x = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
bank = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
y = torch.tensor([1, 2, 3])
loss, grad, noise_exp_sum, positive_sq_dist = torch.ops.npid.nce_loss(x, bank, y, None, torch.tensor([1, 0]), torch.tensor([20.0]), 5, 0.07)
assert loss.shape == (3,) and torch.isfinite(loss).all() and grad.shape == (3, 8)
print("CMake-built", sys.argv[1], "loads and runs: loss", loss.tolist())
PY
