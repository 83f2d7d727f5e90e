"""Batched, streaming rollouts written to a zarr store in the WeatherBench2 forecast layout, all or nothing.

Layout of the store (`evaluate/layout.py`): dims `time` (the init time: the last frame read before the
forecast), `prediction_timedelta` (lead k = k data time steps), `latitude`, `longitude`, and `level` for
variables on pressure levels; variables named as WeatherBench2 names them (`geopotential` on `level` 500,
not `geopotential@500`; `z` is z500), physical units, CF attributes, consolidated metadata, zarr format 2.
Root attrs say which model, config and data made it; `channels` lists the model's channels.

Two ways to give the model its state at each init time:
- context (any cell): warm up on the `context` frames ending at init time, per init, in batches;
- warm-up pass (Min cells): one pass over the record from `warmup` frames before the first init time, in
  consecutive parallel scans between init times with the state carried (`Network.warm_states`).

Either way the store is read up to the init time only. A model with forcings gets them computed from the valid
times (init time + lead) and the data's grid (`data/forcings.py`); its static fields are in its weights.
"""
from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
import xarray as xr

from minconv_dist.data import DimNames, open_store, select_channels, store_dims
from minconv_dist.data.chunks import label
from minconv_dist.data.forcings import check_times, compute_forcings
from minconv_dist.data.selection import coarsen as coarsen_grid
from minconv_dist.data.store import COMPLETE_ATTR, redact, set_attrs, zarr_store
from minconv_dist.evaluate.layout import LAT, LEAD, LON, TIME, to_weatherbench2, with_cf_attrs
from minconv_dist.evaluate.nan_inputs import describe, nan_inits
from minconv_dist.evaluate.outputs import staged
from minconv_dist.models import MinConvCell

log = logging.getLogger(__name__)


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
    if model.static is not None and tuple(model.static.values.shape[-2:]) != grid:
        raise ValueError(f"the model's static fields {model.static.channels} lie on grid "
                         f"{tuple(model.static.values.shape[-2:])}, the data is {grid}; coarsen the data to match")
    times = data["time"].values
    time_step(times)
    if model.forcings:
        check_times(times, "the data")
    idx = np.searchsorted(times, init_time)
    bad = (idx >= times.size) | (times[np.minimum(idx, times.size - 1)] != init_time)
    if bad.any():
        raise ValueError(f"init times {init_time[bad][:3]} are not in the data ({times[0]} .. {times[-1]})")
    short = idx < context - 1
    if short.any():
        raise ValueError(f"init time {init_time[short][0]} has fewer than context={context} frames before it "
                         f"in the data (which starts {times[0]})")
    return idx


def warmup_start(model: torch.nn.Module, idx: np.ndarray, warmup: int | str) -> int:
    """First frame of the warm-up pass: the record's first with "all", else `warmup` frames ending at the
    first init time (so `warmup=N` for one init equals `context=N`). Refuses non-Min cells and unsorted inits."""
    kinds = sorted({type(c).__name__ for c in model.cells if not isinstance(c, MinConvCell)})
    if kinds:
        raise ValueError(f"--warmup runs the Min cells' parallel scan over the record; this model has {kinds} "
                         "cells, which run step by step: use --context instead")
    if (np.diff(idx) <= 0).any():
        raise ValueError("--warmup needs strictly ascending init times")
    if warmup == "all":
        return 0
    if int(warmup) < 1 or idx[0] < int(warmup) - 1:
        raise ValueError(f"--warmup {warmup}: need 1 <= warmup <= {idx[0] + 1} (the frames up to the first "
                         "init time)")
    return int(idx[0]) - int(warmup) + 1


def _frames(data: xr.DataArray, rows: np.ndarray, device: str | torch.device) -> torch.Tensor:
    """data at time indices rows [b, t] -> float32 tensor [b, t, C, H, W] on `device`."""
    x = data.isel(time=xr.DataArray(rows, dims=("b", "t"))).transpose("b", "t", "channel", "lat", "lon")
    return torch.from_numpy(x.values.astype(np.float32)).to(device)


def _forcings(model: torch.nn.Module, data: xr.DataArray, valid: np.ndarray, device: str | torch.device
              ) -> torch.Tensor | None:
    """The model's forcings at valid times `valid` [b, t] on data's grid, [b, t, F, H, W] (None without forcings):
    computed from the times, whether or not the store has those frames."""
    if not model.forcings:
        return None
    f = compute_forcings(model.forcings, valid.ravel(), data["lat"].values, data["lon"].values)
    return torch.from_numpy(f.reshape(*valid.shape, *f.shape[1:])).to(device)


