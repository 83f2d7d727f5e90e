#!/usr/bin/env bash
# The GPU smoke script: run it on the device machine after every change to train/, models/, ops/ or data/.
# Needs the bundles of ../shared/device (INSTALL line first). Logs and tables go to $OUT (or ./outputs).
#   bash benchmarks/gpu_e2e.sh [e2e] [tests] [stack]     (default: e2e tests)
#   e2e:   benchmarks/gpu_e2e.py on 1 GPU and on every GPU of the machine (ray job submit, ZeRO 0/2/3, ...)
#   tests: the GPU tests (CUDA-only tests skip on CPU CI)
#   stack: benchmarks/gpu_stack.py (stack overhead, data stall, weak scaling, ZeRO-3 memory, SP scan)
set -o pipefail
out=${OUT:-outputs}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 PYTHONPATH=${PYTHONPATH:-.}
gpus=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
counts=1; [ "$gpus" -gt 1 ] && counts="1 $gpus"
for part in ${@:-e2e tests}; do
  case $part in
    e2e) python3 benchmarks/gpu_e2e.py --gpus $counts 2>&1 | tee "$out/gpu_e2e.log" ;;
    tests) python3 -m pytest -q -rs -p no:cacheprovider -m gpu tests 2>&1 | tee "$out/gpu_tests.log" ;;
    stack) python3 benchmarks/gpu_stack.py 2>&1 | tee "$out/gpu_stack.log" ;;
    *) echo "unknown part $part (e2e, tests, stack)"; exit 2 ;;
  esac
done
