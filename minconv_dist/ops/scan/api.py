"""The two public scans: check the inputs, resolve the method, run it whole or in time chunks.

Layered as in flash-linear-attention: the reference (naive.py), the paper's form (log_space.py), the
torch and fused GPU forms (doubling.py, triton_scan.py) and the chunked form (chunked.py) all sit
behind these two functions; registry.py says which exist.
"""
from __future__ import annotations

from torch import Tensor

from minconv_dist.ops.gates import gate_rule
from minconv_dist.ops.scan.chunked import run_chunked
from minconv_dist.ops.scan.registry import GATE_SCANS, SCANS, resolve


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
    fn = SCANS[resolve(method, a)]
    if chunk_size is not None:
        return run_chunked(fn, (a, b), h0, chunk_size)
    return fn(a, b, h0)


def _gate_scan(kind: str, pre: Tensor, h0: Tensor | None, method: str) -> tuple[Tensor, Tensor]:
    method = resolve(method, pre)
    if method in GATE_SCANS:  # gates and scan in one (fused kernel, or the official log form)
        return GATE_SCANS[method](kind, pre, h0)
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
