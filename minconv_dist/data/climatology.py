"""Climatologies over a reference period, for the climatology baseline and the ACC reference.

- `weatherbench2_climatology`: WeatherBench2's, by day of year and hour of day, smoothed over 61 days;
- `dayofyear_climatology`: the plain mean per day of year, unsmoothed.

Both return a DataArray named `climatology`; save it with `.to_dataset().to_zarr(url)`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import numpy as np
import pandas as pd
import xarray as xr
from dask.diagnostics import ProgressBar

from minconv_dist.data.selection import select_split
from minconv_dist.data.store import DimNames

#: WeatherBench2's reference period (its published climatology covers 1990-2019)
WEATHERBENCH2_PERIOD = ("1990-01-01", "2019-12-31")


def dayofyear_climatology(url_or_ds: str | xr.Dataset, channels: str | list, dims: DimNames = DimNames(),
                          time_range: tuple | None = None, storage_options: dict | None = None,
                          progress: bool = True) -> xr.DataArray:
    """Mean per day of year over `time_range`, unsmoothed; dims (dayofyear, channel, lat, lon)."""
    da = select_split(url_or_ds, channels, dims, time_range, None, storage_options)
    with ProgressBar() if progress else nullcontext():
        clim = da.groupby("time.dayofyear").mean("time").compute()
    return clim.transpose("dayofyear", "channel", "lat", "lon").rename("climatology")


def triangular_window(days: int) -> np.ndarray:
    """Weights of a centred `days`-long window: rising linearly from 0 at the ends to 1 at the centre.

    Source: weatherbench2 `weatherbench2/utils.py`, `create_window_weights` (up to their mean-1 scaling,
    which cancels in a weighted mean).
    """
    if days < 3 or days % 2 != 1:
        raise ValueError(f"the window must be an odd number of days, at least 3; got {days}")
    return 1 - np.abs(np.arange(days) - days // 2) / (days // 2)


def circular_window(weights: np.ndarray, n: int) -> np.ndarray:
    """[n, n] matrix `M` with `(M @ x)[i] = Σ_k weights[k] x[(i + k - len(weights) // 2) mod n]`: a centred
    window over a periodic axis, so day 1 follows day n."""
    if len(weights) > n:
        raise ValueError(f"a window of {len(weights)} does not fit a period of {n}")
    offset = (np.arange(n)[None, :] - np.arange(n)[:, None] + len(weights) // 2) % n
    return np.where(offset < len(weights), weights[np.minimum(offset, len(weights) - 1)], 0.0)


def _filled_day_366(time: xr.DataArray) -> np.ndarray:
    """Mask of the samples that also stand for day 366: day 365 of a year whose day 366 is missing at that hour.

    WeatherBench2 fills a year's missing day 366 with its day 365 (`utils.compute_rolling_stat`,
    `stacked.fillna(stacked.sel(dayofyear=365))`); without any day 366 in the data there is none to fill.
    """
    year, day, hour = time.dt.year.values, time.dt.dayofyear.values, time.dt.hour.values
    present = pd.MultiIndex.from_arrays([year[day == 366], hour[day == 366]])
    if present.empty:
        return np.zeros(day.shape, dtype=bool)
    return (day == 365) & ~pd.MultiIndex.from_arrays([year, hour]).isin(present)


def weatherbench2_climatology(url_or_ds: str | xr.Dataset, channels: str | list, dims: DimNames = DimNames(),
                              time_range: tuple | None = WEATHERBENCH2_PERIOD, storage_options: dict | None = None,
                              progress: bool = True, window_days: int = 61) -> xr.DataArray:
    """WeatherBench2's climatology: per day of year and hour of day, smoothed over `window_days` days.

    For each hour of day present in the data and each day of year `d`, the mean over all years of
    `time_range` and all days `d + k`, `|k| <= window_days // 2`, weighted by `triangular_window` (the
    day-of-year axis wraps around: day 1 follows the last day). A year without day 366 (at an hour) counts its
    day 365 there; the year has 366 days when the data hold a day 366, else 365. NaNs are left out; a day
    and hour with no data within its window is NaN. Dims (dayofyear, hour, channel, lat, lon).

    Source: weatherbench2 `scripts/compute_climatology.py` (defaults `--frequency=hourly --window_size=61
    --method=explicit`, reference years 1990-2019 in its published climatology), which calls
    `weatherbench2/utils.py` `compute_hourly_stat` / `compute_rolling_stat`. Equal to it for whole years;
    on a partial year WeatherBench2 also fills the year's other missing days with its day 365, here they
    are left out.
    """
    da = select_split(url_or_ds, channels, dims, time_range, None, storage_options)
    time = da["time"]
    rows = np.concatenate([np.arange(time.size), np.flatnonzero(_filled_day_366(time))])
    day = np.concatenate([time.dt.dayofyear.values, np.full(rows.size - time.size, 366)])
    hours, hour = np.unique(time.dt.hour.values[rows], return_inverse=True)
    year = time.dt.year.values[rows]
    total = np.zeros((366 if (day == 366).any() else 365, hours.size, *da.shape[1:]))
    count = np.zeros_like(total)
    with ProgressBar() if progress else nullcontext():
        for y in np.unique(year):  # one year in memory at a time
            at = year == y
            values = da.isel(time=rows[at]).values.astype("float64")
            np.add.at(total, (day[at] - 1, hour[at]), np.nan_to_num(values))
            np.add.at(count, (day[at] - 1, hour[at]), ~np.isnan(values))
    window = circular_window(triangular_window(window_days), len(total))
    with np.errstate(invalid="ignore"):  # 0 / 0: no data within the window of that day and hour
        clim = np.tensordot(window, total, axes=1) / np.tensordot(window, count, axes=1)
    coords = {"dayofyear": np.arange(1, len(total) + 1), "hour": hours, **{d: da[d] for d in da.dims[1:]}}
    return xr.DataArray(clim, dims=("dayofyear", "hour", *da.dims[1:]), coords=coords, name="climatology")


#: name (jobs/evaluate.py --climatology) -> climatology function; all take (url_or_ds, channels, dims,
#: time_range, storage_options, progress)
CLIMATOLOGIES: dict[str, Callable[..., xr.DataArray]] = {
    "weatherbench2": weatherbench2_climatology,
    "dayofyear": dayofyear_climatology,
}
