#!/usr/bin/env bash
# The paper's CIFAR-10 experiments sized for a 2-core CPU, in stages, resumable:
#
#   bash scripts/cifar10_cpu.sh DATA [OUT_DIR]        (OUT_DIR default: results/cifar10-cpu)
#
# DATA is CIFAR-10 as torchvision's folder (holding cifar-10-batches-py) or as an .npz with
# train_x, train_y, test_x, test_y (e.g. decoded from a JPEG copy: say which in the results).
# STAGES (environment, default "setup") picks what runs, in this order:
#   setup   candidate encoders / augmentations / epochs, NCE m = 4096, judged by weighted kNN of
#           5,000 images held out of the *training* set against the other 45,000 (--holdout):
#           the test set is not looked at while the set-up is chosen.
#   table   the paper's Table 1 rows on the 10,000 test images with the chosen set-up (ARCH, WIDTH,
#           AUGMENT, EPOCHS): random init, parametric softmax, exact softmax, NCE m = 1, 10, 512,
#           4096 (Z per step), NCE m = 512, 4096 with the paper's first-batch Z, softmax-CE
#           m = 4096, the supervised reference; a second seed for random init, the exact softmax,
#           NCE 4096 and NCE 1. Weighted kNN (features and bank) and a linear probe per row.
#   figure3 the paper's Figure 3: NCE m = 4096 (Z per step) with the proximal term, lambda = 10, 30, 50,
#           the same set-up; lambda = 0 is the table's nce-4096-seed0. The report draws each row's
#           per-step loss (steps.csv) in OUT_DIR/figure3.png.
#   scale   CIFAR-10 analogues of the paper's ImageNet Tables 4 and 5, NCE m = 4096 (Z per step):
#           embedding size d = 32, 64, 256 and training-set fraction 10%, 30% (the bank holds only
#           the fraction; kNN on all test images), each fraction also untrained (--epochs 0) as
#           its own kNN floor; d = 128 at 100% is the table's nce-4096-seed0 (floor: random-init-seed0).
#   figure4 the paper's Figure 4 analogue: NCE m = 4096 (Z per step) with the weighted kNN evaluated
#           after every epoch, drawn against the training loss in OUT_DIR/figure4.png.
# A finished row (OUT_DIR/<stage>/<row>/results.json) is skipped and an unfinished one continues
# from its checkpoint (npid-train --resume), so rerunning the same command after an interruption
# (or with EXTRA="--max-minutes-this-run M" for time-limited pieces) completes the stage. After
# each row, scripts/cifar10_report.py rewrites OUT_DIR/<stage>.md and .json.
# Settings: EXTRA (more npid-train flags for every row, split at spaces; they come last, so they
# override a row's own), PYTHON, HOLDOUT (5000); for the table: ARCH, WIDTH, AUGMENT, EPOCHS (the
# set-up stage's choice).
set -euo pipefail
if [ $# -lt 1 ]; then
    sed -n '2,25p' "$0" >&2
    exit 2
fi
DATA=$(realpath -m "$1")
OUT_DIR=$(realpath -m "${2:-$(dirname "$0")/../results/cifar10-cpu}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAGES=${STAGES:-setup}
ARCH=${ARCH:-cnn4}
WIDTH=${WIDTH:-32}
AUGMENT=${AUGMENT:-paper}
EPOCHS=${EPOCHS:-15}
HOLDOUT=${HOLDOUT:-5000}

if [ -f "$DATA" ]; then
    dataset=(--dataset npz --data-dir "$DATA")
elif [ -d "$DATA/cifar-10-batches-py" ]; then
    dataset=(--dataset cifar10 --data-dir "$DATA")
else
    echo "cifar10_cpu.sh: $DATA is neither an .npz file nor a folder holding cifar-10-batches-py" >&2
    exit 2
fi
mkdir -p "$OUT_DIR"
# The paper's T, bank momentum and optimiser; batch 128 as lemniscate's cifar.py; every row seed 0
# unless it says otherwise.
common=("${dataset[@]}" --batch-size 128 --lr 0.03 --nce-t 0.07 --nce-m 0.5 --knn-k 200 --knn-source both
        --eval-every 5 --resume)
read -r -a extra <<< "${EXTRA:-}"

row() {  # row STAGE NAME FLAGS...: train and evaluate one row unless it has finished
    local stage=$1 name=$2
    shift 2
    local out="$OUT_DIR/$stage/$name"
    if [ -f "$out/results.json" ]; then
        echo "== $stage/$name: done"
        return
    fi
    mkdir -p "$OUT_DIR/$stage"
    echo "== $(date -u '+%Y-%m-%d %H:%M UTC') $stage/$name: npid-train train ${common[*]} $* ${extra[*]} --out-dir $out" \
        | tee -a "$OUT_DIR/$stage/$name.log"
    "$PY" -m npid_kernels.train train "${common[@]}" "$@" "${extra[@]}" --out-dir "$out" >> "$OUT_DIR/$stage/$name.log" 2>&1 \
        || { echo "cifar10_cpu.sh: row $stage/$name failed or stopped, see $OUT_DIR/$stage/$name.log" >&2;
             tail -3 "$OUT_DIR/$stage/$name.log" >&2; exit 1; }
    grep "final weighted kNN" "$OUT_DIR/$stage/$name.log" || true
    "$PY" scripts/cifar10_report.py "$OUT_DIR" "$stage" > /dev/null
}

{   # one block per start (a resumed run has several)
    echo "# $(date -u '+%Y-%m-%d %H:%M UTC'): STAGES='$STAGES' EXTRA='${EXTRA:-}' HOLDOUT=$HOLDOUT ARCH=$ARCH" \
         "WIDTH=$WIDTH AUGMENT=$AUGMENT EPOCHS=$EPOCHS bash scripts/cifar10_cpu.sh $DATA $OUT_DIR"
    echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown);" \
         "$("$PY" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())');" \
         "$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //') x $(nproc) cores"
} >> "$OUT_DIR/command.txt"

