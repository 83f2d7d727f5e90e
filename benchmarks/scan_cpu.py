"""The scan on the CPU: one Min-cell layer's recurrence as it trains (gates from the conv's pre-activations,
scan, backward), per torch method, interleaved in one process; milliseconds per step and the ratio to
`doubling`, the CPU default before `loop`.

    PYTHONPATH=. .venv/bin/python benchmarks/scan_cpu.py
"""
from __future__ import annotations

import argparse
import functools
import platform

import torch

from benchmarks.common import interleaved_ms
from minconv_dist.ops.scan import gate_scan

SHAPES = [(8, 24, 24, 16, 32), (8, 24, 64, 16, 32), (4, 96, 24, 16, 32), (1, 730, 24, 16, 32)]
METHODS = ["doubling", "sequential", "loop"]


def step(pre: torch.Tensor, h0: torch.Tensor, method: str) -> None:
    h, _ = gate_scan("gru", pre, h0, method=method)
    h.sum().backward()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="one tiny shape (a smoke test)")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| [B, T, hidden, H, W] | " + " | ".join(f"{m} ms" for m in METHODS) + " | loop vs doubling |")
    print("|---|" + "---|" * (len(METHODS) + 1))
    for B, T, C, H, W in [(2, 8, 4, 8, 8)] if args.small else SHAPES:
        pre = torch.randn(B, T, 2 * C, H, W, requires_grad=True)
        h0 = torch.full((B, C, H, W), 0.5)
        ms = interleaved_ms({m: functools.partial(step, pre, h0, m) for m in METHODS}, torch.device("cpu"),
                            warmup=1, repeats=args.repeats)
        print(f"| [{B}, {T}, {C}, {H}, {W}] | " + " | ".join(f"{ms[m]:.1f}" for m in METHODS)
              + f" | {ms['doubling'] / ms['loop']:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
