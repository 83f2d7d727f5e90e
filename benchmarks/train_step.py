"""Train step (forward + backward + Adam) time and peak memory of the five models, with the official
log-space MinConvGRU path measured in the same run as the baseline.

Set-up (issue 3): 2 layers, 64 channels, 64x64 grid, batch 4, 1 input channel, LayerNorm, zeros
padding, all frames teacher-forced; T = 16, 64, 256; fp32 (TF32 convs) and bf16 autocast.
"official" = our MinConvGRU network with `scan_method="log"`: the official parallel path's
computation (log gates, cat log h0, cumsum + logcumsumexp, exp), step for step.

    PYTHONPATH=. python benchmarks/train_step.py [--profile FILE]

`--variants` (issue 14, item 2) replaces the table by candidate speed-ups of the MinConvGRU step, each checked
equal to the eager network (outputs and gradients, fp32 with TF32 off, same weights) and then timed A/B
interleaved with the eager network and the official path, all in one process:

    PYTHONPATH=. python benchmarks/train_step.py --T 256 --precisions bf16 fp32 \
        --variants eager pad-copy channels_last compile-residual-norm compile
    PYTHONPATH=. python benchmarks/train_step.py --device cpu --T 4 --grid 8 8 --hidden 4 --variants eager channels_last
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    adam_step, check_equal, cudnn_benchmark, device_line, interleaved_ms, output_and_grads, time_ms,
)
from minconv_dist.models import ARCHS, Network, build_model

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
    x = torch.randn(B, T, 1, *grid, device="cuda")
    return adam_step(model, x, torch.randn_like(x), bf16)


def _pad_copy(model: Network) -> nn.Module:
    """Zero padding as before issue 14: an F.pad copy of each cell conv's input, then an unpadded conv."""
    for cell in model.cells:
        cell.conv.padding = (0, 0)
        cell.conv.register_forward_pre_hook(lambda conv, args: (F.pad(args[0], (1, 1, 1, 1)),))
    return model


def _compile_residual_norm(model: Network) -> nn.Module:
    model.fuse_residual_norm()
    return model


# Each takes the eager MinConvGRU network (weights as the reference's) and returns the variant to time.
TRANSFORMS: dict[str, Callable[[Network], nn.Module]] = {
    "eager": lambda model: model,
    "pad-copy": _pad_copy,  # the same-run "before" of the conv's own zero padding
    # conv weights NHWC: cuDNN reads and writes NHWC; the scan and the norm still see NCHW.
    "channels_last": lambda model: model.to(memory_format=torch.channels_last),
    # add + norm + autocast's casts of each layer fused by Inductor; the rest eager.
    "compile-residual-norm": _compile_residual_norm,
    # the whole network; Inductor also picks the convs' layout (channels-last where it pays) itself.
    "compile": lambda model: torch.compile(model),
    "compile-max-autotune": lambda model: torch.compile(model, mode="max-autotune-no-cudagraphs"),
}
# Global switches set around a variant's steps only (its check included), so the other rows keep the defaults.
FLAGS: dict[str, Callable[[], ContextManager[object]]] = {"cudnn-benchmark": cudnn_benchmark}


def variant_name(name: str) -> str:
    """A variant: TRANSFORMS and FLAGS joined by '+', e.g. `channels_last+cudnn-benchmark`."""
    unknown = [part for part in name.split("+") if part not in TRANSFORMS and part not in FLAGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown part(s) {unknown} of variant {name!r}; "
                                         f"expected '+'-joined names from {[*TRANSFORMS, *FLAGS]}")
    return name


def build_variant(name: str, model: Network) -> tuple[nn.Module, Callable[[], ContextManager[object]]]:
    """(the variant's model, the flags to run its steps under) for a `variant_name`."""
    parts = name.split("+")
    for part in parts:
        model = TRANSFORMS[part](model) if part in TRANSFORMS else model

    @contextlib.contextmanager
    def flags() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in parts:
                if part in FLAGS:
                    stack.enter_context(FLAGS[part]())
            yield

    return model, flags


