"""Cost per member of an ensemble forecast against the deterministic forecast (issue 27): ms per init time.

The library's own batches (`evaluate/forecast.py` `context_forecasts` / `warm_forecasts` for one forecast per
init, `evaluate/ensemble.py` `member_forecasts` for N perturbed members), on in-memory data (no store reads
or writes), an untrained MinConvGRU, A/B interleaved (`common.interleaved_ms`), median of `--repeats`
(`--clock cpu`: this process's CPU time, for a CPU shared with other jobs). `--batch-size` counts init times
for the deterministic forecast and (init, member) pairs for the ensemble, so both run rollouts of the same
size. Two ways to warm up:
- context: every member warms up on its own perturbed `--context` frames, so a member costs a forecast;
- warmup: one pass over the record (shared by all members), then each member reads the init frame from its
  perturbed state: a member costs its closed-loop steps only.

    PYTHONPATH=. python benchmarks/ensemble.py                                        # CPU, 16x32
    PYTHONPATH=. python benchmarks/ensemble.py --device cuda --grid 32 64 --inits 64 --members 1 8 32 \\
        --batch-size 256
"""
from __future__ import annotations

import argparse
import time
from typing import Callable, Sequence

import numpy as np
import torch
import xarray as xr

from benchmarks.common import device_line, interleaved_ms
from minconv_dist.evaluate.ensemble import member_forecasts
from minconv_dist.evaluate.forecast import context_forecasts, warm_forecasts
from minconv_dist.models import build_model


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", type=int, nargs=2, default=[16, 32], metavar=("H", "W"))
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--hidden", type=int, default=24)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--inits", type=int, default=16, help="init times, one every --init-every frames")
    p.add_argument("--init-every", type=int, default=24)
    p.add_argument("--context", type=int, default=20)
    p.add_argument("--steps", type=int, default=24, help="lead steps")
    p.add_argument("--members", type=int, nargs="+", default=[1, 8])
    p.add_argument("--batch-size", type=int, default=32, help="init times (deterministic) / pairs (ensemble)")
    p.add_argument("--modes", nargs="+", default=["context", "warmup"], choices=["context", "warmup"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (all threads), for a CPU shared with other jobs")
    return p.parse_args(argv)


def workload(args: argparse.Namespace) -> tuple[torch.nn.Module, xr.DataArray, np.ndarray]:
    """(model, data (time, channel, lat, lon) in memory, init positions)."""
    torch.manual_seed(0)
    channels = [f"c{k}" for k in range(args.channels)]
    model = build_model("minconvgru", channels, args.hidden, args.layers, padding="cylinder", norm="layer",
                        grid=tuple(args.grid)).to(args.device).eval()
    idx = args.context + args.init_every * np.arange(args.inits)
    frames = np.random.default_rng(0).standard_normal((idx[-1] + 1, args.channels, *args.grid)).astype(np.float32)
    time = np.datetime64("2016-01-01", "ns") + np.arange(frames.shape[0]) * np.timedelta64(1, "h")
    return model, xr.DataArray(frames, dims=("time", "channel", "lat", "lon"),
                               coords={"time": time, "channel": channels}), idx


def runner(model: torch.nn.Module, data: xr.DataArray, idx: np.ndarray, args: argparse.Namespace, mode: str,
           members: int | None) -> Callable[[], None]:
    """A closure running every init's forecast (members=None) or its `members` members once."""
    run = dict(steps=args.steps, batch_size=args.batch_size, device=args.device)
    if members is None:
        make = (lambda: context_forecasts(model, data, idx, context=args.context, **run)) if mode == "context" else \
            (lambda: warm_forecasts(model, data, idx, start=0, **run))
    else:
        start = None if mode == "context" else 0
        make = lambda: member_forecasts(model, data, idx, per_model=members, perturbation_std=0.1,  # noqa: E731
                                        context=args.context, warmup_from=start, **run)

    def go() -> None:
        for _ in make():
            pass

    return go


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(argv)
    device = torch.device(args.device)
    model, data, idx = workload(args)
    print(f"{device_line(device)}; MinConvGRU {args.hidden} x {args.layers} on {args.channels} x "
          f"{args.grid[0]}x{args.grid[1]}, {args.inits} inits, {args.steps} lead steps, context {args.context} "
          f"(warmup: one pass over {idx[-1] + 1} frames), batch {args.batch_size}, median of {args.repeats}, "
          f"{args.clock} clock")
    print("| mode | members | ms per init | ms per member per init | member / deterministic |")
    print("|---|---|---|---|---|")
    for mode in args.modes:
        fns = {None: runner(model, data, idx, args, mode, None)}
        fns.update({n: runner(model, data, idx, args, mode, n) for n in args.members})
        ms = interleaved_ms(fns, device, warmup=1, repeats=args.repeats,
                            clock=time.process_time if args.clock == "cpu" else time.perf_counter)
        base = ms[None] / args.inits
        print(f"| {mode} | deterministic | {base:.2f} | {base:.2f} | 1.00 |")
        for n in args.members:
            per_init = ms[n] / args.inits
            print(f"| {mode} | {n} | {per_init:.2f} | {per_init / n:.2f} | {per_init / n / base:.2f} |")


if __name__ == "__main__":
    main()