for stage in $STAGES; do
    case $stage in
    setup)
        nce=(--loss nce --nce-k 4096 --z-mode batch --holdout "$HOLDOUT" --seed 0 --schedule cosine)
        row setup random-init-cnn4 "${nce[@]}" --arch cnn4 --width 32 --epochs 0
        row setup random-init-cifar-resnet18 "${nce[@]}" --arch cifar-resnet18 --width 16 --epochs 0
        row setup cnn4-w32-paper-15ep "${nce[@]}" --arch cnn4 --width 32 --augment paper --epochs 15
        row setup cifar-resnet18-w16-paper-8ep "${nce[@]}" --arch cifar-resnet18 --width 16 --augment paper --epochs 8
        row setup cnn4-w32-light-15ep "${nce[@]}" --arch cnn4 --width 32 --augment light --epochs 15
        # Longer rows are left out on purpose: about 20 trained rows (Table 1, Figure 3, the d and
        # fraction tables) at 15 cnn4 epochs (~27 CPU-minutes each) already fill the ~8-hour budget.
        ;;
    table)
        enc=(--arch "$ARCH" --width "$WIDTH" --augment "$AUGMENT" --epochs "$EPOCHS" --schedule cosine --linear-probe)
        # Seed 0 of every row first, so an interrupted stage has the whole table at one seed.
        row table random-init-seed0 "${enc[@]}" --loss softmax --epochs 0 --seed 0
        row table softmax-seed0 "${enc[@]}" --loss softmax --seed 0
        row table nce-4096-seed0 "${enc[@]}" --loss nce --nce-k 4096 --z-mode batch --seed 0
        row table nce-1-seed0 "${enc[@]}" --loss nce --nce-k 1 --z-mode batch --seed 0
        row table param-softmax-seed0 "${enc[@]}" --loss param-softmax --seed 0
        row table nce-512-seed0 "${enc[@]}" --loss nce --nce-k 512 --z-mode batch --seed 0
        row table nce-10-seed0 "${enc[@]}" --loss nce --nce-k 10 --z-mode batch --seed 0
        row table supervised-seed0 "${enc[@]}" --loss supervised --seed 0
        row table softmax-ce-4096-seed0 "${enc[@]}" --loss softmax-ce --nce-k 4096 --seed 0
        row table nce-4096-first-batch-z-seed0 "${enc[@]}" --loss nce --nce-k 4096 --z-mode first-batch --seed 0
        row table nce-512-first-batch-z-seed0 "${enc[@]}" --loss nce --nce-k 512 --z-mode first-batch --seed 0
        row table random-init-seed1 "${enc[@]}" --loss softmax --epochs 0 --seed 1
        row table softmax-seed1 "${enc[@]}" --loss softmax --seed 1
        row table nce-4096-seed1 "${enc[@]}" --loss nce --nce-k 4096 --z-mode batch --seed 1
        row table nce-1-seed1 "${enc[@]}" --loss nce --nce-k 1 --z-mode batch --seed 1
        ;;
    figure3)
        enc=(--arch "$ARCH" --width "$WIDTH" --augment "$AUGMENT" --epochs "$EPOCHS" --schedule cosine --linear-probe)
        for lam in 10 30 50; do
            row figure3 "nce-4096-lambda$lam-seed0" "${enc[@]}" --loss nce --nce-k 4096 --z-mode batch --seed 0 \
                --proximal "$lam"
        done
        ;;
    scale)
        enc=(--arch "$ARCH" --width "$WIDTH" --augment "$AUGMENT" --epochs "$EPOCHS" --schedule cosine --linear-probe)
        nce4096=(--loss nce --nce-k 4096 --z-mode batch --seed 0)
        for d in 32 64 256; do
            row scale "nce-4096-d$d-seed0" "${enc[@]}" "${nce4096[@]}" --low-dim "$d"
        done
        for fraction in 0.1 0.3; do
            row scale "nce-4096-fraction$fraction-seed0" "${enc[@]}" "${nce4096[@]}" --train-fraction "$fraction"
        done
        for fraction in 0.1 0.3; do  # the same seed picks the same images as the trained row
            row scale "random-init-fraction$fraction-seed0" "${enc[@]}" --loss softmax --epochs 0 --seed 0 \
                --train-fraction "$fraction"
        done
        ;;
    figure4)
        enc=(--arch "$ARCH" --width "$WIDTH" --augment "$AUGMENT" --epochs "$EPOCHS" --schedule cosine)
        row figure4 nce-4096-eval-every-epoch-seed0 "${enc[@]}" --loss nce --nce-k 4096 --z-mode batch --seed 0 \
            --eval-every 1
        ;;
    *)
        echo "cifar10_cpu.sh: unknown stage $stage (known: setup, table, figure3, scale, figure4)" >&2
        exit 2
        ;;
    esac
done
