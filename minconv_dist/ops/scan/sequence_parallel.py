"""Sequence (context) parallel scan: each rank of a process group holds one time slice.

Forward: every rank reduces its slice to the affine map h -> A h + E (A = prod a, E = the end state
from a zero start), the ranks all-gather these [B, ...] pairs, each rank folds the maps of the ranks
before it into its true initial state, and a second local scan from that state (the fix-up) gives
exact values. Backward mirrors it: each rank's adjoint leaving its first step is P u + Q in the
adjoint u arriving at its last step (P = prod a), the (P, Q) are all-gathered, each rank folds those
of the ranks after it into its u, and the local backward runs once more with u added. Traffic
between ranks: two [2, B, ...] all-gathers per pass, independent of T.

Contract: a, b [B, T_r, ...] are this rank's slice (ranks in time order); h0 [B, ...] is the global
initial state, used by rank 0 only. Returns this rank's (h, h_last); the global final state is
rank world-1's h_last. dL/dh0 (for L summed over all ranks) comes back on rank 0, zeros elsewhere,
so summing h0's gradient over ranks (as data parallelism does) gives the exact total.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from minconv_dist.ops.scan.api import scan


def _gather(x: Tensor, group) -> Tensor:
    """[2, B, ...] from every rank -> [world, 2, B, ...]."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


class _SequenceParallelScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor | None, group, method: str) -> Tensor:
        rank = dist.get_rank(group)
        acc = torch.promote_types(b.dtype, torch.float32)
        _, end = scan(a, b, None, method=method)
        maps = _gather(torch.stack([a.to(acc).prod(dim=1), end.to(acc)]), group)
        start = torch.zeros_like(maps[0, 0]) if h0 is None else h0.to(acc)
        for r in range(rank):
            start = maps[r, 0] * start + maps[r, 1]
        ctx.save_for_backward(a, b, start)
        ctx.group, ctx.method, ctx.h0_dtype = group, method, None if h0 is None else h0.dtype
        h, _ = scan(a, b, start, method=method)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        a, b, start = ctx.saved_tensors
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (a, b, start)]
            h, _ = scan(*leaves, method=ctx.method)
            # local pass with no adjoint from later ranks: Q = dL_local/dstart
            (q,) = torch.autograd.grad(h, leaves[2], dh, retain_graph=True)
            acc = q.dtype
            maps = _gather(torch.stack([a.to(acc).prod(dim=1), q]), group)
            u = torch.zeros_like(q)
            for r in range(world - 1, rank, -1):
                u = maps[r, 0] * u + maps[r, 1]
            dh = dh.clone()
            dh[:, -1] += u.to(dh.dtype)
            da, db, dstart = torch.autograd.grad(h, leaves, dh)
        dh0 = None
        if ctx.h0_dtype is not None:
            dh0 = (dstart if rank == 0 else torch.zeros_like(dstart)).to(ctx.h0_dtype)
        return da, db, dh0, None, None


def sequence_parallel_scan(
    a: Tensor, b: Tensor, h0: Tensor | None = None, *, group=None, method: str = "auto"
) -> tuple[Tensor, Tensor]:
    """`scan` over a sequence split in time across the ranks of `group` (default: the world)."""
    h = _SequenceParallelScan.apply(a, b, h0, group, method)
    return h, h[:, -1]
