#!/usr/bin/env bash
# Refreshes the README's performance table in one command: times the CPU training step of the
# table (NCE and softmax-CE, fp32 and bf16 banks, B=64 K=4096 n=50,000 d=128; PyTorch,
# torch.compile and npid side by side in each pytest-benchmark run), RUNS times (default 2: the
# development VM's speed drifts between minutes, so the table gives the range over the runs),
# writes benchmarks/results/cpu-<date>-<commit>-readme-<run>.json, and rewrites the README's
# generated tables from them (scripts/readme_tables.py reports the newest commit's runs). Run it on
# an idle machine, from a clean checkout: the table names the commit it measured. Commit the JSON
# files and the README after.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "benchmark_readme.sh: commit your changes first (the table names the commit it measured)" >&2
    exit 2
fi
stem="benchmarks/results/cpu-$(date -u +%F)-$(git rev-parse --short HEAD)-readme"
for run in $(seq 1 "${RUNS:-2}"); do
    "$PY" -m pytest benchmarks/test_bench_nce.py -q -p no:cacheprovider --bench-device cpu \
        -k "B64-K4096-N50000 and step" --benchmark-json="$stem-$run.json"
done
"$PY" scripts/readme_tables.py
echo "benchmark_readme.sh: wrote $stem-*.json; commit them with README.md and docs/performance-history.md"
