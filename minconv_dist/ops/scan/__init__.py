"""One scan API for h_t = a_t * h_{t-1} + b_t over time, with several implementations behind it.

    h, h_last = scan(a, b, h0=None, method="auto", *, chunk_size=None)
    h, h_last = gate_scan(kind, pre, h0=None, method="auto", *, chunk_size=None)

a, b: [B, T, ...] (any trailing shape); h0: [B, ...] or None (zeros). Gradients flow to a, b
and h0. `h_last` lets a caller carry the state on (chunks, closed-loop forecasting, ranks).
`gate_scan` does the same from a Min cell's conv pre-activations [B, T, k*hidden, H, W]; with
method "triton" (the CUDA default) gates and scan are one fused kernel.
`chunk_size` runs either in time chunks, state carried, recomputed in backward (`run_chunked`).

Implementations (all tested against `sequential`), layered as in flash-linear-attention:
- "sequential" (naive.py): plain loop over time, the reference.
- "log" (log_space.py): the paper's official form (cumsum + logcumsumexp); needs positive a, b, h0.
- "doubling" (doubling.py): vectorised log2(T)-step torch scan; the default off CUDA.
- "triton" (triton_scan.py): fused GPU kernel, forward and backward; the default on CUDA.
- across ranks: `sequence_parallel.sequence_parallel_scan` (time split over a process group).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from minconv_dist.ops.gates import gate_rule
from minconv_dist.ops.scan.chunked import run_chunked
from minconv_dist.ops.scan.doubling import scan_doubling
from minconv_dist.ops.scan.log_space import scan_log_space, scan_log_space_from_logs
from minconv_dist.ops.scan.naive import scan_sequential

ScanFn = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]

SCANS: dict[str, ScanFn] = {
    "sequential": scan_sequential,
    "log": scan_log_space,
    "doubling": scan_doubling,
}

try:  # the CPU stack has no triton; CUDA machines do
    from minconv_dist.ops.scan.triton_scan import gate_scan_triton, scan_triton
except ImportError:
    gate_scan_triton = None
else:
    SCANS["triton"] = scan_triton


def _resolve(method: str, like: Tensor) -> str:
    if method == "auto":
        return "triton" if like.is_cuda and "triton" in SCANS else "doubling"
    if method not in SCANS:
        raise ValueError(f"unknown scan method {method!r}; expected 'auto' or one of {sorted(SCANS)}")
    if method == "triton" and not like.is_cuda:
        raise ValueError("scan method 'triton' needs CUDA tensors; use 'auto' to fall back to torch")
    return method


def _check(a: Tensor, b: Tensor, h0: Tensor | None) -> None:
    if a.shape != b.shape:
        raise ValueError(f"scan: a has shape {tuple(a.shape)} but b has {tuple(b.shape)}")
    if a.dim() < 2 or a.shape[1] == 0:
        raise ValueError(f"scan: expected [B, T>=1, ...], got shape {tuple(a.shape)}")
    if h0 is not None and (h0.shape[0] != a.shape[0] or h0.shape[1:] != a.shape[2:]):
        raise ValueError(
            f"scan: h0 has shape {tuple(h0.shape)}, expected {(a.shape[0], *a.shape[2:])}"
        )


def scan(
    a: Tensor, b: Tensor, h0: Tensor | None = None, method: str = "auto", *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Solve h_t = a_t * h_{t-1} + b_t along dim 1. Returns (h [B, T, ...], h_last [B, ...])."""
    _check(a, b, h0)
    fn = SCANS[_resolve(method, a)]
    if chunk_size is not None:
        return run_chunked(fn, (a, b), h0, chunk_size)
    return fn(a, b, h0)


def _gate_scan(kind: str, pre: Tensor, h0: Tensor | None, method: str) -> tuple[Tensor, Tensor]:
    if method == "log":
        if h0 is None:
            raise ValueError("gate_scan(method='log') needs an explicit positive h0")
        log_a, log_b = gate_rule(kind, log_space=True)(pre)
        log_v = torch.cat([h0.log().unsqueeze(1).to(log_b.dtype), log_b], dim=1)
        h = scan_log_space_from_logs(log_a, log_v)
        return h, h[:, -1]
    method = _resolve(method, pre)
    if method == "triton":
        return gate_scan_triton(kind, pre, h0)
    a, b = gate_rule(kind)(pre)
    return scan(a, b, h0, method=method)


def gate_scan(
    kind: str, pre: Tensor, h0: Tensor | None = None, method: str = "auto", *, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """A Min cell's recurrence from its conv pre-activations pre: [B, T, k*hidden, H, W].

    method="log" reproduces the official parallel path in structure: log gates, then the
    log-space scan with log h0 (h0 must be positive then; the cells' default 0.5 is).
    """
    if chunk_size is not None:
        return run_chunked(lambda p, h: _gate_scan(kind, p, h, method), (pre,), h0, chunk_size)
    return _gate_scan(kind, pre, h0, method)


__all__ = ["scan", "gate_scan", "run_chunked", "SCANS", "scan_sequential", "scan_log_space", "scan_doubling"]
