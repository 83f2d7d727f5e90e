"""The Triton scan's tiles (issues 14 and 25): every tile (BT steps x BD columns, num_warps, NS pipeline stages) of
the forward and backward kernels at the scan benchmark's shapes, each launched directly (no autotuning), as a
fraction of the device copy bandwidth measured in the same run, beside the tiles the autotuner picks from today's
config lists; or (--baseline) the autotuned kernels of another copy of triton_scan.py beside this tree's, timed in
turn --repeats times (medians).

Bytes counted per kernel (n = elements of one [B, T, D] tensor): plain forward reads a, b, writes h (3n);
backward reads a, h, dh, writes da, db (5n). Min cells' fused kernels read the pre-activations' NB blocks instead
of a, b: LSTM forward 4n, backward 8n. Times are device time per launch (`queued_ms`: launches queued back to back).

    PYTHONPATH=. python benchmarks/scan_tiles.py                  # the sweep; all rows also to --csv
    git show HEAD~1:minconv_dist/ops/scan/triton_scan.py > /tmp/before.py
    PYTHONPATH=. python benchmarks/scan_tiles.py --baseline /tmp/before.py   # before / after, same process
    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section LaunchStats python benchmarks/scan_tiles.py --profile \\
        [--baseline /tmp/before.py] [--only plain] [--dtype bfloat16]    # the baseline's kernels, then this tree's
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import itertools
import statistics
from types import ModuleType
from typing import Callable

import torch
import triton
from triton.runtime.errors import OutOfResources

from benchmarks.common import copy_bandwidth_gbs, device_line, graph_ms, queued_ms
from minconv_dist.ops.gates import GATES
from minconv_dist.ops.scan import triton_scan as ts

SHAPES = [(8, 64, 262144), (4, 256, 65536), (1, 8192, 131072), (16, 24, 65536)]
GATE_SHAPE = (8, 64, 262144)  # [B, T, D] of the Min cells' fused kernels: hidden 64 at 64x64, batch 8


def tiles(dtype: torch.dtype, backward: bool) -> list[tuple[int, int, int, int]]:
    """(BT, BD, num_warps, NS): blocks whose warps all lie along D (one 16-byte load a thread and row, one or two
    such widths a warp; narrower blocks put warps along time: `triton_scan._prune`), BT the kernel's own and twice
    it, 1-3 pipeline stages."""
    per_thread = 16 // torch.empty((), dtype=dtype).element_size()
    bt = ts._BWD_BT if backward else ts._FWD_BT
    return [(t, 32 * w * per_thread * k, w, ns) for t, (w, k), ns in itertools.product(
        (bt, 2 * bt), ((2, 1), (4, 1), (4, 2), (8, 1)), (1, 2, 3))]


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

    def fwd(self, bt: int, bd: int, warps: int, ns: int) -> None:
        B, T, D = self.shape
        ts._fwd_kernel.fn[(triton.cdiv(D, bd), B, 1)](
            self.x, self.y, None, self.h, None, None, T, D, D, T, BT=bt, BD=bd, NS=ns, num_warps=warps, **self.flags())

    def bwd(self, bt: int, bd: int, warps: int, ns: int) -> None:
        B, T, D = self.shape
        ts._bwd_kernel.fn[(triton.cdiv(D, bd), B, 1)](
            self.x, self.y, None, self.h, self.dh, self.dx, self.dy, None, None, None, T, D, D, T, CARRY=False,
            BT=bt, BD=bd, NS=ns, num_warps=warps, **self.flags())

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

    def times(self, mod: ModuleType = ts, timer: Callable[..., float] = queued_ms) -> tuple[float, float]:
        """ms of `mod`'s autotuned forward and forward+backward, each call through autograd (launches queued, or
        replayed from a CUDA graph: `--timing`)."""
        with torch.no_grad():
            fwd = timer(lambda: self.run(mod))
        return fwd, timer(lambda: self.step(mod))

    def cells(self, copy: float, fwd: float, both: float, mod: ModuleType = ts) -> str:
        """Table cells: fwd / bwd / fwd+bwd fractions of copy bandwidth (bwd = fwd+bwd - fwd), fwd+bwd ms, tiles."""
        picked = [mod._fwd_kernel.best_config, mod._bwd_kernel.best_config]
        names = " / ".join(f"{c.kwargs['BT']}x{c.kwargs['BD']} w{c.num_warps} s{c.kwargs.get('NS', 1)}"
                           for c in picked)
        of_copy = lambda nbytes, ms: f"{nbytes / ms / 1e6 / copy:.0%}"
        return (f"{of_copy(self.fwd_bytes, fwd)} / {of_copy(self.bwd_bytes, both - fwd)} / "
                f"{of_copy(self.fwd_bytes + self.bwd_bytes, both)} | {both:.3f} | {names}")

    def autotuned(self, copy: float, mod: ModuleType = ts) -> str:
        return self.cells(copy, *self.times(mod), mod)

    @property
    def label(self) -> str:
        return f"{self.kind} {list(self.shape)} {str(self.dtype)[6:]}"


def compare(case: Case, copy: float, baseline: ModuleType, repeats: int, timer: Callable[..., float]) -> None:
    """One row: the autotuned kernels of the baseline module and of this tree, timed in turn `repeats` times
    (medians: one timing of the same code varies by up to 10 points of copy, docs/benchmarks.md)."""
    runs = {mod: [] for mod in (baseline, ts)}
    for _ in range(repeats):
        for mod, out in runs.items():
            out.append(case.times(mod, timer))
    medians = {mod: [statistics.median(col) for col in zip(*out)] for mod, out in runs.items()}
    print(f"| {case.label} | {case.cells(copy, *medians[baseline], baseline)} | {case.cells(copy, *medians[ts])} |",
          flush=True)


def sweep(case: Case, copy: float, out: csv.DictWriter) -> None:
    auto = case.autotuned(copy)
    best = {}
    for backward, nbytes in ((False, case.fwd_bytes), (True, case.bwd_bytes)):
        launch = case.bwd if backward else case.fwd
        for bt, bd, warps, ns in tiles(case.dtype, backward):
            if bd > 2 * max(512, triton.next_power_of_2(case.shape[2])):
                continue
            try:
                ms = queued_ms(lambda: launch(bt, bd, warps, ns))
            except OutOfResources:  # more shared memory than an SM has (long tiles, deep pipelines)
                continue
            r = dict(case=case.label, kernel="bwd" if backward else "fwd", BT=bt, BD=bd, warps=warps, NS=ns, ms=ms,
                     copy=nbytes / ms / 1e6 / copy)
            out.writerow(r)
            if r["copy"] > best.get(backward, {"copy": 0})["copy"]:
                best[backward] = r
    print(f"| {case.label} | {auto} |" + "".join(
        f" {r['copy']:.0%} ({r['BT']}x{r['BD']} w{r['warps']} s{r['NS']}) |" for r in (best[False], best[True])),
        flush=True)


CASES = [("plain", s, d) for d in (torch.float32, torch.bfloat16) for s in SHAPES] + [
    (kind, GATE_SHAPE, d) for kind in ("lstm", "explstm", "gru") for d in (torch.float32, torch.bfloat16)]


def profile(specs: list, mods: list[ModuleType]) -> None:
    """Under ncu (--profile-from-start off): each module's autotuned forward and backward of each case, once, in
    that order (autotuning and compiling happen before, outside the profiled range)."""
    for spec in specs:
        case = Case(*spec)
        for mod in mods:
            case.step(mod)
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
        for mod in mods:
            case.step(mod)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del case
        torch.cuda.empty_cache()


def _load(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_triton_scan", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", action="store_true", help="only the launches for ncu (the baseline's first)")
    parser.add_argument("--csv", default="scan_tiles.csv", help="every tile's row")
    parser.add_argument("--baseline", help="a copy of triton_scan.py: its autotuned kernels beside this tree's "
                        "(no sweep)")
    parser.add_argument("--only", nargs="+", choices=sorted({c[0] for c in CASES}), help="these kinds only")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="this dtype only")
    parser.add_argument("--repeats", type=int, default=3, help="--baseline: timings of each module, interleaved")
    parser.add_argument("--timing", choices=["queued", "graph"], default="queued",
                        help="--baseline: launches queued, or replayed from a CUDA graph (no host work)")
    args = parser.parse_args()
    specs = [c for c in CASES if (args.only is None or c[0] in args.only)
             and (args.dtype is None or c[2] == getattr(torch, args.dtype))]
    if args.profile:
        profile(specs, ([_load(args.baseline)] if args.baseline else []) + [ts])
        return
    copy = copy_bandwidth_gbs()
    print(f"device: {device_line()}; copy bandwidth (read+write): {copy:.0f} GB/s\n")
    if args.baseline:
        baseline = _load(args.baseline)
        print(f"timing: {args.timing}\n")
        print(f"| case | {args.baseline}: fwd / bwd / fwd+bwd of copy | fwd+bwd ms | its tiles "
              "| this tree: fwd / bwd / fwd+bwd of copy | fwd+bwd ms | its tiles |")
        print("|---|---|---|---|---|---|---|")
        for spec in specs:
            compare(Case(*spec), copy, baseline, args.repeats, graph_ms if args.timing == "graph" else queued_ms)
            torch.cuda.empty_cache()
        return
    print("| case | autotuned fwd / bwd / fwd+bwd of copy | fwd+bwd ms | its tiles | best fwd of copy (tile) "
          "| best bwd of copy (tile) |")
    print("|---|---|---|---|---|---|")
    with open(args.csv, "w", newline="", buffering=1) as f:
        out = csv.DictWriter(f, fieldnames=["case", "kernel", "BT", "BD", "warps", "NS", "ms", "copy"])
        out.writeheader()
        for spec in specs:
            sweep(Case(*spec), copy, out)
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
