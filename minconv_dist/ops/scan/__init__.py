"""One scan API for h_t = a_t * h_{t-1} + b_t over time, with several implementations behind it.

    h, h_last = scan(a, b, h0=None, method="auto")

a, b: [B, T, ...] (any trailing shape); h0: [B, ...] or None (zeros). Gradients flow to a, b
and h0. `h_last` lets a caller carry the state on (chunks, closed-loop forecasting, ranks).

`gate_scan(kind, pre, h0)` is the same for a Min cell's conv pre-activations: gates + scan,
fused into one kernel where a fused kernel exists.

Implementations (all tested against `sequential`):
- "sequential": plain loop over time (the reference; the CPU default).
- "log": the paper's log-space form (cumsum + logcumsumexp); needs positive a, b, h0.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from minconv_dist.ops.gates import gate_rule
from minconv_dist.ops.scan.log_space import scan_log_space, scan_log_space_from_logs
from minconv_dist.ops.scan.naive import scan_sequential

ScanFn = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]

SCANS: dict[str, ScanFn] = {
    "sequential": scan_sequential,
    "log": scan_log_space,
}


def _resolve(method: str, like: Tensor) -> str:
    if method == "auto":
        return "sequential"
    if method not in SCANS:
        raise ValueError(f"unknown scan method {method!r}; expected 'auto' or one of {sorted(SCANS)}")
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


def scan(a: Tensor, b: Tensor, h0: Tensor | None = None, method: str = "auto") -> tuple[Tensor, Tensor]:
    """Solve h_t = a_t * h_{t-1} + b_t along dim 1. Returns (h [B, T, ...], h_last [B, ...])."""
    _check(a, b, h0)
    return SCANS[_resolve(method, a)](a, b, h0)


def gate_scan(kind: str, pre: Tensor, h0: Tensor | None = None, method: str = "auto") -> tuple[Tensor, Tensor]:
    """A Min cell's recurrence from its conv pre-activations pre: [B, T, k*hidden, H, W].

    method="log" reproduces the official parallel path bit for bit in structure: log gates, then
    the log-space scan with log h0 (h0 must be positive then; the cells' default 0.5 is).
    """
    if method == "log":
        log_a, log_b = gate_rule(kind, log_space=True)(pre)
        if h0 is None:
            raise ValueError("gate_scan(method='log') needs an explicit positive h0")
        log_v = torch.cat([h0.log().unsqueeze(1).to(log_b.dtype), log_b], dim=1)
        h = scan_log_space_from_logs(log_a, log_v)
        return h, h[:, -1]
    a, b = gate_rule(kind)(pre)
    return scan(a, b, h0, method=method)


__all__ = ["scan", "gate_scan", "SCANS", "scan_sequential", "scan_log_space"]