def context_forecasts(model: torch.nn.Module, data: xr.DataArray, idx: np.ndarray, *, context: int, steps: int,
                      batch_size: int, device: str | torch.device) -> Iterator[tuple[int, torch.Tensor]]:
    """(first init's position, forecasts [b, steps, C, H, W]) per batch: each warmed up on its own context."""
    window = np.arange(-context + 1, 1)
    times, step = data["time"].values, time_step(data["time"].values)
    for i in range(0, idx.size, batch_size):
        rows = idx[i:i + batch_size, None]
        valid = times[rows] + step * np.arange(-context + 1, steps)  # the context's frames, then the closed loop's
        with torch.no_grad():
            y, _ = model.rollout(_frames(data, rows + window, device), steps,
                                 forcings=_forcings(model, data, valid, device))
        yield i, y


@torch.no_grad()
def _forecast_from(model: torch.nn.Module, warm: list, steps: int, forcings: torch.Tensor | None) -> torch.Tensor:
    """Forecasts [b, steps, C, H, W] from b (state, first prediction) pairs of `Network.warm_states`; forcings:
    those of lead times 1 .. steps - 1, the frames the closed loop reads ([b, steps - 1, F, H, W] or None)."""
    state = [torch.cat(layer, dim=0) for layer in zip(*(s for s, _ in warm))]
    first = torch.cat([y for _, y in warm], dim=0)[:, None]
    if steps == 1:
        return first
    return torch.cat([first, model.rollout(first, steps - 1, state, forcings=forcings)[0]], dim=1)


def warm_forecasts(model: torch.nn.Module, data: xr.DataArray, idx: np.ndarray, *, start: int, steps: int,
                   batch_size: int, device: str | torch.device, chunk: int = 256
                   ) -> Iterator[tuple[int, torch.Tensor]]:
    """(first init's position, forecasts [b, steps, C, H, W]) per batch, the states from one pass over frames
    start..idx[-1], read `chunk` frames at a time with the state carried (memory: one chunk of frames, and the
    states of the init times in it until a batch of them is rolled out)."""
    pending, done, state = [], 0, None
    times, step = data["time"].values, time_step(data["time"].values)
    for c0 in range(start, int(idx[-1]) + 1, chunk):
        c1 = min(c0 + chunk, int(idx[-1]) + 1)
        ends = idx[(idx >= c0) & (idx < c1)] - c0
        with torch.no_grad():
            warm, state = model.warm_states(_frames(data, np.arange(c0, c1)[None], device), ends, state,
                                            forcings=_forcings(model, data, times[None, c0:c1], device))
        pending += warm
        while len(pending) >= batch_size or (pending and c1 > idx[-1]):
            batch, pending = pending[:batch_size], pending[batch_size:]
            valid = times[idx[done:done + len(batch)], None] + step * np.arange(1, steps)
            yield done, _forecast_from(model, batch, steps, _forcings(model, data, valid, device))
            done += len(batch)


def forecast_template(channels: list[str], init_time: np.ndarray, lead: np.ndarray, lat: np.ndarray,
                      lon: np.ndarray, batch_size: int) -> xr.Dataset:
    """The whole store, lazily (NaN, not computed): WB2 layout, CF attrs, chunks of `batch_size` init times."""
    import dask.array as dsa

    shape = (init_time.size, lead.size, lat.size, lon.size)
    fields = {c: ((TIME, LEAD, LAT, LON), dsa.full(shape, np.nan, dtype=np.float32, chunks=(batch_size, -1, -1, -1)))
              for c in channels}
    wb2 = with_cf_attrs(to_weatherbench2(xr.Dataset(fields, coords={TIME: init_time, LEAD: lead, LAT: lat, LON: lon})))
    return wb2.chunk({d: batch_size if d == TIME else -1 for d in wb2.dims})


def _write_batch(store: Any, y: torch.Tensor, channels: list[str], position: int) -> None:
    """Forecasts [b, steps, C, H, W] into the store's init-time rows position..position+b."""
    y = y.float().cpu().numpy()
    part = to_weatherbench2(xr.Dataset({c: ((TIME, LEAD, LAT, LON), y[:, :, k]) for k, c in enumerate(channels)}))
    part.drop_vars(list(part.coords)).to_zarr(store, region={TIME: slice(position, position + len(y))},
                                              consolidated=False)


