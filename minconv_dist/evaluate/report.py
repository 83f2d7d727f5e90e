"""Score a forecast store against the truth, with persistence and climatology beside it."""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.evaluate.baselines import climatology_forecast, persistence
from minconv_dist.evaluate.metrics import LAT, LEAD, LON, TIME, align_truth, score


def as_fields(data: xr.DataArray) -> xr.Dataset:
    """(time|dayofyear[, hour], channel, lat, lon) DataArray -> Dataset with one variable per channel on (latitude, longitude)."""
    return data.rename(lat=LAT, lon=LON).to_dataset("channel")


def evaluate_forecast(
    forecast: xr.Dataset, truth: xr.Dataset, climatology: xr.Dataset | None = None,
    definition: str = "weatherbench", name: str = "model",
) -> xr.Dataset:
    """Skill per variable with dims (source, metric, lead_time); sources: the model, persistence, climatology.

    truth: (time, latitude, longitude) per variable; climatology: (dayofyear[, hour], latitude, longitude), e.g.
    `minconv_dist.data.weatherbench2_climatology`, for the climatology baseline. The ACC reference follows
    `definition`: "weatherbench2" (WeatherBench2 `ACC`) uses that climatology at each valid time, and skips ACC
    without one; "weatherbench" (WeatherBench v1 `compute_weighted_acc`) the truth's mean over the verified
    valid times. Inputs are checked (variables, grid, valid times) before anything is computed.
    """
    truth_at = align_truth(forecast, truth)  # raises on any mismatch
    names = list(truth_at.data_vars)
    forecast = forecast[names].load()
    truth_at = truth_at.load()
    sources = {name: forecast, "persistence": persistence(truth[names], forecast[TIME], forecast[LEAD])}
    if climatology is not None:
        sources["climatology"] = climatology_forecast(climatology[names], forecast[TIME], forecast[LEAD])
    if definition == "weatherbench":
        acc_ref = truth[names].sel(time=np.unique((forecast[TIME] + forecast[LEAD]).values)).mean("time")
    else:
        acc_ref = sources.get("climatology")
    parts = [score(src.load(), truth_at, acc_ref, definition) for src in sources.values()]
    out = xr.concat(parts, dim="source", coords="minimal", compat="override").assign_coords(source=list(sources))
    out.attrs["definition"] = definition
    return out


def to_frame(skill: xr.Dataset) -> pd.DataFrame:
    """Long table: source, metric, lead_time (hours), one column per variable."""
    df = skill.to_dataframe().reset_index()
    df[LEAD] = df[LEAD] / pd.Timedelta(hours=1)
    return df.rename(columns={LEAD: "lead_time_h"})[["source", "metric", "lead_time_h", *map(str, skill.data_vars)]]
