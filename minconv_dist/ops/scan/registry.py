"""Which scan implementations exist here, and what method="auto" means on this machine.

`SCANS` maps a method name to a scan of (a, b, h0); `GATE_SCANS` maps the methods that have their
own form from a Min cell's pre-activations (gates and scan in one) to it. Triton registers itself
only where it imports, so the CPU stack runs everything on the torch implementations.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from minconv_dist.ops.scan.doubling import scan_doubling
from minconv_dist.ops.scan.log_space import gate_scan_log_space, scan_log_space
from minconv_dist.ops.scan.loop import scan_loop
from minconv_dist.ops.scan.naive import scan_sequential

ScanFn = Callable[[Tensor, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]
GateScanFn = Callable[[str, Tensor, "Tensor | None"], tuple[Tensor, Tensor]]

SCANS: dict[str, ScanFn] = {
    "sequential": scan_sequential,
    "log": scan_log_space,
    "doubling": scan_doubling,
    "loop": scan_loop,
}
GATE_SCANS: dict[str, GateScanFn] = {"log": gate_scan_log_space}

try:  # the CPU stack has no triton; CUDA machines do
    from minconv_dist.ops.scan.triton_scan import gate_scan_triton, scan_triton
except ImportError:
    pass
else:
    SCANS["triton"] = scan_triton
    GATE_SCANS["triton"] = gate_scan_triton


def resolve(method: str, like: Tensor) -> str:
    """The method to run on tensors like `like`: "auto" is triton for CUDA tensors where it imports (doubling
    for float64: the kernel accumulates in fp32), loop on the CPU; a named method is checked, not replaced."""
    if method == "auto":
        if not like.is_cuda:
            return "loop"
        return "triton" if like.dtype != torch.float64 and "triton" in SCANS else "doubling"
    if method not in SCANS:
        raise ValueError(f"unknown scan method {method!r}; expected 'auto' or one of {sorted(SCANS)}")
    if method == "triton" and not like.is_cuda:
        raise ValueError("scan method 'triton' needs CUDA tensors; use 'auto' to fall back to torch")
    return method
