"""Loader benchmark (issue 4): one epoch of stride-1 windows vs a raw zarr read and two common alternatives.

For each store (time chunks of 1 and 24 frames by default; local and on a moto S3 server started here) it
prints, measured in the same run: the raw read of the whole store (every chunk once, zarr's async concurrency),
the epoch's own blocks read by zarr alone (the floor of its read plan: amplification and one call per block),
one WindowDataset epoch (time, windows/s, read amplification = frames read / frames in the store) and
windows/s of xbatcher's BatchGenerator and of per-window `isel(...).values` on a sample of windows.

    PYTHONPATH=. .venv/bin/python benchmarks/loader.py              # 2 years hourly, 32x64 (the issue's size)
    PYTHONPATH=. .venv/bin/python benchmarks/loader.py --days 60    # quicker
    PYTHONPATH=. .venv/bin/python benchmarks/loader.py --days 365 --s3-days 0 --repeats 5   # min of 5, noisy machine
    PYTHONPATH=. .venv/bin/python benchmarks/loader.py --days 365 --s3-days 0 --prefetch 0 1 2   # an epoch per depth
    PYTHONPATH=. .venv/bin/python benchmarks/loader.py --days 60 --chunks 24 --grid 128 256   # 16x the bytes a window
    PYTHONPATH=. .venv/bin/python benchmarks/loader.py --days 365 --repeats 5 --reader zarr zarrs obstore  # a row each

`--reader` (data/store.py READERS) reads every column of its row with that reader; readers take turns within each
repeat, so a drift of the machine falls on all of them. A reader that reads a store as another one does (obstore on
a local store) or is not installed gets a line instead of a row, and so do the S3 stores when moto is missing.
(PYTHONPATH=. times this checkout's loader, not the one the virtualenv has installed.)
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
import zarr

from minconv_dist.data import WindowDataset, open_store, write_synthetic_era5
from minconv_dist.data.store import READERS, reading, resolve_reader, zarr_store
from minconv_dist.train.local_s3 import local_s3


def timed(fn) -> tuple[float, float, object]:
    """Wall seconds, CPU seconds of this process (all its threads) and the result of `fn()`. On a shared machine
    the CPU time tells the work apart from the waiting for a core."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - start, time.process_time() - cpu, out


def zarr_array(url: str, options: dict | None, reader: str) -> zarr.Array:
    """The store's `z`, opened by zarr alone with the settings the loader's arrays are opened with by `reader`."""
    with reading(reader), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zarrs: its copy of an obstore store pools on its own
        return zarr.open_group(zarr_store(url, options, reader), mode="r")["z"]


def raw_read(url: str, options: dict | None, reader: str, concurrency: int) -> tuple[float, float, int]:
    arr = zarr_array(url, options, reader)
    with zarr.config.set({"async.concurrency": concurrency}):
        seconds, cpu, values = timed(lambda: arr[:])
    return seconds, cpu, values.nbytes


def blocks_alone(url: str, options: dict | None, reader: str, window: int, amplification: float) -> float:
    """Seconds zarr alone takes to read the frames of every block of one epoch, one call per block as the
    dataset makes them, in its order."""
    ds = WindowDataset(url, "z", window, storage_options=options, seed=0, max_read_amplification=amplification,
                       reader=reader)
    blocks, reads, _, _ = ds._plan_blocks(ds.worker_plan(0, 0, 1))
    arr = zarr_array(url, options, reader)
    return timed(lambda: [arr[t0:t1] for b in blocks for t0, t1 in reads[b][2]])[0]


def epoch(url: str, options: dict | None, reader: str, window: int, prefetch: int | None, amplification: float
          ) -> tuple[float, float, int, float, int]:
    """Seconds, CPU seconds, windows, read amplification and block length (frames) of one epoch (`prefetch`
    None: the dataset's default)."""
    frames_read = []

    class Counting(WindowDataset):
        def _read(self, layers, s_first, s_last, t_first, t_last):
            frames_read.append(t_last - t_first)
            return super()._read(layers, s_first, s_last, t_first, t_last)

    ds = Counting(url, "z", window, storage_options=options, seed=0, max_read_amplification=amplification,
                  reader=reader, **({} if prefetch is None else {"prefetch": prefetch}))
    seconds, cpu, count = timed(lambda: sum(1 for _ in ds))
    assert count == len(ds)
    return seconds, cpu, count, sum(frames_read) / (ds.n_windows + window - 1), ds.block


