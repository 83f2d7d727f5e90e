"""Time-parallel training (parallel.sequence_parallel, issue 15) on S GPUs of one machine, through the worker
loop's own pieces (device_mesh, TimeSplit, build_engine: DeepSpeed, train_step):

1. exactness: one step's gradients on a window that fits one GPU (--check-T, fp32), time-parallel over S ranks
   vs the chunked model on one GPU: max abs and max relative difference;
2. throughput: train steps on a window of --T frames split over the S ranks (each rank holds T / S frames,
   chunked by --chunk inside the rank), seconds per step, frames per second, peak memory per rank;
3. the same window on one GPU, chunked (--single): its peak memory, or that it runs out of memory.

    python benchmarks/time_parallel.py                      # S = 2 GPUs, T = 2 x 8760 at 64x128, 64 channels
    python benchmarks/time_parallel.py --S 1 --T 4096 --no-single   # the baseline: one GPU, the window whole
    python benchmarks/time_parallel.py --device cpu --T 16 --grid 8 16 --hidden 8 --chunk 4   # gloo smoke run

Memory: the network keeps about 1 + 2 L tensors of [T, C, H, W] per window (8.6 GiB each in bf16 per 8760
frames at 64x128, C = 64), plus a few more during backward. With the default 2 layers a rank of 2 x H100 holds
its 8760 frames in about 75 GiB and one GPU cannot hold the whole window; on 2 x H200 (141 GB) one GPU may
just hold 2 layers, so pass --layers 3 there. If an H100 rank runs out of memory, --layers 1 still does not fit
on one H100.

Prints markdown tables for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from minconv_dist.models import build_model  # noqa: E402
from minconv_dist.train import load_config  # noqa: E402
from minconv_dist.train.engine import build_engine  # noqa: E402
from minconv_dist.train.loop import normalized_mse, train_step  # noqa: E402
from minconv_dist.train.time_parallel import TimeSplit, device_mesh  # noqa: E402

CHANNELS = 2  # input channels (variables); --hidden is the model's C


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _window(T: int, args, device: torch.device, frames: tuple[int, int] | None = None) -> torch.Tensor:
    """Frames [first, stop) of a seeded raw window [1, T + 1, CHANNELS, H, W], built in time blocks of 64 frames so
    that every rank cuts the same numbers without holding the whole window."""
    first, stop = frames or (0, T + 1)
    parts = []
    for block in range(first // 64, (stop - 1) // 64 + 1):
        g = torch.Generator().manual_seed(block)
        part = torch.randn(1, 64, CHANNELS, *args.grid, generator=g)
        lo, hi = max(first, block * 64) - block * 64, min(stop, block * 64 + 64) - block * 64
        parts.append(part[:, lo:hi])
    return torch.cat(parts, dim=1).to(device)


def _setup(T: int, args, precision: str):
    """The run's config (chunked Min cell, ZeRO-0), a seeded model on the CPU."""
    cfg = load_config(overrides=[
        f"model.arch={args.arch}", f"model.hidden_size={args.hidden}", f"model.layers={args.layers}",
        f"model.chunk_size={args.chunk}", "model.padding=cylinder", f"data.sequence_length={T}",
        f"data.teacher_steps={T - args.closed}", "data.batch_size=1", f"parallel.num_workers={args.S}",
        f"parallel.sequence_parallel={args.S}", f"parallel.precision={precision}", "optim.warmup_steps=0"])
    torch.manual_seed(0)
    m = cfg.model
    model = build_model(m.arch, CHANNELS, m.hidden_size, m.layers, padding=m.padding, norm=m.norm,
                        grid=tuple(args.grid), chunk_size=m.chunk_size)
    return cfg, model


