"""Batched, streaming rollouts written to a zarr store with forecast coordinates, atomically.

Layout of the store: one variable per channel (named as the channel spec, e.g. `z` or
`geopotential@500`), dims `(init_time, lead_time, latitude, longitude)`, physical units (de-normalised),
`lead_time` as timedelta (lead k = k time steps after init), `init_time` = the last context frame.
Root attrs say which model, config and data made it.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from minconv_dist.data import DimNames, open_store, select_channels
from minconv_dist.data.selection import coarsen as coarsen_grid
from minconv_dist.evaluate.metrics import LAT, LEAD, LON, TIME


def time_step(times: np.ndarray) -> np.timedelta64:
    """The store's one time step; forecasts are made in these steps, so it must be regular."""
    if times.size < 2:
        raise ValueError("the data has fewer than 2 time steps; cannot infer the forecast time step")
    steps = np.unique(np.diff(times))
    if steps.size != 1:
        raise ValueError(f"irregular time axis (steps {steps[:3]} ...); forecasts need a regular one")
    return steps[0]


def check_inputs(model: torch.nn.Module, data: xr.DataArray, init_time: np.ndarray, context: int, steps: int) -> np.ndarray:
    """Indices of the init times in `data`; raises before any rollout if anything does not fit.

    data: (time, channel, lat, lon) as `data.select_channels` gives it.
    """
    if context < 1 or steps < 1:
        raise ValueError(f"context={context} and steps={steps} must both be >= 1")
    channels = [str(c) for c in data["channel"].values]
    if model.normalizer.channels != channels:
        raise ValueError(f"the model takes channels {model.normalizer.channels}, the data gives {channels}; "
                         "pass the channels it was trained on")
    grid = (data.sizes["lat"], data.sizes["lon"])
    if model.grid is not None and tuple(model.grid) != grid:
        raise ValueError(f"the model was built for grid {tuple(model.grid)} (LayerNorm over [H, W]), the data "
                         f"is {grid}; coarsen the data to match")
    times = data["time"].values
    time_step(times)
    idx = np.searchsorted(times, init_time)
    bad = (idx >= times.size) | (times[np.minimum(idx, times.size - 1)] != init_time)
    if bad.any():
        raise ValueError(f"init times {init_time[bad][:3]} are not in the data ({times[0]} .. {times[-1]})")
    short = idx < context - 1
    if short.any():
        raise ValueError(f"init time {init_time[short][0]} has fewer than context={context} frames before it "
                         f"in the data (which starts {times[0]})")
    return idx


def write_forecast(
    model: torch.nn.Module,
    data: xr.DataArray,
    init_time: np.ndarray,
    *,
    context: int,
    steps: int,
    out: str,
    batch_size: int = 8,
    attrs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> str:
    """Roll `model` out from each init time and write the forecast store at the local path `out`.

    data: (time, channel, lat, lon) in physical units (lazy is fine: only `batch_size` context windows
    are loaded at a time). Each init warms up on its `context` frames ending at init time, then
    forecasts `steps` frames. Written under a temporary name in the same folder, renamed when whole.
    """
    init_time = np.asarray(init_time, dtype="datetime64[ns]")
    idx = check_inputs(model, data, init_time, context, steps)
    channels = [str(c) for c in data["channel"].values]
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    dt = time_step(data["time"].values)
    H, W = data.sizes["lat"], data.sizes["lon"]
    coords = {TIME: init_time, LEAD: dt * np.arange(1, steps + 1), LAT: data["lat"].values, LON: data["lon"].values}
    import dask.array as dsa

    template = xr.Dataset(
        {c: ((TIME, LEAD, LAT, LON), dsa.zeros((init_time.size, steps, H, W), chunks=(batch_size, steps, H, W),
                                               dtype=np.float32)) for c in channels},
        coords=coords,
        attrs={k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v) for k, v in (attrs or {}).items()},
    )
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(out)}")
    try:
        template.to_zarr(tmp, mode="w", compute=False, consolidated=False, zarr_format=3)
        model = model.to(device).eval()
        window = np.arange(-context + 1, 1)
        for i in range(0, init_time.size, batch_size):
            rows = idx[i:i + batch_size, None] + window  # [b, context] time indices
            x = data.isel(time=xr.DataArray(rows, dims=("b", "t"))).transpose("b", "t", "channel", "lat", "lon")
            x = torch.from_numpy(x.values.astype(np.float32)).to(device)
            with torch.no_grad():
                y, _ = model.rollout(x, steps)  # physical units: the model normalises inside
            y = y.float().cpu().numpy()  # [b, steps, C, H, W]
            part = xr.Dataset({c: ((TIME, LEAD, LAT, LON), y[:, :, k]) for k, c in enumerate(channels)},
                              coords={TIME: init_time[i:i + batch_size]})
            part.to_zarr(tmp, region={TIME: slice(i, i + len(rows))}, consolidated=False)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def open_channels(url: str, channels: str | list, *, dims: DimNames = DimNames(), coarsen: int = 1,
                  storage_options: dict | None = None) -> xr.DataArray:
    """Lazy (time, channel, lat, lon) from a store, block-averaged by `coarsen` as the training windows are."""
    return coarsen_grid(select_channels(open_store(url, storage_options), channels, dims), coarsen, "lat", "lon", url)


def init_times(times: np.ndarray, start: str | None, end: str | None, every: str) -> np.ndarray:
    """Init times in the data between `start` and `end` (inclusive), one every `every` (e.g. "12h", "14D")."""
    t = pd.DatetimeIndex(times)
    t = t[(t >= pd.Timestamp(start or t[0])) & (t <= pd.Timestamp(end or t[-1]))]
    if t.empty:
        raise ValueError(f"no data times between {start} and {end} (data covers {times[0]} .. {times[-1]})")
    wanted = pd.date_range(t[0], t[-1], freq=pd.Timedelta(every))
    return wanted[wanted.isin(t)].values