def alternatives(url: str, options: dict | None, reader: str, window: int, sample: int) -> tuple[float, float]:
    """Windows/s of xbatcher (nan without the `bench` extra) and of per-window isel, on `sample` windows."""
    ds = open_store(url, options, reader=reader)
    starts = np.random.default_rng(0).integers(0, ds.sizes["time"] - window, sample)
    seconds, _, _ = timed(lambda: [ds.z.isel(time=slice(s, s + window)).values for s in starts])
    try:
        import xbatcher
    except ImportError:
        return np.nan, sample / seconds
    gen = xbatcher.BatchGenerator(ds[["z"]], input_dims={"time": window, "lat": ds.sizes["lat"],
                                  "lon": ds.sizes["lon"]}, input_overlap={"time": window - 1})
    start = time.perf_counter()
    for i, batch in enumerate(gen):
        batch.z.values  # noqa: B018  (load it)
        if i + 1 == sample:
            break
    return sample / (time.perf_counter() - start), sample / seconds


def rate_text(rate: float) -> str:
    return "-" if np.isnan(rate) else f"{rate:,.0f}"


def measure(name: str, url: str, options: dict | None, chunk: int, end: str, args: argparse.Namespace) -> list[tuple]:
    """Write the store, time every column for each reader (readers take turns within each repeat, so a drift of
    the machine falls on all of them and every column), and return a row per reader and WindowDataset setting."""
    settings = [(amp, depth) for amp in args.max_read_amplification for depth in args.prefetch or [None]]
    readers = []
    for asked in args.reader:
        try:
            reader = resolve_reader(url, options, asked)
        except ValueError as err:
            print(f"{name}: no row for reader {asked!r}: {err}", flush=True)
            continue
        if reader in readers or asked not in ("auto", reader):
            print(f"{name}: reader {asked!r} reads it as {reader!r}, no row of its own", flush=True)
        else:
            readers.append(reader)
    if not readers:
        return []
    write_synthetic_era5(url, end=end, chunks=chunk, nlat=args.grid[0], nlon=args.grid[1], storage_options=options)
    runs: dict[str, list] = {reader: [] for reader in readers}
    for _ in range(args.repeats):
        for reader in readers:
            runs[reader].append((
                raw_read(url, options, reader, 10), raw_read(url, options, reader, 64),
                *(blocks_alone(url, options, reader, args.window, amp) for amp in args.max_read_amplification),
                *(epoch(url, options, reader, args.window, depth, amp) for amp, depth in settings)))
    best_raw = {reader: min(r[k][0] for r in runs[reader] for k in range(2)) for reader in readers}
    rows = []
    for reader in readers:
        nbytes = runs[reader][0][0][2]
        raw10, raw64 = (min(r[k][0] for r in runs[reader]) for k in range(2))
        raw_cpu = min(r[k][1] for r in runs[reader] for k in range(2))
        alone = {amp: min(r[2 + k] for r in runs[reader]) for k, amp in enumerate(args.max_read_amplification)}
        xb, isel = (alternatives(url, options, reader, args.window, args.sample) if options is None
                    else (np.nan, np.nan))
        for k, (amp, depth) in enumerate(settings, start=2 + len(alone)):
            (_, _, count, amplification, block) = runs[reader][0][k]
            ep, ep_cpu = (min(r[k][j] for r in runs[reader]) for j in range(2))
            label = f", blocks of {block} (max amplification {amp})"
            label += "" if depth is None else f", prefetch {depth}"
            rows.append((name + label, reader, nbytes / 1e6, raw10, raw64, raw_cpu, alone[amp], ep, ep_cpu,
                         count / ep, amplification, ep / best_raw[reader], ep_cpu / raw_cpu,
                         ep / best_raw.get("zarr", np.nan), xb, isel))
    print(f"done: {name}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--days", type=int, default=731, help="store length (hourly frames); 731 = 2015-2016")
    p.add_argument("--window", type=int, default=24)
    p.add_argument("--sample", type=int, default=300, help="windows timed for the alternatives")
    p.add_argument("--repeats", type=int, default=1, help="runs of the raw reads and the epoch (min of each)")
    p.add_argument("--s3-days", type=int, default=30,
                   help="length of the moto S3 stores (moto serves ~250 requests/s here); 0 skips S3")
    p.add_argument("--chunks", type=int, nargs="+", default=[1, 24], help="time chunk sizes, a store each")
    p.add_argument("--grid", type=int, nargs=2, default=[32, 64], metavar=("H", "W"),
                   help="grid size; a larger one gives each window more bytes against its fixed costs")
    p.add_argument("--max-read-amplification", type=float, nargs="+", default=[1.05],
                   help="WindowDataset's bound (1.05 is its default); lower means longer blocks, fewer zarr calls")
    p.add_argument("--prefetch", type=int, nargs="+", default=None,
                   help="WindowDataset prefetch depths, an epoch (and a row) each; default: the dataset's default")
    p.add_argument("--reader", nargs="+", default=["zarr", "zarrs", "obstore"], choices=READERS,
                   help="readers (data/store.py READERS), a row each; they take turns within each repeat")
    args = p.parse_args(argv)
    end_of = lambda days: str((pd.Timestamp("2015-01-01") + pd.Timedelta(days=days)).date())  # noqa: E731
    load = os.getloadavg()

    tmp = tempfile.mkdtemp(prefix="loader-bench-")
    with contextlib.ExitStack() as stack:
        s3 = None
        if args.s3_days and importlib.util.find_spec("moto") is None:
            print("S3 stores skipped: moto is not installed (pip install 'minconv_dist[test]')", flush=True)
        elif args.s3_days:
            s3 = stack.enter_context(local_s3(["bench"]))
        rows = []
        for chunk in args.chunks:
            rows += measure(f"local, {args.days} d, chunks ({chunk}, H, W)", f"{tmp}/c{chunk}.zarr", None, chunk,
                            end_of(args.days), args)
            if s3 is not None:
                rows += measure(f"moto S3, {args.s3_days} d, chunks ({chunk}, H, W)", f"s3://bench/c{chunk}.zarr",
                                s3, chunk, end_of(args.s3_days), args)

    print(f"\nhourly {args.grid[0]}x{args.grid[1]} float32 stores from 2015-01-01, window T={args.window}, stride 1; "
          f"min of {args.repeats} run(s); {os.cpu_count()} cores, load average (1, 5, 15 min) "
          f"{'/'.join(f'{x:.1f}' for x in load)} at the start, "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end\n")
    print("| store | reader | MB | raw read, concurrency 10 (s, MB/s) | raw read, concurrency 64 (s, MB/s) "
          "| raw read, CPU s | its blocks, zarr alone (s) | WindowDataset epoch (s) | epoch, CPU s | windows/s "
          "| read amplification | epoch / its best raw read | the same in CPU time | epoch / zarr's best raw read "
          "| xbatcher windows/s | per-window isel windows/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, reader, mb, r10, r64, raw_cpu, alone, ep, ep_cpu, rate, amp, ratio, cpu_ratio, vs_zarr, xb, isel in rows:
        print(f"| {name} | {reader} | {mb:.0f} | {r10:.3f} s, {mb / r10:.0f} | {r64:.3f} s, {mb / r64:.0f} "
              f"| {raw_cpu:.3f} | {alone:.3f} | {ep:.3f} | {ep_cpu:.3f} | {rate:,.0f} | {amp:.3f} | {ratio:.2f}x "
              f"| {cpu_ratio:.2f}x | {'-' if np.isnan(vs_zarr) else f'{vs_zarr:.2f}x'} | {rate_text(xb)} "
              f"| {rate_text(isel)} |")


if __name__ == "__main__":
    main()