def compare_variants(names: Sequence[str], Ts: Sequence[int], precisions: Sequence[str], device: torch.device,
                     B: int, hidden: int, grid: tuple[int, int], repeats: int) -> None:
    """Print one row per (T, precision, variant): the variant checked equal to the eager MinConvGRU network,
    then timed interleaved with it and with the official path."""
    print("| T | precision | variant | step ms | speed-up vs official | vs eager | max abs diff (fp32) |")
    print("|---|---|---|---|---|---|---|")
    for T in Ts:
        torch.manual_seed(0)
        official = build_model("minconvgru", 1, hidden, 2, grid=grid, scan_method="log").to(device)
        reference = build_model("minconvgru", 1, hidden, 2, grid=grid).to(device)
        x = torch.randn(B, T, 1, *grid, device=device)
        target = torch.randn_like(x)
        want = output_and_grads(reference, x)
        models, diffs = {}, {}
        for name in names:
            twin = build_model("minconvgru", 1, hidden, 2, grid=grid).to(device)
            twin.load_state_dict(reference.state_dict())
            try:  # a variant that fails to compile or differs gets its row and is not timed; the others go on
                models[name] = build_variant(name, twin)
                with models[name][1]():
                    # compiled kernels reduce in another order: a LayerNorm weight's gradient sums B*T*C terms
                    rtol = 1e-3 if "compile" in name else 1e-4
                    diffs[name] = check_equal(name, output_and_grads(models[name][0], x), want, rtol=rtol)
            except Exception as e:  # noqa: BLE001
                models.pop(name, None)
                print(f"| {T} | fp32 check | {name} | failed: {type(e).__name__}: {str(e)[:300]!r} | | | |")
        for precision in precisions:
            bf16 = precision == "bf16"
            steps = {"official": adam_step(official, x, target, bf16)}
            for name, (model, flags) in models.items():
                steps[name] = adam_step(model, x, target, bf16, flags)
                try:  # the first step compiles for this precision
                    steps[name]()
                except Exception as e:  # noqa: BLE001
                    del steps[name]
                    print(f"| {T} | {precision} | {name} | failed: {type(e).__name__}: {str(e)[:300]!r} | | | |")
            ms = interleaved_ms(steps, device, repeats=repeats)
            eager = ms.get("eager", float("nan"))
            for name in (n for n in names if n in steps):
                print(f"| {T} | {precision} | {name} | {ms[name]:.1f} | {ms['official'] / ms[name]:.2f}x "
                      f"| {eager / ms[name]:.2f}x | {diffs[name]:.1e} |", flush=True)
            print(f"| {T} | {precision} | official | {ms['official']:.1f} | 1.00x | | |", flush=True)
        del official, reference, models, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--profile", help="write a kernel profile of the MinConvGRU T=256 step here")
    parser.add_argument("--models", nargs="+", help="only these rows (names as printed; official always)")
    parser.add_argument("--layouts", nargs="+", choices=["nchw", "cl"], default=["nchw"],
                        help="memory formats of the conv weights: as built (nchw) and channels_last (cl)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--variants", nargs="+", type=variant_name,
                        help=f"instead of the table: these MinConvGRU variants, checked and timed A/B; names from "
                             f"{[*TRANSFORMS, *FLAGS]}, combined with '+'")
    parser.add_argument("--device", default="cuda", help="--variants only: cpu for a tiny dry run (fp32)")
    parser.add_argument("--grid", type=int, nargs=2, default=[64, 64], help="--variants only")
    parser.add_argument("--hidden", type=int, default=64, help="--variants only")
    parser.add_argument("--batch", type=int, default=4, help="--variants only")
    parser.add_argument("--repeats", type=int, default=10, help="--variants only: timed steps of each (median)")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = torch.device(args.device)
    print(f"device: {device_line(device)}")
    if args.variants:
        precisions = args.precisions if device.type == "cuda" else ["fp32"]
        compare_variants(args.variants, args.T, precisions, device, args.batch, args.hidden, tuple(args.grid),
                         args.repeats)
        return
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
