"""Reference forecasts laid out like a model's, so the same metric code scores all of them.

- persistence: the state at init time, held for every lead (hard to beat at short leads);
- climatology: the climatological mean at each valid time's day of year (and hour), the floor every model
  must beat at long leads.
"""
from __future__ import annotations

import numpy as np
import xarray as xr

from minconv_dist.evaluate.layout import LEAD, TIME


def persistence(truth: xr.Dataset, init_time: xr.DataArray, lead_time: xr.DataArray) -> xr.Dataset:
    """truth (time, latitude, longitude) -> (time, prediction_timedelta, latitude, longitude), `time` now the
    init time: the truth at init time for every lead."""
    missing = ~np.isin(init_time.values, truth["time"].values)
    if missing.any():
        raise ValueError(f"init times {init_time.values[missing][:3]} ... are not in the truth")
    at_init = truth.sel(time=init_time.values)
    return at_init.expand_dims({LEAD: lead_time.values}, axis=1).transpose(TIME, LEAD, ...)


def climatology_at(climatology: xr.Dataset, valid_time: xr.DataArray) -> xr.Dataset:
    """The climatology (dims dayofyear[, hour], latitude, longitude) at each valid time, with valid_time's dims.

    Picks the valid time's day of year and, when the climatology has an `hour` dim (as
    `minconv_dist.data.weatherbench2_climatology` has), its hour of day: the selection of weatherbench2
    `weatherbench2/metrics.py`, `ACC.compute_chunk`. Day 366 falls back to day 365 when the climatology has
    no day 366 (no leap day in its reference period).
    """
    doy = valid_time.dt.dayofyear
    if 366 not in climatology["dayofyear"].values:
        doy = doy.where(doy < 366, 365)
    keys = {"dayofyear": doy}
    if "hour" in climatology.dims:
        keys["hour"] = valid_time.dt.hour
    for name, wanted in keys.items():
        absent = np.setdiff1d(np.unique(wanted.values), climatology[name].values)
        if absent.size:
            raise ValueError(f"climatology has no {name} {absent[:5].tolist()}; it covers "
                             f"{climatology[name].values.min()}..{climatology[name].values.max()}")
    return climatology.sel(keys).drop_vars(list(keys), errors="ignore")


def climatology_forecast(climatology: xr.Dataset, init_time: xr.DataArray, lead_time: xr.DataArray) -> xr.Dataset:
    """(time, prediction_timedelta, latitude, longitude), `time` the init time: the climatology at each valid time."""
    valid = init_time + lead_time
    return climatology_at(climatology, valid).transpose(TIME, LEAD, ...)
