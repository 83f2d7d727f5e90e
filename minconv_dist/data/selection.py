"""What part of a store a run reads: its time period, its samples, its grid coarsening. One place checks each,
so the windows, the statistics and the forecast and evaluation jobs fail with the same messages."""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.data.channels import channel_layers, parse_channels, stack_channels
from minconv_dist.data.chunks import Source, dask_layer, label
from minconv_dist.data.store import DataError, DimNames, open_store, redact


def time_slice(da: xr.DataArray, time_range: tuple | None, url: str, dim: str = "time",
               key: str = "time_range") -> slice:
    """Integer slice of `da`'s time coordinate `dim` within `time_range` (`[start, end]`, both inclusive;
    None: all). A missing or unordered time coordinate is the store's fault (DataError); a range that selects
    nothing, or cannot be compared with the coordinate, is the caller's (ValueError naming `key`)."""
    if dim not in da.coords:
        if time_range is None:  # positions will do
            return slice(0, da.sizes[dim])
        raise DataError(f"{redact(url)!r} has no time coordinate {dim!r} (the dim has no values), so "
                        f"{key}={list(time_range)} cannot be selected")
    index = pd.Index(da[dim].values)
    _check_increasing(index, url, dim)
    if time_range is None:
        return slice(0, index.size)
    try:
        sl = index.slice_indexer(*time_range)
    except TypeError as err:
        raise ValueError(f"{key}={list(time_range)} cannot select from the time coordinate {dim!r} of "
                         f"{redact(url)!r} ({index.dtype} values {label(index[0])} to {label(index[-1])})") from err
    start, stop = sl.start or 0, index.size if sl.stop is None else sl.stop
    if stop <= start:
        raise ValueError(f"{key}={list(time_range)} selects no time steps in {redact(url)!r} "
                         f"(store covers {index[0]} to {index[-1]})")
    return slice(start, stop)


def _check_increasing(index: pd.Index, url: str, dim: str) -> None:
    """Windows and periods assume time runs forward, one frame per label."""
    steps = np.flatnonzero(~(index[1:] > index[:-1]))
    if steps.size:
        i = int(steps[0])
        raise DataError(f"the time coordinate {dim!r} of {redact(url)!r} is not strictly increasing: "
                        f"{label(index[i + 1])} (position {i + 1}) follows {label(index[i])}")


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
                 sample_range: tuple[int, int] | None, storage_options: dict | None = None, *,
                 allow_nan: bool = False) -> xr.DataArray:
    """Lazy (dask) `[[sample,] time, channel, lat, lon]` of a split: its period and (for sample stores) its
    samples. Opened from a URL, its reads name the chunk that fails or is missing (`chunks.read`; with
    `allow_nan` a missing chunk that reads as NaN is left to the caller, as NaN)."""
    ds = open_store(url_or_ds, storage_options, dask=False) if isinstance(url_or_ds, str) else url_or_ds
    url = url_or_ds if isinstance(url_or_ds, str) else "the dataset"
    samples = sample_slice(ds.sizes[dims.sample] if dims.sample else 1, sample_range, url, dims.sample)
    specs = parse_channels(channels)
    layers = channel_layers(ds, specs, dims)
    if isinstance(url_or_ds, str):
        layers = [dask_layer(layer, Source(url, spec, dims, storage_options, allow_nan))
                  for spec, layer in zip(specs, layers)]
    da = stack_channels(layers, specs, dims)
    da = da.isel(time=time_slice(da, time_range, url))
    return da.isel(sample=samples) if dims.sample else da
