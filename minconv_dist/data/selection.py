"""What part of a store a run reads: its time period, its samples, its grid coarsening. One place checks each,
so the windows, the statistics and the forecast and evaluation jobs fail with the same messages."""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.data.channels import select_channels
from minconv_dist.data.store import DimNames, open_store, redact


def time_slice(times: np.ndarray, time_range: tuple | None, url: str, key: str = "time_range") -> slice:
    """Integer slice of `times` within `time_range` (`[start, end]`, both inclusive; None: all)."""
    index = pd.Index(times)
    if not (index.is_monotonic_increasing and index.is_unique):
        raise ValueError(f"{key}: the time coordinate of {redact(url)!r} is not strictly increasing")
    if time_range is None:
        return slice(0, index.size)
    sl = index.slice_indexer(*time_range)
    start, stop = sl.start or 0, index.size if sl.stop is None else sl.stop
    if stop <= start:
        raise ValueError(f"{key}={list(time_range)} selects no time steps in {redact(url)!r} "
                         f"(store covers {index[0]} to {index[-1]})")
    return slice(start, stop)


def sample_slice(n_samples: int, sample_range: tuple[int, int] | None, url: str, sample_dim: str | None) -> slice:
    """Integer slice of a sample store's trajectories (`[start, stop)`; None: all)."""
    if sample_range is None:
        return slice(0, n_samples)
    if not sample_dim:
        raise ValueError(f"sample_range={list(sample_range)} needs a sample dim: set DimNames(sample=...)")
    start, stop = sample_range
    if not 0 <= start < stop <= n_samples:
        raise ValueError(f"sample_range={list(sample_range)}: need 0 <= start < stop <= {n_samples}, the number "
                         f"of samples in {redact(url)!r}")
    return slice(start, stop)


def coarse_grid(h: int, w: int, factor: int, url: str) -> tuple[int, int]:
    """The grid after `coarsen` by `factor`, which must divide both sides."""
    if factor < 1:
        raise ValueError(f"coarsen={factor}: must be >= 1")
    if h % factor or w % factor:
        raise ValueError(f"coarsen={factor} does not divide the {h}x{w} grid of {redact(url)!r}")
    return h // factor, w // factor


def coarsen(data: xr.DataArray, factor: int, lat: str, lon: str, url: str) -> xr.DataArray:
    """Block means of `factor` x `factor` grid cells (coordinates averaged too); NaN stays NaN, so a missing
    value is never averaged away."""
    coarse_grid(data.sizes[lat], data.sizes[lon], factor, url)
    return data if factor == 1 else data.coarsen({lat: factor, lon: factor}).reduce(np.mean)  # np.mean keeps NaN


def select_split(url_or_ds: str | xr.Dataset, channels: str | list, dims: DimNames, time_range: tuple | None,
                 sample_range: tuple[int, int] | None, storage_options: dict | None = None) -> xr.DataArray:
    """Lazy `[[sample,] time, channel, lat, lon]` of a split: its period and (for sample stores) its samples."""
    ds = open_store(url_or_ds, storage_options) if isinstance(url_or_ds, str) else url_or_ds
    url = url_or_ds if isinstance(url_or_ds, str) else "the dataset"
    samples = sample_slice(ds.sizes[dims.sample] if dims.sample else 1, sample_range, url, dims.sample)
    da = select_channels(ds, channels, dims)
    da = da.isel(time=time_slice(da["time"].values, time_range, url))
    return da.isel(sample=samples) if dims.sample else da