def write_forecast(
    model: torch.nn.Module,
    data: xr.DataArray,
    init_time: np.ndarray,
    *,
    context: int = 20,
    steps: int,
    out: str,
    warmup: int | str | None = None,
    warmup_chunk: int = 256,
    batch_size: int = 8,
    attrs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
    storage_options: dict | None = None,
    allow_nan: bool = False,
) -> str:
    """Roll `model` out from each init time and write the forecast store at `out` (a local path or any
    fsspec URL, with `storage_options`), all or nothing (`evaluate/outputs.py`).

    data: (time, channel, lat, lon) in physical units (lazy is fine: only one batch of context windows, or
    one `warmup_chunk` of frames, is loaded at a time). With `warmup=None` each init warms up on its
    `context` frames ending at init time; with `warmup=N` or "all" (Min cells only) the states come from one
    pass over the record starting N frames before the first init time (its first frame with "all").
    Then each init forecasts `steps` frames.

    Init times whose inputs hold NaN (`nan_inputs.nan_inits`) are refused before any rollout, naming them and
    the channel; with `allow_nan` their (NaN) forecasts are written, said in one logged line and listed in
    the store's `nan_inputs` attr.
    """
    init_time = np.asarray(init_time, dtype="datetime64[ns]")
    idx = check_inputs(model, data, init_time, context if warmup is None else 1, steps)
    start = None if warmup is None else warmup_start(model, idx, warmup)
    nan = nan_inits(data, idx, context, start)
    if nan:
        count = len(set(np.concatenate(list(nan.values()))))
        what = f"{count} of {idx.size} init times read NaN ({describe(nan)})"
        if not allow_nan:
            raise ValueError(f"{what}: their forecasts would be NaN; choose other init times or pass --allow-nan "
                             "to write them")
        log.warning("writing NaN forecasts: %s; listed in the store's nan_inputs attr", what)
    channels = [str(c) for c in data["channel"].values]
    lead = time_step(data["time"].values) * np.arange(1, steps + 1)
    template = forecast_template(channels, init_time, lead, data["lat"].values, data["lon"].values, batch_size)
    template.attrs = {k: v if isinstance(v, (str, int, float, bool)) else json.dumps(v)
                      for k, v in {**(attrs or {}), "channels": channels, COMPLETE_ATTR: False}.items()}
    if nan:
        template.attrs["nan_inputs"] = json.dumps({c: [label(t) for t in times] for c, times in nan.items()})
    model = model.to(device).eval()
    run = dict(steps=steps, batch_size=batch_size, device=device)
    batches = (context_forecasts(model, data, idx, context=context, **run) if start is None else
               warm_forecasts(model, data, idx, start=start, chunk=warmup_chunk, **run))
    with staged(out, storage_options, overwrite) as target:
        store = zarr_store(target, storage_options)
        template.to_zarr(store, mode="w", compute=False, consolidated=False, zarr_format=2)
        for position, y in batches:
            _write_batch(store, y, channels, position)
        set_attrs(target, storage_options, **{COMPLETE_ATTR: True})  # last: marks it whole, consolidates
    return out


def open_forecast(url: str, storage_options: dict | None = None) -> xr.Dataset:
    """A forecast store, lazily; refuses one whose writer did not finish (`minconv_complete` False)."""
    try:
        return open_store(url, storage_options)
    except ValueError as err:
        if "incomplete" not in str(err):
            raise
        raise ValueError(f"forecast store {redact(url)!r} is incomplete: the forecast job writing it did not "
                         "finish; run it again with --overwrite") from err


def open_channels(url: str, channels: str | list, *, dims: DimNames = DimNames(), coarsen: int = 1,
                  storage_options: dict | None = None) -> xr.DataArray:
    """Lazy (time, channel, lat, lon) from a store, block-averaged by `coarsen` as the training windows are.
    `dims` may spell latitude/longitude either way (`store_dims`)."""
    ds = open_store(url, storage_options)
    return coarsen_grid(select_channels(ds, channels, store_dims(ds, dims)), coarsen, "lat", "lon", url)


def init_times(times: np.ndarray, start: str | None, end: str | None, every: str) -> np.ndarray:
    """Init times in the data between `start` and `end` (inclusive), one every `every` (e.g. "12h", "14D")."""
    t = pd.DatetimeIndex(times)
    t = t[(t >= pd.Timestamp(start or t[0])) & (t <= pd.Timestamp(end or t[-1]))]
    if t.empty:
        raise ValueError(f"no data times between {start} and {end} (data covers {times[0]} .. {times[-1]})")
    wanted = pd.date_range(t[0], t[-1], freq=pd.Timedelta(every))
    return wanted[wanted.isin(t)].values
