#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: PyTorch (kept if already installed), the
# test/driver dependencies, and the compiled extension (editable install, so tests and the
# driver run from the source tree). The CUDA kernels are built when a toolkit is found.
# Idempotent: the extension is rebuilt only when csrc/, setup.py or the torch version change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# First line of output: a CUDA toolkit without a GPU means minutes of nvcc before a CPU user can train.
if [ "${FORCE_ONLY_CPU:-0}" != "1" ] && [ -n "$($PY scripts/find_cuda_home.py 2>/dev/null)" ] \
        && ! (nvidia-smi -L 2>/dev/null || true) | grep -q '^GPU'; then
    echo "npid_kernels: CUDA toolkit found but no GPU visible: building also compiles the CUDA kernels" \
         "(several minutes when they are not built yet); CPU only: FORCE_ONLY_CPU=1 bash scripts/setup.sh"
fi

if ! $PY -c "import torch, torchvision" 2>/dev/null; then
    # The pair pip can take on this project's machines (CUDA 13 build; runs on the CPU too).
    $PY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
fi
$PY -m pip install -q numpy pytest pytest-benchmark scikit-learn tqdm matplotlib ninja setuptools wheel

# No GPU visible: build one arch (sm_90) unless told otherwise; a CUDA file costs ~2 min per arch.
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi

stamp_file=build/.npid_build_stamp
stamp=$( (find csrc -type f | sort | xargs sha256sum; sha256sum setup.py;
          $PY -c "import torch; print(torch.__version__)"; echo "${TORCH_CUDA_ARCH_LIST:-} ${FORCE_ONLY_CPU:-}") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && $PY -c "import npid_kernels._C" 2>/dev/null; then
    echo "npid_kernels: extension up to date"
else
    echo "npid_kernels: building the extension (a few minutes; CUDA sources add ~2-3 min per file per arch)"
    $PY -m pip install -q --no-build-isolation -e .
    mkdir -p build && echo "$stamp" > "$stamp_file"
fi
command -v pyenv > /dev/null && pyenv rehash || true  # put the npid-train console script on PATH
$PY -c "import npid_kernels, torch; print('npid_kernels ready: torch', torch.__version__, '| CUDA kernels compiled:', torch._C._dispatch_has_kernel_for_dispatch_key('npid::nce_loss', 'CUDA'))"
