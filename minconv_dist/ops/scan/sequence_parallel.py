"""Sequence (context) parallel recurrences: each rank of a process group holds one time block.

A linear recurrence h_t = a_t * h_{t-1} + b_t carries its state through a block as an affine map,
h_last = P * start + E (P = prod a, E = the end state from a zero start), and a block's h depends on its
start through the same diagonal products. So the blocks can run at once:

Forward: each rank reduces its block to (P, E) (no autograd), the ranks all-gather these [B, ...] pairs,
each folds the maps of the ranks before it into its true start, and its block runs from there, under
autograd (and in time chunks, if asked).
Backward: what a block owes the ranks after it enters at its last state. Each rank computes q = the
gradient of its own loss at its start, sum_t (prod_{s<=t} a_s) dh_t, the (P, q) are all-gathered, each rank
folds those of the ranks after it into u = dL_later/dh_last and adds u to the gradient of its last state
(in time chunks: the last chunk's, so no copy of dh); autograd then goes back through the block once, with
the exact gradient for every input and parameter.

Extra work per block: the coefficients (a, b) are computed twice more without autograd (for (P, E) in
forward, for q in backward), chunk by chunk, so memory stays that of one chunk. Traffic between ranks: one
[2, B, ...] all-gather in forward and one in backward, independent of T.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from minconv_dist.ops.scan.api import scan
from minconv_dist.ops.scan.chunked import run_chunked

Coefficients = Callable[..., tuple[Tensor, Tensor]]  # (*chunks) -> (a, b), each [B, t, ...]
BlockRun = Callable[..., tuple[Tensor, Tensor]]  # (*chunks, h) -> (h_seq [B, t, ...], h_last)


def _gather(x: Tensor, group) -> Tensor:
    """[2, B, ...] from every rank -> [world, 2, B, ...]."""
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.stack(out)


def _chunks(xs: Sequence[Tensor], chunk_size: int | None) -> Iterator[list[Tensor]]:
    T = xs[0].shape[1]
    step = chunk_size or T
    for start in range(0, T, step):
        yield [x[:, start:start + step] for x in xs]


def _block_map(coefficients: Coefficients, xs: Sequence[Tensor], chunk_size: int | None) -> Tensor:
    """(P, E) of this block, stacked [2, B, ...], in at least float32."""
    P = E = None
    for chunk in _chunks(xs, chunk_size):
        a, b = coefficients(*chunk)
        acc = torch.promote_types(b.dtype, torch.float32)
        _, E = scan(a.to(acc), b.to(acc), E)
        P = a.to(acc).prod(dim=1) * (1 if P is None else P)
    return torch.stack([P, E])


def _adjoint_map(coefficients: Coefficients, xs: Sequence[Tensor], dh: Tensor, chunk_size: int | None
                 ) -> tuple[Tensor, Tensor]:
    """(P, q) of this block, in at least float32: q = sum_t (prod_{s<=t} a_s) dh_t, the gradient at its start
    of a loss whose gradient at h is dh."""
    P = q = None
    step = chunk_size or dh.shape[1]
    for i, chunk in enumerate(_chunks(xs, chunk_size)):
        a = coefficients(*chunk)[0]
        acc = torch.promote_types(dh.dtype, torch.float32)
        prods = a.to(acc).cumprod(dim=1) * (1 if P is None else P.unsqueeze(1))
        part = (prods * dh[:, i * step:(i + 1) * step].to(acc)).sum(dim=1)
        q = part if q is None else q + part
        P = prods[:, -1]
    return P, q


class _CarryOut(torch.autograd.Function):
    """Identity on a block's (h [B, T_r, ...], h_last [B, ...]); backward adds to h_last's gradient what the
    later ranks' losses owe to this block's last state."""

    @staticmethod
    def forward(ctx, h: Tensor, last: Tensor, coefficients: Coefficients, group, chunk_size: int | None,
                *xs: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(*xs)
        ctx.coefficients, ctx.group, ctx.chunk_size = coefficients, group, chunk_size
        return h.view_as(h), last.view_as(last)

    @staticmethod
    def backward(ctx, dh: Tensor, dlast: Tensor):
        group = ctx.group
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        with torch.no_grad():
            P, q = _adjoint_map(ctx.coefficients, ctx.saved_tensors, dh, ctx.chunk_size)
            maps = _gather(torch.stack([P, q + P * dlast]), group)  # h_last is h's last step: its gradient too
        u = torch.zeros_like(maps[0, 0])
        for r in range(world - 1, rank, -1):
            u = maps[r, 0] * u + maps[r, 1]
        return (dh, dlast + u.to(dlast.dtype), None, None, None, *(None for _ in ctx.saved_tensors))


def sequence_parallel_run(
    run: BlockRun, coefficients: Coefficients, xs: Sequence[Tensor], h0: Tensor | None, *, group=None,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """This rank's block of a recurrence split in time over the ranks of `group` (in rank order).

    xs: this rank's inputs [B, T_r, ...]; `run(*xs, h)` solves the recurrence from state h and must equal
    `scan(*coefficients(*xs), h)`: a Min cell passes its conv + gates + scan and its conv + gates.
    h0 [B, ...]: the global initial state, used by rank 0 only (None: zeros); its gradient comes back on
    rank 0 (the other ranks do not use it). chunk_size: run the block in time chunks (`run_chunked`).
    Returns this rank's (h, h_last); the global final state is the last rank's h_last.
    """
    rank = dist.get_rank(group)
    with torch.no_grad():
        maps = _gather(_block_map(coefficients, xs, chunk_size), group)
    start = h0
    if rank > 0:
        start = torch.zeros_like(maps[0, 0]) if h0 is None else h0.detach().to(maps.dtype)
        for r in range(rank):
            start = maps[r, 0] * start + maps[r, 1]
        if h0 is not None:
            start = start.to(h0.dtype)
    # chunked, h_last is a copy of the last chunk's state: u reaches that chunk alone, and a closed loop that
    # saves h_last does not keep h alive
    h, last = run(*xs, start) if chunk_size is None else run_chunked(run, xs, start, chunk_size)
    return _CarryOut.apply(h, last, coefficients, group, chunk_size, *xs)


def sequence_parallel_scan(
    a: Tensor, b: Tensor, h0: Tensor | None = None, *, group=None, method: str = "auto",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """`scan` over a sequence split in time across the ranks of `group` (default: the world): a, b
    [B, T_r, ...] are this rank's slice."""
    return sequence_parallel_run(functools.partial(scan, method=method), lambda a, b: (a, b), (a, b), h0,
                                 group=group, chunk_size=chunk_size)
