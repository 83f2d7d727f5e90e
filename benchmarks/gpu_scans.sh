#!/usr/bin/env bash
# Issue 3 on one GPU: GPU scan tests, scan / train-step / T=8760 benchmarks; logs under $OUT (or ./outputs).
# Issue 14: `baselines` (ConvLSTM/ConvGRU against a plain per-step loop) and `variants` (bf16 MinConvGRU step).
# Usage: bash benchmarks/gpu_scans.sh [tests|scan|train|long|baselines|variants]...   (default: the first four)
set -o pipefail
out=${OUT:-outputs}; mkdir -p "$out"
export PYTHONPATH=. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/device.txt"
for part in "${@:-tests scan train long}"; do
  for p in $part; do
    case $p in
      tests) timeout 170 python3 -m pytest -q -rs -n 8 --noconftest -p no:cacheprovider tests/test_scan_triton.py 2>&1 | tee "$out/gpu_tests.log" ;;
      scan) timeout 210 python3 benchmarks/scan.py 2>&1 | tee "$out/scan.log" ;;
      train) timeout 190 python3 benchmarks/train_step.py --profile "$out/profile.txt" 2>&1 | tee "$out/train_step.log" ;;
      long) timeout 150 python3 benchmarks/long_sequence.py 2>&1 | tee "$out/long_sequence.log" ;;
      baselines) timeout 200 python3 benchmarks/baselines.py 2>&1 | tee "$out/baselines.log" ;;
      variants) timeout 330 python3 benchmarks/train_step.py --T 256 --precisions bf16 fp32 \
          --variants eager pad-copy channels_last compile-residual-norm compile 2>&1 | tee "$out/variants.log" ;;
    esac
  done
done
