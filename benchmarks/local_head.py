"""How long a throw-away local Ray head takes to start and to stop (issue 25, item 4: the test suite starts dozens).

    python benchmarks/local_head.py --repeats 2

Times `local_ray_head(2)`'s start and its stop, stage by stage as the toolkit stops it (`local_ray.stop`), beside
the same processes SIGTERMed all at once (how it stopped before), interleaved. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import signal
import sys
import time
from contextlib import suppress
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minconv_dist.train import local_ray  # noqa: E402


def all_at_once(procs: list[psutil.Process], grace_s: float = 15) -> None:
    """The earlier stop: every daemon SIGTERMed together, SIGKILLed after the grace."""
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    for proc in psutil.wait_procs(procs, timeout=grace_s)[1]:
        with suppress(psutil.NoSuchProcess):
            proc.kill()


def time_head(stop) -> tuple[float, float]:
    """(start s, stop s) of one local head stopped by `stop`."""
    staged, local_ray.stop = local_ray.stop, stop
    try:
        begin = time.perf_counter()
        with local_ray.local_ray_head(num_cpus=2):
            started = time.perf_counter()
        return started - begin, time.perf_counter() - started
    finally:
        local_ray.stop = staged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ways = {"staged (local_ray.stop)": local_ray.stop, "all at once (before)": all_at_once}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, stop in ways.items():
            times[name].append(time_head(stop))
    print(f"`python benchmarks/local_head.py --repeats {args.repeats}`, {datetime.date.today()}\n")
    print("| stop | start s | stop s |\n|---|---|---|")
    for name, runs in times.items():
        starts, stops = zip(*runs)
        print(f"| {name} | {min(starts):.1f}-{max(starts):.1f} | {min(stops):.1f}-{max(stops):.1f} |")


if __name__ == "__main__":
    main()
