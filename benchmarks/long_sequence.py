"""One training step over a year of hourly frames: 2-layer, 64-channel MinConvGRU on a 32x64 grid,
T = 8760, batch 1, on one GPU. Cells run conv + gates + scan per time chunk under checkpointing
(`build_model(..., chunk_size=...)`), so memory grows with the chunk; the unchunked step is tried alongside.
GroupNorm: torch 2.11's CUDA LayerNorm backward over 560k [32, 64] rows returns a wrongly shaped
weight gradient ("got [64] but expected shape compatible with [32, 64]"), see docs/benchmarks.md.

    PYTHONPATH=. python benchmarks/long_sequence.py
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import device_line
from benchmarks.train_step import make_step, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--T", type=int, default=8760)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 1024, 256])
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {device_line()}")
    print("| T | precision | chunk_size | step ms | peak GiB |")
    print("|---|---|---|---|---|")
    for bf16 in (False, True):
        for chunk in args.chunks:
            step = make_step("minconvgru", "auto", args.T, bf16, B=1, grid=(32, 64), chunk_size=chunk or None,
                             norm="group")
            ms, gib = measure(step)
            del step
            print(f"| {args.T} | {'bf16' if bf16 else 'fp32'} | {chunk or 'none'} | {ms:.0f} | {gib:.1f} |", flush=True)


if __name__ == "__main__":
    main()
