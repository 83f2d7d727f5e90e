"""The evaluation job's steps as library calls: score forecast stores (ours, or any in the WeatherBench2 layout)
against a truth store beside the baselines, write the table, the skill store and the plots to any fsspec URL
(all or nothing), and log them to an MLflow run."""
from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.data import CLIMATOLOGIES, DimNames, default_store, open_store, parse_channels, store_dims
from minconv_dist.data.selection import coarsen as coarsen_grid
from minconv_dist.data.store import redact
from minconv_dist.evaluate.forecast import open_channels, open_forecast
from minconv_dist.evaluate.layout import (TIME, from_weatherbench2, label, listed_channels, store_channels,
                                          to_weatherbench2, units)
from minconv_dist.evaluate.metrics import align_truth, match_grid
from minconv_dist.evaluate.outputs import check_complete, filesystem, publish_folder
from minconv_dist.evaluate.plots import plot_maps, plot_skill
from minconv_dist.evaluate.report import as_fields, evaluate_forecasts, to_frame

log = logging.getLogger(__name__)


def common_fields(forecasts: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
    """The forecasts restricted to the channels and init times all of them have (in the first's order), so
    every source is scored on the same cases; raises ValueError when nothing is shared."""
    first = next(iter(forecasts.values()))
    channels = [c for c in map(str, first.data_vars) if all(c in fc.data_vars for fc in forecasts.values())]
    inits = first[TIME].values
    for fc in forecasts.values():
        inits = inits[np.isin(inits, fc[TIME].values)]
    if not channels or not inits.size:
        found = {name: (sorted(map(label, fc.data_vars)), fc.sizes[TIME]) for name, fc in forecasts.items()}
        raise ValueError(f"the forecasts share no {'variable' if not channels else 'init time'} that the truth "
                         f"store holds: (variables, init times) per forecast: {found}")
    for name, fc in forecasts.items():
        if len(fc.data_vars) > len(channels) or fc.sizes[TIME] > inits.size:
            log.warning("%s: scoring %d of its %d variables and %d of its %d init times (those all forecasts "
                        "share)", name, len(channels), len(fc.data_vars), inits.size, fc.sizes[TIME])
    return {name: fc[channels].sel({TIME: inits}) for name, fc in forecasts.items()}


def recorded_dims(forecast: xr.Dataset) -> DimNames:
    """The dim names of the store a forecast of ours was made from (its `config` attr's `dims`), else the
    defaults."""
    config = forecast.attrs.get("config")
    dims = (json.loads(config) if isinstance(config, str) else config or {}).get("dims") or {}
    return DimNames(**dims)


def evaluate_stores(forecasts: dict[str, str], *, truth_url: str | None = None, dims: DimNames | None = None,
                    coarsen: int | None = None, storage_options: dict | None = None,
                    forecast_storage_options: dict | None = None, climatology: str = "weatherbench2",
                    climatology_range: tuple[str, str] | None = None, definition: str = "weatherbench",
                    drop_nan_inits: bool = False) -> tuple[xr.Dataset, dict[str, xr.Dataset], xr.Dataset]:
    """(skill, forecasts in internal channels, truth) for forecast stores {name: url} in the WB2 layout.

    The truth defaults to the first forecast's `data_source` (else the embedded store), coarsened as it says
    (`coarsen` attr), in the dim names it records (`recorded_dims`) unless `dims` are given; each forecast's
    WB2 variables are matched to the truth store's channels (`z` is geopotential at 500); all are scored on the
    variables and init times they share (`evaluate_forecasts`, `drop_nan_inits`). The climatology baseline
    needs `climatology_range`."""
    opened = {name: open_forecast(url, forecast_storage_options) for name, url in forecasts.items()}
    first = next(iter(opened.values()))
    url = truth_url or first.attrs.get("data_source") or default_store()
    if dims is None:
        dims = recorded_dims(first) if not truth_url and first.attrs.get("data_source") else DimNames()
    coarsen = coarsen or int(first.attrs.get("coarsen", 1))
    truth_store = open_store(url, storage_options)
    dims = store_dims(truth_store, dims)  # `lat` or `latitude`, as the truth store spells it
    candidates = (listed_channels(first) or []) + store_channels(truth_store, dims)
    fields = common_fields({name: from_weatherbench2(fc, candidates) for name, fc in opened.items()})
    channels = list(map(str, next(iter(fields.values())).data_vars))
    truth = as_fields(open_channels(url, channels, dims=dims, coarsen=coarsen, storage_options=storage_options))
    for channel in channels:  # for the plots: the store's CF units, else ERA5's
        truth[channel].attrs["units"] = units(channel, truth_store[parse_channels(channel)[0].variable].attrs)
    fields = {name: match_grid(fc, truth, ("forecast", "truth")) for name, fc in fields.items()}
    for fc in fields.values():
        align_truth(fc, truth)  # fail on mismatched grids or times before the climatology pass
    clim = None
    if climatology_range:
        raw = CLIMATOLOGIES[climatology](url, channels, dims, tuple(climatology_range), storage_options,
                                        progress=False)
        clim = as_fields(coarsen_grid(raw, coarsen, "lat", "lon", url))
    return evaluate_forecasts(fields, truth, clim, definition, drop_nan_inits), fields, truth


def _safe(channel: str) -> str:
    """A channel's WB2 label as a file or metric name: `z` -> `geopotential_500`."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", label(channel))


def render_outputs(skill: xr.Dataset, forecast: xr.Dataset, truth: xr.Dataset, folder: str | Path,
                   map_leads: list[int] | None = None) -> list[Path]:
    """Into the local `folder`: metrics.csv (every value), skill.zarr (WB2 variables with a `level` dim),
    skill_<variable>_<level>.png for every variable and level, maps_<...>.png of `forecast`."""
    folder = Path(folder)
    files = [folder / "metrics.csv"]
    to_frame(skill).to_csv(files[0], index=False)
    to_weatherbench2(skill).to_zarr(folder / "skill.zarr", mode="w", consolidated=True, zarr_format=2)
    for channel in map(str, skill.data_vars):
        files.append(plot_skill(skill, channel, folder / f"skill_{_safe(channel)}.png",
                                unit=truth[channel].attrs.get("units")))
        files.append(plot_maps(forecast, truth, channel, folder / f"maps_{_safe(channel)}.png", map_leads))
    return files


def write_outputs(skill: xr.Dataset, forecast: xr.Dataset, truth: xr.Dataset, out: str,
                  map_leads: list[int] | None = None, *, storage_options: dict | None = None,
                  overwrite: bool = False, mlflow_run_id: str | None = None,
                  tracking_uri: str | None = None) -> list[str]:
    """`render_outputs` into a temporary folder, published to `out` (any fsspec URL) all or nothing
    (`evaluate/outputs.py`), then logged to the MLflow run if given. Returns the files' names under `out`."""
    with tempfile.TemporaryDirectory() as work:
        files = render_outputs(skill, forecast, truth, work, map_leads)
        written = publish_folder(work, out, storage_options, overwrite)
        if mlflow_run_id:
            log_to_mlflow(skill, [str(f) for f in files], mlflow_run_id, tracking_uri)
    return written


def open_outputs(out: str, storage_options: dict | None = None) -> tuple[xr.Dataset, pd.DataFrame]:
    """(skill.zarr, metrics.csv) of a complete evaluation output; refuses a partial one (`check_complete`)."""
    check_complete(out, storage_options)
    fs, root = filesystem(out, storage_options)
    with fs.open(f"{root}/metrics.csv") as f:
        table = pd.read_csv(f)
    return open_store(f"{out.rstrip('/')}/skill.zarr", storage_options).load(), table


def check_mlflow_run(run_id: str, tracking_uri: str | None = None) -> None:
    """Refuse, before any scoring, a run id the tracking server does not know (ValueError naming both)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as err:
        raise ValueError(f"--mlflow-run-id {run_id}: no such run at tracking URI {redact(client.tracking_uri)} "
                         f"({err.error_code})") from err


def log_to_mlflow(skill: xr.Dataset, files: list[str], run_id: str, tracking_uri: str | None = None) -> None:
    """Every (source, metric, variable, level) as a metric `eval/<source>/<metric>/<variable>_<level>` stepped
    by lead hour (NaN leads skipped), and the files under `evaluation/`, into an existing run (through an
    explicit client)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, now = MlflowClient(tracking_uri), int(time.time() * 1000)
    table = to_frame(skill).dropna(subset=["value"])
    metrics = [Metric(f"eval/{row.source}/{row.metric}/{_safe(row.channel)}", float(row.value), now,
                      int(row.lead_time_h)) for row in table.itertuples()]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for path in files:
        client.log_artifact(run_id, path, artifact_path="evaluation")