def _check(args, device: torch.device, time_split: TimeSplit, dtype: torch.dtype) -> str | None:
    """Gradients of one step on --check-T frames in `dtype`: time-parallel vs one device (rank 0), and the floor:
    the one-device model at twice the chunk. Returns rank 0's two table rows. float64 (its scans in torch's
    doubling form, DeepSpeed's averaging by `_Mean`) tells rounding from a systematic difference."""
    T = min(args.check_T, args.T)
    torch.backends.cudnn.allow_tf32 = False  # fp32 convs: the two runs' convs batch their frames differently
    cfg, model = _setup(T, args, "fp32")
    model = model.to(device, dtype)
    k = cfg.data.teacher_steps
    reference = copy.deepcopy(model) if dist.get_rank() == 0 else None
    floor = copy.deepcopy(model) if dist.get_rank() == 0 else None
    split = TimeSplit(time_split.index, time_split.count, T, time_split.group)
    engine = build_engine(cfg, model, total_steps=1, device=device) if dtype == torch.float32 else _Mean(model)
    loss, _, _ = normalized_mse(engine, _window(T, args, device, split.frames(k)).to(dtype), k, time=split)
    engine.backward(loss)  # ZeRO-0: the gradients, averaged over the ranks, are in .grad
    grads = {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()}
    del engine, model, loss
    rows = None
    if reference is not None:
        x = _window(T, args, device).to(dtype)
        for cell in floor.cells:
            cell.chunk_size = 2 * args.chunk
        want = _one_device_grads(reference, x, k)
        name = str(dtype)[6:]
        rows = (f"| {T} | {k} | {args.S} | {args.chunk} | {name} | {_worst(grads, want)} |\n"
                f"| {T} | {k} | 1, chunk {2 * args.chunk} (the floor) | {args.chunk} | {name} "
                f"| {_worst(_one_device_grads(floor, x, k), want)} |")
        del reference, floor, x
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    return rows


class _Mean(torch.nn.Module):
    """The model with DeepSpeed's gradient averaging over the ranks, for float64 (which DeepSpeed cannot reduce)."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        for p in self.module.parameters():
            dist.all_reduce(p.grad)
            p.grad /= dist.get_world_size()


def _one_device_grads(model: torch.nn.Module, x: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    normalize = model.normalizer.normalize
    F.mse_loss(normalize(model(x[:, :-1], teacher_steps=k)), normalize(x[:, 1:])).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _worst(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> str:
    """Three table cells: the max abs diff; the largest over parameters of (max abs diff / max abs gradient); that
    parameter's name and max abs gradient."""
    diffs = {n: ((got[n] - g).abs().max().item(), g.abs().max().item()) for n, g in want.items()}
    name = max(diffs, key=lambda n: diffs[n][0] / diffs[n][1])
    d, m = diffs[name]
    return f"{max(d for d, _ in diffs.values()):.2e} | {d / m:.2e} | {name} (max abs grad {m:.1e})"


