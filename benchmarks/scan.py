"""Scan alone: GB/s of the fused Triton kernel, the official log-space form and the sequential loop,
forward and forward+backward, against the device copy bandwidth measured in the same run; then the
fused gate+scan of each Min cell against the bare scan.

Peers (fp32 and bf16, when `fla` imports; else a printed line says they are skipped): flash-linear-attention's
first-order recurrences `fla.ops.hgrn.fused_recurrent_hgrn` ("fla-fused") and `chunk_hgrn` ("fla-chunk"), which
solve h_t = exp(g_t) h_{t-1} + x_t on [B, T, D]: fed g = log(a), computed before the timing, x = b and the same dh.

Traffic counted: forward reads a, b and writes h (3 tensors); backward reads a, h, dh and writes
da, db (5); fused gate+scan reads the k pre-activation blocks instead of a, b.

Times are device time per call, launches queued back to back (`queued_ms`), as in a training step where the host
runs ahead; `--timing synced` waits for each call, so the host's launch overhead counts too (the metric of issues
3-14: at the short walks it measured the host, not the kernel: docs/benchmarks.md, "the scan at copy bandwidth");
`--timing graph` replays the calls from a CUDA graph (`graph_ms`: the kernels alone, for the calls whose host path
is longer than their kernels even queued).

    PYTHONPATH=. python benchmarks/scan.py [--timing queued|synced|graph] [--methods triton fla-fused fla-chunk]
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import Tensor

from benchmarks.common import copy_bandwidth_gbs, device_line, graph_ms, queued_ms, time_ms
from minconv_dist.ops.gates import GATES, gate_rule
from minconv_dist.ops.scan import gate_scan, scan

SHAPES = [(8, 64, 262144), (4, 256, 65536), (1, 8192, 131072), (16, 24, 65536)]  # the last: the paper's window
PEERS = ["fla-fused", "fla-chunk"]  # timed in bf16 too
METHODS = ["triton", "log", "sequential", *PEERS]


Timer = Callable[..., float]
TIMERS: dict[str, Timer] = {"queued": queued_ms, "synced": time_ms, "graph": graph_ms}


def _peers(methods: list[str]) -> dict[str, Callable]:
    """The fla kernels asked for, or none (and a printed line) when fla does not import."""
    if not set(methods) & set(PEERS):
        return {}
    try:
        from fla.ops.hgrn import chunk_hgrn, fused_recurrent_hgrn
    except ImportError as e:
        print(f"fla rows skipped: fla does not import ({e}); `pip install fla-core` adds them")
        return {}
    return {m: f for m, f in zip(PEERS, [fused_recurrent_hgrn, chunk_hgrn]) if m in methods}


def _runner(method: str, a: Tensor, b: Tensor, peers: dict[str, Callable]) -> tuple[tuple[Tensor, ...], Callable]:
    """(the inputs it differentiates, its forward returning h) of one method on a, b."""
    if method in peers:
        g = a.detach().float().log().to(a.dtype).requires_grad_()  # outside the timed region
        return (b, g), lambda: peers[method](b, g)[0]
    return (a, b), lambda: scan(a, b, method=method)[0]


def _scan_rows(copy: float, dtype: torch.dtype, timer: Timer, methods: list[str], peers: dict[str, Callable]) -> None:
    for B, T, D in SHAPES:
        a = (torch.rand(B, T, D, device="cuda") * 0.9 + 0.05).to(dtype).requires_grad_()
        b = (torch.rand(B, T, D, device="cuda") + 0.05).to(dtype).requires_grad_()  # log form needs b > 0
        dh = torch.randn(B, T, D, device="cuda", dtype=dtype)
        n = a.numel() * a.element_size()
        for method in methods if dtype == torch.float32 else ["triton", *peers]:
            if method in PEERS and method not in peers:
                continue
            reps = dict(warmup=1, reps=3) if method == "sequential" else {}
            inputs, forward = _runner(method, a, b, peers)
            with torch.no_grad():
                fwd = timer(forward, **reps)

            def step():
                torch.autograd.grad(forward(), inputs, dh)

            try:
                both = timer(step, **reps)
            except torch.cuda.OutOfMemoryError:
                both = float("nan")
            torch.cuda.empty_cache()
            gbf, gbb = 3 * n / fwd / 1e6, 8 * n / both / 1e6
            print(
                f"| [{B}, {T}, {D}] | {str(dtype)[6:]} | {method} | {fwd:.3f} | {gbf:.0f} | {gbf / copy:.0%} "
                f"| {both:.3f} | {gbb:.0f} | {gbb / copy:.0%} |", flush=True
            )
        del a, b, dh
        torch.cuda.empty_cache()


def _gate_rows(timer: Timer) -> None:
    """Fused gate+scan vs the bare scan on a, b of the same D (and vs gates in torch + scan)."""
    B, T, hidden, H, W = 8, 64, 64, 64, 64
    a = (torch.rand(B, T, hidden, H, W, device="cuda") * 0.9 + 0.05).requires_grad_()
    b = torch.randn_like(a).requires_grad_()
    dh = torch.randn_like(a)

    def bare():
        h, _ = scan(a, b, method="triton")
        torch.autograd.grad(h, (a, b), dh)

    with torch.no_grad():
        bare_f = timer(lambda: scan(a, b, method="triton"))
    bare_b = timer(bare)
    for kind in sorted(GATES):
        pre = (torch.randn(B, T, GATES[kind][0] * hidden, H, W, device="cuda") * 2).requires_grad_()
        h0 = torch.full_like(a[:, 0], 0.5)

        def fused():
            h, _ = gate_scan(kind, pre, h0, method="triton")
            torch.autograd.grad(h, pre, dh)

        def unfused():
            ga, gb = gate_rule(kind)(pre)
            h, _ = scan(ga, gb, h0, method="triton")
            torch.autograd.grad(h, pre, dh)

        with torch.no_grad():
            fused_f = timer(lambda: gate_scan(kind, pre, h0, method="triton"))
        fused_b, unfused_b = timer(fused), timer(unfused)
        print(
            f"| {kind} | {fused_f:.3f} | {bare_f:.3f} | {fused_f / bare_f:.2f} | {fused_b:.3f} | {bare_b:.3f} "
            f"| {fused_b / bare_b:.2f} | {unfused_b:.3f} | {unfused_b / fused_b:.1f}x |", flush=True
        )
        del pre


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gates-only", action="store_true", help="only the fused gate+scan table")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS,
                        help="fp32 rows to time (bf16: triton and the peers)")
    parser.add_argument("--timing", choices=list(TIMERS), default="queued")
    args = parser.parse_args()
    timer = TIMERS[args.timing]
    peers = {} if args.gates_only else _peers(args.methods)
    copy = copy_bandwidth_gbs()
    print(f"device: {device_line()}; copy bandwidth (read+write): {copy:.0f} GB/s; timing: {args.timing}")
    print("| shape [B, T, D] | dtype | method | fwd ms | fwd GB/s | fwd / copy | fwd+bwd ms | fwd+bwd GB/s | fwd+bwd / copy |")
    print("|---|---|---|---|---|---|---|---|---|")
    if not args.gates_only:
        _scan_rows(copy, torch.float32, timer, args.methods, peers)
        _scan_rows(copy, torch.bfloat16, timer, args.methods, peers)
    print("\nfused gate+scan vs bare scan, [B, T, hidden, H, W] = [8, 64, 64, 64, 64], fp32")
    print("| kind | fused fwd ms | bare fwd ms | ratio | fused fwd+bwd ms | bare fwd+bwd ms | ratio "
          "| torch gates + scan fwd+bwd ms | fused speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    _gate_rows(timer)


if __name__ == "__main__":
    main()
