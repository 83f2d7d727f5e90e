"""Chunked scans: the state carried from chunk to chunk, activations recomputed per chunk.

`run_chunked(fn, xs, h0, chunk_size)` is the general helper: it runs `fn(*chunks, h) -> (y, h_last)`
on consecutive time chunks under `torch.utils.checkpoint`, so autograd keeps only each chunk's
inputs (views of xs) and the carried [B, ...] states; everything `fn` makes inside (a conv's
pre-activations, gates, the scan's saved tensors) lives for one chunk at a time, in forward and in
backward. The gradient is exact: checkpointing recomputes, it does not approximate. A Min cell
puts its conv + gates + scan in `fn`, so memory grows with the chunk, not with T.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ChunkFn = Callable[..., tuple[Tensor, Tensor]]


def run_chunked(
    fn: ChunkFn, xs: Sequence[Tensor], h0: Tensor | None, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """y [B, T, ...], h_last from fn(*[x[:, s:s+chunk_size] for x in xs], h) chunk after chunk."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    T = xs[0].shape[1]
    ys, h = [], h0
    for start in range(0, T, chunk_size):
        chunks = [x[:, start:start + chunk_size] for x in xs]
        if torch.is_grad_enabled():
            y, h = checkpoint(fn, *chunks, h, use_reentrant=False)
        else:
            y, h = fn(*chunks, h)
        ys.append(y)
        h = h.clone()  # h is a view into y: a clone lets y's chunk go once it is concatenated
    return torch.cat(ys, dim=1), h
