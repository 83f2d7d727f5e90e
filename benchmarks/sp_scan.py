"""The sequence-parallel scan over the current process group against the single-device scan (used by
benchmarks/gpu_stack.py inside Ray Train workers)."""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from minconv_dist.ops.scan import scan
from minconv_dist.ops.scan.sequence_parallel import sequence_parallel_scan

BLOCK = 8  # time steps per seeded block: any rank can rebuild any block of the global sequence


def _blocks(first: int, count: int, C: int, grid: tuple[int, int], device: torch.device):
    """a, b for time blocks [first, first + count), each block from its own seed."""
    parts = [torch.randn(2, 1, BLOCK, C, *grid, device=device, generator=torch.Generator(device).manual_seed(k))
             for k in range(first, first + count)]
    raw = torch.cat(parts, dim=2)
    return torch.sigmoid(raw[0] + 2), 0.1 * raw[1]


def largest_t(C: int, grid: tuple[int, int], device: torch.device, world: int) -> int:
    """The longest T whose slices fit every rank: ~8 fp32 [T/world, C, H, W] tensors (a, b, h, their grads,
    the fix-up) in 85% of the free memory; the smallest over ranks."""
    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else 2**28
    per_rank = int(0.85 * free / (8 * 4 * C * grid[0] * grid[1])) // BLOCK * BLOCK
    t = torch.tensor(per_rank * world, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def sp_scan_check(device: torch.device, T: int, C: int, grid: tuple[int, int], single: bool,
                  repeats: int = 3) -> dict[str, Any]:
    """Time fwd+bwd of the sequence-parallel scan of T steps over the world (T=0: the largest that fits),
    check each rank's h against the single-device scan block by block, and (`single`) time the whole
    sequence on rank 0 with the chunked scan."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    T = T or largest_t(C, grid, device, world)
    T -= T % (world * BLOCK)
    per = T // world // BLOCK
    a, b = _blocks(rank * per, per, C, grid, device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    times = []
    for _ in range(repeats + 1):
        sync()
        dist.barrier()
        start = time.perf_counter()
        h, _ = sequence_parallel_scan(a, b)
        h.square().mean().backward()
        sync()
        dist.barrier()
        times.append(time.perf_counter() - start)
    h = h.detach()
    del a, b
    state, worst = None, 0.0
    with torch.no_grad():  # the single-device scan, forward, block by block with the state carried
        for k in range((rank + 1) * per):
            ak, bk = _blocks(k, 1, C, grid, device)
            ref, state = scan(ak, bk, state)
            if k >= rank * per:
                local = h[:, (k - rank * per) * BLOCK:(k - rank * per + 1) * BLOCK]
                worst = max(worst, (local - ref).abs().max().item())
    worst_t = torch.tensor(worst, device=device)
    dist.all_reduce(worst_t, op=dist.ReduceOp.MAX)
    del h
    single_s = float("nan")
    if single and rank == 0:
        try:
            fa, fb = _blocks(0, T // BLOCK, C, grid, device)
            fa.requires_grad_(True)
            fb.requires_grad_(True)
            for _ in range(2):
                sync()
                start = time.perf_counter()
                out, _ = scan(fa, fb, chunk_size=512)
                out.square().mean().backward()
                sync()
                single_s = time.perf_counter() - start
            del fa, fb, out
        except torch.OutOfMemoryError:
            single_s = float("inf")
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dist.barrier()
    return {"T": T, "sp_s": min(times[1:]), "single_s": single_s, "max_abs_err": worst_t.item()}
