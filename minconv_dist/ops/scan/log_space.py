"""The paper's log-space scan (official form): cumsum + logcumsumexp over time.

Needs a > 0, b > 0 and h0 > 0 (all Min cells satisfy a, b > 0). It is kept as the faithful
reproduction of the official parallel path, not for speed: it moves several full-size
intermediates through memory (see docs/benchmarks.md). `gate_scan_log_space` is that path whole:
the log gate rule straight into the scan, never forming a or b.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from minconv_dist.ops.gates import gate_rule


def scan_log_space_from_logs(log_a: Tensor, log_v: Tensor) -> Tensor:
    """Official form. log_a: [B, T, ...]; log_v = [log h0, log b_1..T]: [B, T+1, ...] -> h [B, T, ...]."""
    pad = [0, 0] * (log_a.dim() - 2) + [1, 0]
    a_star = F.pad(torch.cumsum(log_a, dim=1), pad)
    log_h = a_star + torch.logcumsumexp(log_v - a_star, dim=1)
    return torch.exp(log_h)[:, 1:]


def scan_log_space(a: Tensor, b: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as `scan_sequential`; h0 = None means a zero initial state."""
    acc_dtype = torch.promote_types(b.dtype, torch.float32)
    log_a = a.to(acc_dtype).log()
    log_b = b.to(acc_dtype).log()
    if h0 is None:
        log_h0 = torch.full_like(log_b[:, :1], float("-inf"))
    else:
        log_h0 = h0.to(acc_dtype).log().unsqueeze(1)
    h = scan_log_space_from_logs(log_a, torch.cat([log_h0, log_b], dim=1)).to(b.dtype)
    return h, h[:, -1]


def gate_scan_log_space(kind: str, pre: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """A Min cell's recurrence as the official code computes it: log gates, log h0, log-space scan."""
    if h0 is None:
        raise ValueError("gate_scan(method='log') needs an explicit positive h0")
    log_a, log_b = gate_rule(kind, log_space=True)(pre)
    log_v = torch.cat([h0.log().unsqueeze(1).to(log_b.dtype), log_b], dim=1)
    h = scan_log_space_from_logs(log_a, log_v)
    return h, h[:, -1]
