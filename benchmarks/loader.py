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

(PYTHONPATH=. times this checkout's loader, not the one the virtualenv has installed.)
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import pandas as pd
import zarr

from minconv_dist.data import WindowDataset, open_store, write_synthetic_era5
from minconv_dist.data.store import reading, zarr_store


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def zarr_array(url: str, options: dict | None) -> zarr.Array:
    """The store's `z`, opened by zarr alone with the settings the loader's arrays are opened with."""
    with reading():
        return zarr.open_group(zarr_store(url, options), mode="r")["z"]


def raw_read(url: str, options: dict | None, concurrency: int) -> tuple[float, int]:
    arr = zarr_array(url, options)
    with zarr.config.set({"async.concurrency": concurrency}):
        seconds, values = timed(lambda: arr[:])
    return seconds, values.nbytes


def blocks_alone(url: str, options: dict | None, window: int, amplification: float) -> float:
    """Seconds zarr alone takes to read the frames of every block of one epoch, one call per block as the
    dataset makes them, in its order."""
    ds = WindowDataset(url, "z", window, storage_options=options, seed=0, max_read_amplification=amplification)
    blocks, reads, _, _ = ds._plan_blocks(ds.worker_plan(0, 0, 1))
    arr = zarr_array(url, options)
    return timed(lambda: [arr[t0:t1] for b in blocks for t0, t1 in reads[b][2]])[0]


def epoch(url: str, options: dict | None, window: int, prefetch: int | None, amplification: float
          ) -> tuple[float, int, float, int]:
    """Seconds, windows, read amplification and block length (frames) of one epoch (`prefetch` None: the
    dataset's default)."""
    frames_read = []

    class Counting(WindowDataset):
        def _read(self, layers, s_first, s_last, t_first, t_last):
            frames_read.append(t_last - t_first)
            return super()._read(layers, s_first, s_last, t_first, t_last)

    ds = Counting(url, "z", window, storage_options=options, seed=0, max_read_amplification=amplification,
                  **({} if prefetch is None else {"prefetch": prefetch}))
    seconds, count = timed(lambda: sum(1 for _ in ds))
    assert count == len(ds)
    return seconds, count, sum(frames_read) / (ds.n_windows + window - 1), ds.block


def alternatives(url: str, options: dict | None, window: int, sample: int) -> tuple[float, float]:
    """Windows/s of xbatcher (nan without the `bench` extra) and of per-window isel, on `sample` windows."""
    ds = open_store(url, options)
    starts = np.random.default_rng(0).integers(0, ds.sizes["time"] - window, sample)
    seconds, _ = timed(lambda: [ds.z.isel(time=slice(s, s + window)).values for s in starts])
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
    args = p.parse_args(argv)
    settings = [(amp, depth) for amp in args.max_read_amplification for depth in args.prefetch or [None]]
    end_of = lambda days: str((pd.Timestamp("2015-01-01") + pd.Timedelta(days=days)).date())  # noqa: E731

    targets = []
    tmp = tempfile.mkdtemp(prefix="loader-bench-")
    server = None
    if args.s3_days:
        import logging

        import boto3
        from moto.server import ThreadedMotoServer

        from minconv_dist.train.local_ray import free_port

        port = free_port()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        s3 = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
              "client_kwargs": {"region_name": "us-east-1"}}
        boto3.client("s3", endpoint_url=s3["endpoint_url"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="bench")
    for chunk in args.chunks:
        targets.append((f"local, {args.days} d, chunks ({chunk}, H, W)", f"{tmp}/c{chunk}.zarr", None, chunk,
                        end_of(args.days)))
        if server is not None:
            targets.append((f"moto S3, {args.s3_days} d, chunks ({chunk}, H, W)", f"s3://bench/c{chunk}.zarr", s3,
                            chunk, end_of(args.s3_days)))

    rows = []
    for name, url, options, chunk, end in targets:
        write_seconds, _ = timed(lambda: write_synthetic_era5(url, end=end, chunks=chunk, nlat=args.grid[0],
                                                              nlon=args.grid[1], storage_options=options))
        runs = [(raw_read(url, options, 10), raw_read(url, options, 64),
                 *(blocks_alone(url, options, args.window, amp) for amp in args.max_read_amplification),
                 *(epoch(url, options, args.window, depth, amp) for amp, depth in settings))
                for _ in range(args.repeats)]  # alternating, so drifts of the machine fall on every one
        nbytes = runs[0][0][1]
        raw10, raw64 = (min(r[k][0] for r in runs) for k in range(2))
        alone = {amp: min(r[2 + k] for r in runs) for k, amp in enumerate(args.max_read_amplification)}
        xb, isel = alternatives(url, options, args.window, args.sample) if options is None else (np.nan, np.nan)
        for k, (amp, depth) in enumerate(settings, start=2 + len(alone)):
            (_, count, amplification, block), ep = runs[0][k], min(r[k][0] for r in runs)
            label = f", blocks of {block} (max amplification {amp})"
            label += "" if depth is None else f", prefetch {depth}"
            rows.append((name + label, nbytes / 1e6, write_seconds, raw10, raw64, alone[amp], ep, count / ep,
                         amplification, ep / min(raw10, raw64), xb, isel))
        print(f"done: {name}", flush=True)
    if server is not None:
        server.stop()

    print(f"\nhourly {args.grid[0]}x{args.grid[1]} float32 stores from 2015-01-01, window T={args.window}, stride 1\n")
    print("| store | MB | raw read, concurrency 10 (s, MB/s) | raw read, concurrency 64 (s, MB/s) "
          "| its blocks, zarr alone (s) | WindowDataset epoch (s) | windows/s | read amplification "
          "| epoch / best raw read | xbatcher windows/s | per-window isel windows/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, mb, _, r10, r64, alone, ep, rate, amp, ratio, xb, isel in rows:
        print(f"| {name} | {mb:.0f} | {r10:.3f} s, {mb / r10:.0f} | {r64:.3f} s, {mb / r64:.0f} | {alone:.3f} "
              f"| {ep:.3f} | {rate:,.0f} | {amp:.3f} | {ratio:.2f}x | {rate_text(xb)} | {rate_text(isel)} |")


if __name__ == "__main__":
    main()
