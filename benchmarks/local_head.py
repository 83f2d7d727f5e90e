"""How long a throw-away local Ray head takes to start and to stop (issue 25, item 4: the test suite starts dozens).

    python benchmarks/local_head.py --repeats 2

Times `local_ray_head(2)`'s start and its stop, stage by stage as the toolkit stops it (`local_ray.stop`), beside
the same processes SIGTERMed all at once (how it stopped before), interleaved. Prints one markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minconv_dist.train import local_ray  # noqa: E402


def time_head(all_at_once: bool) -> tuple[float, float]:
    """(start s, stop s) of one local head; `all_at_once`: every daemon in `local_ray.stop`'s first stage."""
    staged = local_ray._stage
    if all_at_once:
        local_ray._stage = lambda proc: 0
    try:
        begin = time.perf_counter()
        with local_ray.local_ray_head(num_cpus=2):
            started = time.perf_counter()
        return started - begin, time.perf_counter() - started
    finally:
        local_ray._stage = staged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    ways = {"staged (local_ray.stop)": False, "all at once (before)": True}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, all_at_once in ways.items():
            times[name].append(time_head(all_at_once))
    print(f"`python benchmarks/local_head.py --repeats {args.repeats}`, {datetime.date.today()}\n")
    print("| stop | start s | stop s |\n|---|---|---|")
    for name, runs in times.items():
        starts, stops = zip(*runs)
        print(f"| {name} | {min(starts):.1f}-{max(starts):.1f} | {min(stops):.1f}-{max(stops):.1f} |")


if __name__ == "__main__":
    main()
