#!/usr/bin/env bash
# The GPU tier in one command, for a machine with a CUDA device (and no registry access):
#   bash bench/gpu_tier.sh [OUT_DIR]
# builds vitkern (and vitkern._C when pybind11 is importable), runs the whole test suite on CUDA
# (fp32 / fp16 / bf16), then the benchmarks; everything lands in OUT_DIR (default bench/results).
# Last, python -m vitkern.bench.approve prints which CUDA C++ kernels may join backend="auto" on
# this GPU (passed the tier, faster than triton) and writes vitkern/cuda_auto.json: commit it with
# the results file it cites.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results}}"
mkdir -p "$out"
if python -c "import pybind11" 2>/dev/null; then cuda=1; else cuda=0; fi
VITKERN_CUDA=$cuda python -m pip install --no-build-isolation --no-deps -e . > "$out/install.log" 2>&1 \
    || { tail -30 "$out/install.log"; exit 1; }
python -m vitkern info | tee "$out/info.txt"
python -m pytest -q -p no:cacheprovider -rs --junitxml "$out/pytest-gpu.xml" 2>&1 \
    | tee "$out/pytest-gpu.txt"
tests=${PIPESTATUS[0]}
date=$(date -u +%F)
python -m vitkern.bench --out "$out" --no-progress --dtype bf16,fp16 2>&1 | tee "$out/bench.txt"
bench=${PIPESTATUS[0]}
approve=1
results=$(ls "$out"/*-"$date".json 2>/dev/null)
if [ -n "$results" ]; then
    python -m vitkern.bench.approve --junit "$out/pytest-gpu.xml" $results --write \
        | tee "$out/approve.txt"
    approve=${PIPESTATUS[0]}
fi
echo "tests exit $tests, bench exit $bench, approve exit $approve"
exit $(( tests || bench || approve ))