def _throughput(args, device: torch.device, time_split: TimeSplit | None) -> str | None:
    """Seconds per train step on the long window split over the ranks (--S 1: whole on one device, the
    baseline); rank 0's table row."""
    precision = "bf16" if args.bf16 else "fp32"
    torch.backends.cudnn.allow_tf32 = True
    cfg, model = _setup(args.T, args, precision)
    k = cfg.data.teacher_steps
    engine = build_engine(cfg, model.to(device), total_steps=args.steps + 1, device=device)
    frames = time_split.frames(k) if time_split else (0, args.T + 1)
    x = _window(args.T, args, device, frames)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.steps + 1):  # the first step warms up (allocator, cuDNN, Triton)
        _sync(device)
        dist.barrier()
        start = time.perf_counter()
        train_step(engine, x, k, 0.0, time_split)
        _sync(device)
        dist.barrier()
        times.append(time.perf_counter() - start)
    peak = torch.tensor(_peak_gib(device), device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    seconds = min(times[1:])
    del engine, model, x
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    first, stop = time_split.teacher_frames(k) if time_split else (0, k)
    return (f"| {args.T} | {k} | {args.S} | {stop - first} | {args.chunk} | {precision} | {seconds:.2f} "
            f"| {args.T / seconds:.0f} | {peak.item():.1f} |")


def _single(args, device: torch.device) -> str:
    """The long window on one device, chunked: forward + backward's peak memory, or out of memory. The model in
    bf16 as DeepSpeed's bf16 mode holds it (its fp32 master weights and Adam states are small beside this)."""
    precision = "bf16" if args.bf16 else "fp32"
    cfg, model = _setup(args.T, args, precision)
    model = model.to(device, torch.bfloat16 if args.bf16 else torch.float32)
    k = cfg.data.teacher_steps
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        x = _window(args.T, args, device)
        normalize = model.normalizer.normalize
        loss = F.mse_loss(normalize(model(x[:, :-1], teacher_steps=k)), normalize(x[:, 1:]))
        loss.backward()
        _sync(device)
        result = f"runs, peak {_peak_gib(device):.1f} GiB"
    except torch.OutOfMemoryError:
        result = f"out of memory (at {_peak_gib(device):.1f} GiB allocated)"
    return f"| {args.T} | {args.chunk} | {precision} | {result} |"


def _worker(rank: int, args, port: int) -> None:
    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(args.S), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=args.S,
                            **({"device_id": device} if cuda else {}))
    try:
        time_split = TimeSplit.of(device_mesh(args.S, args.S, device.type), args.T) if args.S > 1 else None
        checks = [_check(args, device, time_split, getattr(torch, d)) for d in args.check_dtype if time_split]
        row = _throughput(args, device, time_split)
        single = _single(args, device) if args.single and rank == 0 else None
        dist.barrier()
        if rank == 0:
            name = torch.cuda.get_device_name(device) if cuda else "CPU (gloo)"
            print(f"# {' '.join(sys.argv)}\n# {datetime.date.today()}, {args.S} x {name}, torch {torch.__version__}, "
                  f"{args.arch} {args.layers} x {args.hidden} channels, {CHANNELS} input channels, "
                  f"{args.grid[0]}x{args.grid[1]}, batch 1\n")
            if checks:
                print("Gradients of one step, time-parallel vs one device (chunked):\n")
                print("| T | teacher steps | S | chunk | precision | max abs diff | max diff / max abs grad "
                      "| worst parameter |")
                print("|---|---|---|---|---|---|---|---|")
                print("\n".join(checks) + "\n")
            print("Train steps (DeepSpeed ZeRO-0, AdamW), the window split over the S ranks:\n")
            print("| T | teacher steps | S | teacher frames of rank 0 | chunk | precision | s/step | frames/s "
                  "| peak GiB/rank |")
            print("|---|---|---|---|---|---|---|---|---|")
            print(row + "\n")
            if single:
                print("The same window on one device:\n")
                print("| T | chunk | precision | one device |")
                print("|---|---|---|---|")
                print(single, flush=True)
    finally:
        dist.destroy_process_group()
    # Past the tables, without the interpreter's exit: on gloo, a process that ran a checkpointed backward aborts
    # now and then while it exits (torch 2.13; tests/spawned.py).
    sys.stdout.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--S", type=int, default=2, help="time ranks (one GPU each)")
    parser.add_argument("--T", type=int, default=2 * 8760, help="frames predicted per window")
    parser.add_argument("--closed", type=int, default=4, help="closed-loop steps (on the last rank)")
    parser.add_argument("--check-T", type=int, default=1024, help="window of the gradient check (fits one device)")
    parser.add_argument("--check-dtype", choices=["float32", "float64"], nargs="+", default=["float32"],
                        help="float64 (scans in torch's doubling form) tells rounding from a systematic difference")
    parser.add_argument("--grid", type=int, nargs=2, default=[64, 128])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--arch", default="minconvgru")
    parser.add_argument("--chunk", type=int, default=256, help="frames per chunk inside a rank")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="train in fp32 (default bf16 on CUDA)")
    parser.add_argument("--single", action=argparse.BooleanOptionalAction, default=None,
                        help="also try the long window on one device (default: on CUDA)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        args.bf16 = False
    if args.single is None:
        args.single = args.device == "cuda"
    if args.device == "cuda" and torch.cuda.device_count() < args.S:
        parser.error(f"--S {args.S} needs {args.S} GPUs, this machine has {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.S, join=True)


if __name__ == "__main__":
    main()
