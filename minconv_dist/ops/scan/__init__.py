"""One scan API for h_t = a_t * h_{t-1} + b_t over time, with several implementations behind it.

    h, h_last = scan(a, b, h0=None, method="auto", *, chunk_size=None)
    h, h_last = gate_scan(kind, pre, h0=None, method="auto", *, chunk_size=None)

a, b: [B, T, ...] (any trailing shape); h0: [B, ...] or None (zeros). Gradients flow to a, b
and h0. `h_last` lets a caller carry the state on (chunks, closed-loop forecasting, ranks).
`gate_scan` does the same from a Min cell's conv pre-activations [B, T, k*hidden, H, W]; with
method "triton" (the CUDA default) gates and scan are one fused kernel.
`chunk_size` runs either in time chunks, state carried, recomputed in backward (`run_chunked`).

Modules (all implementations tested against `sequential`), layered as in flash-linear-attention:
- api.py: `scan` and `gate_scan`, the public functions: check, resolve the method, chunk, run.
- registry.py: `SCANS` (method -> implementation), `GATE_SCANS`, and what "auto" resolves to.
- "sequential" (naive.py): plain loop over time, the reference.
- "log" (log_space.py): the paper's official form (cumsum + logcumsumexp); needs positive a, b, h0.
- "doubling" (doubling.py): vectorised log2(T)-step torch scan; CUDA's float64 default.
- "loop" (loop.py): the sequential recurrence with its own backward; the default on the CPU.
- "triton" (triton_scan.py): fused GPU kernel, forward and backward; the default on CUDA.
- chunked.py: `run_chunked`, any of them per time chunk under activation checkpointing.
- across ranks: `sequence_parallel.sequence_parallel_scan` and `sequence_parallel_run` (time split over a
  process group; the Min cells use the latter for time-parallel training).
"""
from minconv_dist.ops.scan.api import gate_scan, scan
from minconv_dist.ops.scan.chunked import run_chunked
from minconv_dist.ops.scan.doubling import scan_doubling
from minconv_dist.ops.scan.log_space import scan_log_space
from minconv_dist.ops.scan.loop import scan_loop
from minconv_dist.ops.scan.naive import scan_sequential
from minconv_dist.ops.scan.registry import GATE_SCANS, SCANS, resolve

__all__ = [
    "scan", "gate_scan", "run_chunked", "SCANS", "GATE_SCANS", "resolve",
    "scan_sequential", "scan_log_space", "scan_doubling", "scan_loop",
]
