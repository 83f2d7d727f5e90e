"""Train step (forward + backward + Adam) time and peak memory of the five models, with the official
log-space MinConvGRU path measured in the same run as the baseline.

Set-up (issue 3): 2 layers, 64 channels, 64x64 grid, batch 4, 1 input channel, LayerNorm, zeros
padding, all frames teacher-forced; T = 16, 64, 256; fp32 (TF32 convs) and bf16 autocast.
"official" = our MinConvGRU network with `scan_method="log"`: the official parallel path's
computation (log gates, cat log h0, cumsum + logcumsumexp, exp), step for step.

    PYTHONPATH=. python benchmarks/train_step.py [--profile FILE]
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from benchmarks.common import device_line, time_ms
from minconv_dist.models import ARCHS, build_model

MODELS = [("official", "minconvgru", "log"), *((arch, arch, "auto") for arch in ARCHS)]


def make_step(
    arch: str, scan_method: str, T: int, bf16: bool, B=4, hidden=64, grid=(64, 64), chunk_size=None, norm="layer",
    channels_last: bool = False,
):
    """A closure running one optimiser step on fixed random data.

    channels_last: conv weights in channels-last memory format, so cuDNN's convs read and write NHWC
    (its fast layout for bf16/TF32) instead of transposing around each call; the fused scan reads
    the channels-last pre-activations in place and writes h channels-last."""
    model = build_model(arch, 1, hidden, 2, grid=grid, norm=norm, scan_method=scan_method,
                        chunk_size=chunk_size).cuda()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(B, T, 1, *grid, device="cuda")
    target = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            loss = F.mse_loss(model(x).float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(step) -> tuple[float, float]:
    """(median ms, peak GiB) of a step; nan on out-of-memory."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        ms = time_ms(step, warmup=2, reps=10, budget_ms=4000)
    except torch.cuda.OutOfMemoryError:
        return float("nan"), float("nan")
    return ms, torch.cuda.max_memory_allocated() / 2**30


def profile(path: str, channels_last: bool = False) -> None:
    """Kernel-level profile of the MinConvGRU T=256 step, fp32 and bf16: where the time goes."""
    with open(path, "w") as f:
        for bf16 in (False, True):
            step = make_step("minconvgru", "auto", 256, bf16, channels_last=channels_last)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            f.write(f"== MinConvGRU T=256 {'bf16' if bf16 else 'fp32'} channels_last={channels_last} (3 steps)\n")
            f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--T", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--profile", help="write a kernel profile of the MinConvGRU T=256 step here")
    parser.add_argument("--models", nargs="+", help="only these rows (names as printed; official always)")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "cl"], default=["nchw"],
                        help="memory formats of the conv weights: as built (nchw) and channels_last (cl)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(f"device: {device_line()}")
    print("| T | precision | model | step ms | peak GiB | speed-up vs official | memory / official |")
    print("|---|---|---|---|---|---|---|")
    for T in args.T:
        for bf16 in [p == "bf16" for p in args.precisions]:
            base = None  # the official path as built (NCHW) is the baseline of every row
            for layout in args.layouts:
                for name, arch, method in MODELS:
                    if args.models and name != "official" and name not in args.models:
                        continue
                    ms, gib = measure(make_step(arch, method, T, bf16, channels_last=layout == "cl"))
                    base = base or (ms, gib)
                    label = name if layout == "nchw" else f"{name} (channels_last)"
                    print(f"| {T} | {'bf16' if bf16 else 'fp32'} | {label} | {ms:.1f} | {gib:.2f} "
                          f"| {base[0] / ms:.2f}x | {gib / base[1]:.2f} |", flush=True)
    if args.profile:
        profile(args.profile, channels_last="cl" in args.layouts)


if __name__ == "__main__":
    main()
