"""Timing helpers shared by the benchmark scripts (CUDA events, medians, A/B interleaving, device copy bandwidth,
the training step they time)."""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def time_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 10, budget_ms: float = 3000.0) -> float:
    """Median wall time of fn() on the GPU in ms, measured with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    while len(times) < reps and sum(times) < budget_ms:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def queued_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20) -> float:
    """Device time per call of fn() in ms: `reps` calls queued back to back between two CUDA events, so the host's
    launch overhead hides behind the device's work as it does in a training step (a kernel's own speed; `time_ms`
    counts the host too, which dominates a launch shorter than about 0.5 ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def graph_ms(fn: Callable[[], object], warmup: int = 3, reps: int = 20, replays: int = 5) -> float:
    """Device time per call of fn() in ms with no host work in it: `reps` calls captured in one CUDA graph, replayed
    `replays` times between CUDA events (median). `queued_ms` measures the host instead where one call's launch path
    takes longer than its kernels (a forward+backward through autograd costs the H200 machine's host 0.4-0.6 ms:
    docs/benchmarks.md, "Speed II, item 1"). fn must not synchronise; warm-up (autotuning) runs before the capture,
    on a side stream as capture requires."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 2,
                   repeats: int = 7, clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median wall time in ms of each fn, called in turn (A, B, C, A, B, C, ...) so drifts of clock and
    temperature fall on all alike. Synchronises around each call, so host launch overhead counts (as it
    does in training). `clock=time.process_time`: this process's CPU time instead (all its threads), the
    cost measure on a CPU shared with other jobs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = clock()
            fn()
            sync()
            times[name].append((clock() - start) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


@contextlib.contextmanager
def cudnn_benchmark() -> Iterator[None]:
    """cuDNN times its algorithms for each new conv shape and keeps the fastest (fixed shapes: once)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def adam_step(model: nn.Module, x: Tensor, target: Tensor, bf16: bool,
              flags: Callable[[], ContextManager[object]] = contextlib.nullcontext) -> Callable[[], None]:
    """A closure running one optimiser step of model on fixed data: forward (bf16 autocast if asked), MSE,
    backward, Adam; all under `flags()` (e.g. `cudnn_benchmark`)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step() -> None:
        with flags():
            with torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = F.mse_loss(model(x).float(), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def output_and_grads(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """model(x) and the gradients of sum(model(x)^2) w.r.t. its parameters (zeros where unused), in fp32 with
    TF32 off: what a variant must reproduce before it is timed."""
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        y = model(x)
        grads = torch.autograd.grad(y.square().sum(), list(model.parameters()), materialize_grads=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return y.detach(), list(grads)


def check_equal(name: str, got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]],
                rtol: float = 1e-4) -> float:
    """Max abs difference of the outputs; raises unless outputs and every gradient agree to `rtol` of their
    largest magnitude (fp32 tolerance)."""
    for i, (a, b) in enumerate(zip([got[0], *got[1]], [want[0], *want[1]], strict=True)):
        if a.shape != b.shape:
            raise AssertionError(f"{name}: tensor {i} has shape {tuple(a.shape)}, the reference {tuple(b.shape)}")
        err, scale = (a - b).abs().max().item(), b.abs().max().item()
        if not err <= rtol * max(scale, 1.0):
            what = "output" if i == 0 else f"gradient {i - 1}"
            raise AssertionError(f"{name}: {what} differs from the reference by {err:.3g} (scale {scale:.3g})")
    return (got[0] - want[0]).abs().max().item()


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, reps=30)
    del src, dst
    return 2 * nbytes / ms / 1e6


def device_line(device: torch.device | None = None) -> str:
    if device is not None and device.type != "cuda":
        return f"{device.type}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}"
