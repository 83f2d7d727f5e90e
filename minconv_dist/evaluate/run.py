"""The evaluation job's steps as library calls: score a forecast store against its truth store beside the
baselines, write the table, the skill store and the plots, and log them to an MLflow run."""
from __future__ import annotations

import os
import re
import time

import xarray as xr

from minconv_dist.data import CLIMATOLOGIES, DimNames, default_store, open_store
from minconv_dist.data.selection import coarsen as coarsen_grid
from minconv_dist.evaluate.forecast import open_channels
from minconv_dist.evaluate.metrics import align_truth
from minconv_dist.evaluate.plots import plot_maps, plot_skill
from minconv_dist.evaluate.report import as_fields, evaluate_forecast, to_frame


def evaluate_store(forecast_url: str, *, truth_url: str | None = None, dims: DimNames = DimNames(),
                   coarsen: int | None = None, storage_options: dict | None = None,
                   climatology: str = "weatherbench2", climatology_range: tuple[str, str] | None = None,
                   definition: str = "weatherbench", name: str = "model") -> tuple[xr.Dataset, xr.Dataset, xr.Dataset]:
    """(skill, forecast, truth). The truth defaults to the forecast's `data_source` (else the embedded store),
    coarsened as the forecast says; the climatology baseline needs `climatology_range`."""
    forecast = open_store(forecast_url)
    url = truth_url or forecast.attrs.get("data_source") or default_store()
    coarsen = coarsen or int(forecast.attrs.get("coarsen", 1))
    channels = list(map(str, forecast.data_vars))
    truth = as_fields(open_channels(url, channels, dims=dims, coarsen=coarsen, storage_options=storage_options))
    align_truth(forecast, truth)  # fail on mismatched variables, grids or times before the climatology pass
    clim = None
    if climatology_range:
        raw = CLIMATOLOGIES[climatology](url, channels, dims, tuple(climatology_range), storage_options,
                                        progress=False)
        clim = as_fields(coarsen_grid(raw, coarsen, "lat", "lon", url))
    return evaluate_forecast(forecast, truth, clim, definition, name), forecast, truth


def write_outputs(skill: xr.Dataset, forecast: xr.Dataset, truth: xr.Dataset, out: str,
                  map_leads: list[int] | None = None) -> list[str]:
    """metrics.csv, skill.zarr, skill_<var>.png and maps_<var>.png in folder `out`; returns the files."""
    os.makedirs(out, exist_ok=True)
    files = [os.path.join(out, "metrics.csv")]
    to_frame(skill).to_csv(files[0], index=False)
    labels = {d: skill[d].values.astype(object) for d in ("source", "metric")}  # variable-length strings in zarr v3
    skill.assign_coords(labels).to_zarr(os.path.join(out, "skill.zarr"), mode="w", consolidated=False)
    for var in map(str, skill.data_vars):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", var)
        files.append(str(plot_skill(skill, var, os.path.join(out, f"skill_{safe}.png"))))
        files.append(str(plot_maps(forecast, truth, var, os.path.join(out, f"maps_{safe}.png"), map_leads)))
    return files


def log_to_mlflow(skill: xr.Dataset, files: list[str], run_id: str, tracking_uri: str | None = None) -> None:
    """Every (source, metric, variable) as a metric `eval/<source>/<metric>/<variable>` stepped by lead hour,
    and the files under `evaluation/`, into an existing run (through an explicit client)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client, now = MlflowClient(tracking_uri), int(time.time() * 1000)
    metrics = [Metric(re.sub(r"[^A-Za-z0-9_./ -]", "_", f"eval/{row['source']}/{row['metric']}/{var}"),
                      float(row[var]), now, int(row["lead_time_h"]))
               for row in to_frame(skill).to_dict("records") for var in map(str, skill.data_vars)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for path in files:
        client.log_artifact(run_id, path, artifact_path="evaluation")
