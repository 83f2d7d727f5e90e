"""The Triton scan's tiles (issue 14, item 1): every tile shape (BT steps x BD columns, num_warps) of the forward
and backward kernels at the scan benchmark's shapes, each launched directly (no autotuning), as a fraction of the
device copy bandwidth measured in the same run, beside the tiles the autotuner picks from today's config lists;
or (--baseline) the autotuned kernels of another copy of triton_scan.py beside this tree's.

Bytes counted per kernel (n = elements of one [B, T, D] tensor): plain forward reads a, b, writes h (3n);
backward reads a, h, dh, writes da, db (5n). Min cells' fused kernels read the pre-activations' NB blocks instead
of a, b: LSTM forward 4n, backward 8n. Times are device time per launch (`queued_ms`: launches queued back to back).

    PYTHONPATH=. python benchmarks/scan_tiles.py                  # the sweep; all rows also to --csv
    git show HEAD~1:minconv_dist/ops/scan/triton_scan.py > /tmp/before.py
    PYTHONPATH=. python benchmarks/scan_tiles.py --baseline /tmp/before.py   # before / after, same process
    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section LaunchStats python benchmarks/scan_tiles.py --profile
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
from types import ModuleType

import torch
import triton
from triton.runtime.errors import OutOfResources

from benchmarks.common import copy_bandwidth_gbs, device_line, queued_ms
from minconv_dist.ops.gates import GATES
from minconv_dist.ops.scan import triton_scan as ts

SHAPES = [(8, 64, 262144), (4, 256, 65536), (1, 8192, 131072)]
GATE_SHAPE = (8, 64, 262144)  # [B, T, D] of the Min cells' fused kernels: hidden 64 at 64x64, batch 8


def tiles() -> list[tuple[int, int, int]]:
    """(BT, BD, num_warps) with 4 or 8 consecutive columns per thread and at most 128 elements per thread."""
    out = []
    for bt, per_thread, warps in itertools.product((4, 8, 16, 32), (4, 8), (2, 4, 8)):
        if bt * per_thread <= 128:
            out.append((bt, 32 * warps * per_thread, warps))
    return out


class Case:
    """One kernel input: plain (a, b) or a Min cell's pre-activations, with its outputs and byte counts."""

    def __init__(self, kind: str, shape: tuple[int, int, int], dtype: torch.dtype):
        B, T, D = shape
        self.kind, self.shape, self.dtype = kind, shape, dtype
        self.code, self.nb = (ts.PLAIN, 1) if kind == "plain" else (GATES[kind].kernel, GATES[kind].blocks)
        if kind == "plain":
            self.x = (torch.rand(B, T, D, device="cuda") * 0.9 + 0.05).to(dtype)
            self.y = torch.randn(B, T, D, device="cuda", dtype=dtype)
        else:
            self.x = self.y = torch.randn(B, T, self.nb * D, device="cuda", dtype=dtype)
        self.h = torch.empty(B, T, D, device="cuda", dtype=dtype)
        self.dh = torch.randn(B, T, D, device="cuda", dtype=dtype)
        self.dx = torch.empty_like(self.x)
        self.dy = torch.empty_like(self.y) if kind == "plain" else self.dx
        n = B * T * D * self.h.element_size()
        self.fwd_bytes = (3 if kind == "plain" else self.nb + 1) * n
        self.bwd_bytes = (5 if kind == "plain" else 2 * self.nb + 2) * n

    def flags(self) -> dict:
        return dict(KIND=self.code, NB=self.nb, HAS_H0=False, REDUCE=False)

    def fwd(self, bt: int, bd: int, warps: int) -> None:
        B, T, D = self.shape
        ts._fwd_kernel.fn[(triton.cdiv(D, bd), B, 1)](
            self.x, self.y, None, self.h, None, None, T, D, D, T, BT=bt, BD=bd, num_warps=warps, **self.flags())

    def bwd(self, bt: int, bd: int, warps: int) -> None:
        B, T, D = self.shape
        ts._bwd_kernel.fn[(triton.cdiv(D, bd), B, 1)](
            self.x, self.y, None, self.h, self.dh, self.dx, self.dy, None, None, None, T, D, D, T, CARRY=False,
            BT=bt, BD=bd, num_warps=warps, **self.flags())

    def run(self, mod: ModuleType = ts) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The forward of the autotuned kernels of `mod` (a triton_scan module): h and the inputs with gradients."""
        a = self.x.detach().requires_grad_()
        if self.kind == "plain":
            b = self.y.detach().requires_grad_()
            return mod.scan_triton(a, b)[0], (a, b)
        return mod.gate_scan_triton(self.kind, a)[0], (a,)

    def step(self, mod: ModuleType = ts) -> None:
        h, inputs = self.run(mod)
        torch.autograd.grad(h, inputs, self.dh)

    def autotuned(self, copy: float, mod: ModuleType = ts) -> str:
        """Two table cells: the fraction of copy bandwidth of `mod`'s autotuned forward and backward, the tiles."""
        with torch.no_grad():
            fwd = queued_ms(lambda: self.run(mod))
        bwd = queued_ms(lambda: self.step(mod)) - fwd
        picked = [mod._fwd_kernel.best_config, mod._bwd_kernel.best_config]
        names = " / ".join(f"{c.kwargs['BT']}x{c.kwargs['BD']} w{c.num_warps}" for c in picked)
        return f"{self.fwd_bytes / fwd / 1e6 / copy:.0%} / {self.bwd_bytes / bwd / 1e6 / copy:.0%} | {names}"

    @property
    def label(self) -> str:
        return f"{self.kind} {list(self.shape)} {str(self.dtype)[6:]}"


