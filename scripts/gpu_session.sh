#!/usr/bin/env bash
# Everything a GPU session should run, in one self-contained call of the device tool
# (the machine keeps nothing between calls): rebuild against the machine's torch, the full
# test matrix on CUDA, compute-sanitizer memcheck + racecheck over every op, and the
# benchmarks. Results go to $OUT (or ./gpu_out) to be committed under benchmarks/results/.
#   usage: bash scripts/gpu_session.sh [tests|sanitize|bench|all]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
what=${1:-all}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
tag="$(python -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())' 2>/dev/null || echo gpu)-$(date +%F)-$(git rev-parse --short HEAD 2>/dev/null || echo nogit)"

{ nvidia-smi; python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$OUT/env.txt" 2>&1
python -m pip install -q --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
python -c "import npid_kernels, torch; assert npid_kernels.ops.cuda_available(), 'CUDA kernels missing'; print('built', torch.__version__)"

if [ "$what" = tests ] || [ "$what" = all ]; then
    python -m pytest tests -q -ra > "$OUT/tests.log" 2>&1
    tail -5 "$OUT/tests.log"
fi
if [ "$what" = sanitize ] || [ "$what" = all ]; then
    for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 1 python scripts/cuda_sanitize.py --quick \
            > "$OUT/sanitize-$tool.log" 2>&1
        echo "compute-sanitizer $tool: exit $?  ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUT/sanitize-$tool.log") clean summaries)"
    done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    python -m pytest benchmarks/ -q --benchmark-json="$OUT/$tag.json" > "$OUT/bench.log" 2>&1
    python benchmarks/report.py "$OUT/$tag.json" > "$OUT/$tag.md" 2>&1
    tail -40 "$OUT/$tag.md"
fi
