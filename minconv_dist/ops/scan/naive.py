"""Plain sequential reference: the definition of the scan, one time step at a time."""
from __future__ import annotations

import torch
from torch import Tensor


def scan_sequential(a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """h_t = a_t * h_{t-1} + b_t along dim 1 of a, b: [B, T, ...]; h0: [B, ...] (zeros if None).

    Accumulates in at least float32; returns (h [B, T, ...], h_last [B, ...]) in b's dtype.
    """
    acc_dtype = torch.promote_types(b.dtype, torch.float32)
    h = torch.zeros_like(b[:, 0], dtype=acc_dtype) if h0 is None else h0.to(acc_dtype)
    states = []
    for t in range(a.shape[1]):
        h = a[:, t].to(acc_dtype) * h + b[:, t].to(acc_dtype)
        states.append(h)
    out = torch.stack(states, dim=1).to(b.dtype)
    return out, out[:, -1]
