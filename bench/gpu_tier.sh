#!/usr/bin/env bash
# The GPU tier in one command (stages, timeouts, budget: see bench/gpu_tier.py):
#   bash bench/gpu_tier.sh OUT_DIR [--budget SECONDS] [--rehearse] [--stages build,correctness,...]
# On the GPU machine: install, correctness per family on CUDA, sanitizer, quick benchmarks,
# approval of CUDA C++ kernels, then the rest of the suite; every stage writes into OUT_DIR as it
# ends and OUT_DIR/summary.txt says what ran. Commit OUT_DIR's results JSON and
# vitkern/cuda_auto.json (written by: python -m vitkern.bench.approve ... --write).
# --rehearse: the same stages on a machine without a GPU (CI runs it on every submission).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu_tier.py "$@"
