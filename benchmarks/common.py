"""Timing helpers shared by the benchmark scripts (CUDA events, medians, device copy bandwidth)."""
from __future__ import annotations

import statistics
from typing import Callable

import torch


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


def copy_bandwidth_gbs(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, reps=30)
    del src, dst
    return 2 * nbytes / ms / 1e6


def device_line() -> str:
    props = torch.cuda.get_device_properties(0)
    return f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}"
