"""Vectorised torch scan (Hillis–Steele doubling): log2(T) whole-tensor steps instead of T.

CUDA's float64 default (the fused kernel accumulates in fp32): a loop costs T small kernel launches there,
this one ceil(log2 T) large ones; on the CPU, loop.py's O(T) form is faster. Each step composes every
element with the one 2^k before it, (a, b) -> (a a', a b' + b): only products of a in (0, 1) and sums, so it
is as stable as the sequential form. Work is O(T log T) and autograd keeps each step's tensors; for very
long T pass `chunk_size` to `scan` (see chunked.py).
"""
from __future__ import annotations

import torch
from torch import Tensor


def scan_doubling(a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as `scan_sequential`: a, b [B, T, ...], h0 [B, ...] or None (zeros)."""
    out_dtype, acc_dtype = b.dtype, torch.promote_types(b.dtype, torch.float32)
    a, b = a.to(acc_dtype), b.to(acc_dtype)
    if h0 is not None:  # fold h0 into the first step: h_1 = a_1 h0 + b_1
        b = torch.cat([a[:, :1] * h0.to(acc_dtype).unsqueeze(1) + b[:, :1], b[:, 1:]], dim=1)
    step, T = 1, a.shape[1]
    while step < T:
        b = torch.cat([b[:, :step], a[:, step:] * b[:, :-step] + b[:, step:]], dim=1)
        if 2 * step < T:
            a = torch.cat([a[:, :step], a[:, step:] * a[:, :-step]], dim=1)
        step *= 2
    out = b.to(out_dtype)
    return out, out[:, -1]