def compare(case: Case, copy: float, baseline: ModuleType) -> None:
    """One row: the autotuned kernels of this tree and of the baseline module, timed in turn."""
    print(f"| {case.label} | {case.autotuned(copy, baseline)} | {case.autotuned(copy)} |", flush=True)


def sweep(case: Case, copy: float, out: csv.DictWriter) -> None:
    auto = case.autotuned(copy)
    results = []
    for bt, bd, warps in tiles():
        if bd > 2 * max(512, triton.next_power_of_2(case.shape[2])):
            continue
        try:
            f = queued_ms(lambda: case.fwd(bt, bd, warps))
            b = queued_ms(lambda: case.bwd(bt, bd, warps))
        except OutOfResources:  # the tile's scan needs more shared memory than an SM has
            continue
        r = dict(case=case.label, BT=bt, BD=bd, warps=warps, fwd_ms=f, bwd_ms=b,
                 fwd_copy=case.fwd_bytes / f / 1e6 / copy, bwd_copy=case.bwd_bytes / b / 1e6 / copy)
        out.writerow(r)
        results.append(r)
    best_f = max(results, key=lambda r: r["fwd_copy"])
    best_b = max(results, key=lambda r: r["bwd_copy"])
    print(f"| {case.label} | {auto} "
          f"| {best_f['fwd_copy']:.0%} ({best_f['BT']}x{best_f['BD']} w{best_f['warps']}) "
          f"| {best_b['bwd_copy']:.0%} ({best_b['BT']}x{best_b['BD']} w{best_b['warps']}) |", flush=True)


CASES = [("plain", s, d) for d in (torch.float32, torch.bfloat16) for s in SHAPES] + [
    (kind, GATE_SHAPE, d) for kind in ("lstm", "explstm", "gru") for d in (torch.float32, torch.bfloat16)]


def profile() -> None:
    """Under ncu (--profile-from-start off): the autotuned forward and backward of the short walks, once each
    (autotuning and compiling happen before, outside the profiled range)."""
    short = [Case(*spec) for spec in CASES if spec[1][1] <= 256]
    for c in short:
        c.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for c in short:
        c.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_triton_scan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="only the launches for ncu")
    parser.add_argument("--csv", default="scan_tiles.csv", help="every tile's row")
    parser.add_argument("--baseline", help="a copy of triton_scan.py: its autotuned kernels beside this tree's "
                        "(no sweep)")
    parser.add_argument("--only", nargs="+", choices=sorted({c[0] for c in CASES}), help="these kinds only")
    args = parser.parse_args()
    if args.profile:
        profile()
        return
    copy = copy_bandwidth_gbs()
    print(f"device: {device_line()}; copy bandwidth (read+write): {copy:.0f} GB/s\n")
    if args.baseline:
        baseline = _load(args.baseline)
        print(f"| case | {args.baseline}: fwd / bwd of copy | its tiles | this tree: fwd / bwd of copy | its tiles |")
        print("|---|---|---|---|---|")
        for spec in CASES:
            if args.only is None or spec[0] in args.only:
                compare(Case(*spec), copy, baseline)
                torch.cuda.empty_cache()
        return
    print("| case | autotuned fwd / bwd of copy | its tiles | best fwd of copy (tiles) | best bwd of copy (tiles) |")
    print("|---|---|---|---|---|")
    with open(args.csv, "w", newline="", buffering=1) as f:
        out = csv.DictWriter(f, fieldnames=["case", "BT", "BD", "warps", "fwd_ms", "bwd_ms", "fwd_copy", "bwd_copy"])
        out.writeheader()
        for spec in CASES:
            if args.only is None or spec[0] in args.only:
                sweep(Case(*spec), copy, out)
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
