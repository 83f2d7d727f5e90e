"""Score forecasts against the truth, with persistence and climatology beside them, and tabulate the skill."""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.evaluate.baselines import climatology_forecast, persistence
from minconv_dist.evaluate.layout import LAT, LEAD, LON, REALIZATION, TIME, label, weatherbench2_key
from minconv_dist.evaluate.metrics import ENSEMBLE_METRICS, METRICS, align_truth, score

BASELINES = ("persistence", "climatology")


def as_fields(data: xr.DataArray) -> xr.Dataset:
    """(time|dayofyear[, hour], channel, lat, lon) DataArray -> Dataset with one variable per channel on (latitude, longitude)."""
    return data.rename(lat=LAT, lon=LON).to_dataset("channel")


def evaluate_forecast(
    forecast: xr.Dataset, truth: xr.Dataset, climatology: xr.Dataset | None = None,
    definition: str = "weatherbench", name: str = "model",
) -> xr.Dataset:
    """Skill per variable with dims (source, metric, prediction_timedelta); sources: the model, persistence,
    climatology. One forecast: `evaluate_forecasts({name: forecast}, ...)`."""
    return evaluate_forecasts({name: forecast}, truth, climatology, definition)


def evaluate_forecasts(
    forecasts: dict[str, xr.Dataset], truth: xr.Dataset, climatology: xr.Dataset | None = None,
    definition: str = "weatherbench",
) -> xr.Dataset:
    """Skill per variable with dims (source, metric, prediction_timedelta); sources: each forecast, then
    persistence and climatology (at the first forecast's init times, on every lead any forecast has).

    Forecasts: (time, prediction_timedelta, latitude, longitude) per channel, `time` the init time; a lead
    some forecast lacks is NaN in its rows. truth: (time, latitude, longitude) per channel; climatology:
    (dayofyear[, hour], latitude, longitude), e.g. `minconv_dist.data.weatherbench2_climatology`, for the
    climatology baseline. The ACC reference follows `definition`: "weatherbench2" (WeatherBench2 `ACC`) uses
    that climatology at each valid time, and skips ACC without one; "weatherbench" (WeatherBench v1
    `compute_weighted_acc`) the truth's mean over all verified valid times. Inputs are checked (variables,
    grid, valid times) before anything is computed.

    Ensembles (a `realization` dim): when any forecast is one, every source gets the definition's
    `ENSEMBLE_METRICS` too (a deterministic source as a 1-member ensemble); the coord `members` says each
    source's ensemble size.
    """
    truths = {name: align_truth(fc, truth) for name, fc in forecasts.items()}  # raises on any mismatch
    first = next(iter(forecasts.values()))
    names = list(truths[next(iter(truths))].data_vars)
    leads = xr.DataArray(np.unique(np.concatenate([fc[LEAD].values for fc in forecasts.values()])), dims=LEAD)
    leads = leads.assign_coords({LEAD: leads})
    sources = {name: fc[names] for name, fc in forecasts.items()}
    sources["persistence"] = persistence(truth[names], first[TIME], leads)
    if climatology is not None:
        sources["climatology"] = climatology_forecast(climatology[names], first[TIME], leads)
    truths.update(dict.fromkeys(BASELINES, align_truth(sources["persistence"], truth)))  # same valid times
    if definition == "weatherbench":
        acc_ref = truth[names].sel(time=np.unique((first[TIME] + leads).values)).mean("time")
    else:
        acc_ref = sources.get("climatology")
    members = [src.sizes.get(REALIZATION, 1) for src in sources.values()]
    ensemble = any(REALIZATION in src.dims for src in sources.values())
    metrics = (*METRICS[definition], *ENSEMBLE_METRICS[definition]) if ensemble else None
    parts = [score(src.load(), truths[name].load(), acc_ref, definition, metrics) for name, src in sources.items()]
    out = xr.concat(parts, dim="source", coords="minimal", compat="override", join="outer")
    out = out.assign_coords(source=list(sources), members=("source", members))
    out.attrs["definition"] = definition
    return out


def to_frame(skill: xr.Dataset) -> pd.DataFrame:
    """Long table, one row per value: source, metric, variable and level (WeatherBench2 names), the truth's
    channel, lead_time_h, value."""
    frames = []
    for channel in map(str, skill.data_vars):
        variable, level = weatherbench2_key(channel)
        df = skill[channel].to_dataframe(name="value").reset_index()
        frames.append(df.assign(variable=variable, level=level, channel=channel,
                                lead_time_h=df[LEAD] / pd.Timedelta(hours=1)))
    columns = ["source", "metric", "variable", "level", "channel", "lead_time_h", "value"]
    return pd.concat(frames, ignore_index=True)[columns]


def summary_leads(leads: np.ndarray, hours: tuple[int, ...] = (24, 72, 120, 240)) -> list[np.timedelta64]:
    """A few leads worth a glance: those of `hours` the forecast has, else its first, middle and last."""
    wanted = [lead for lead in leads if lead / np.timedelta64(1, "h") in hours]
    return wanted or sorted({leads[0], leads[len(leads) // 2], leads[-1]})


def summary(skill: xr.Dataset, metrics: tuple[str, ...] = ("weighted_rmse", "acc", "crps", "spread_skill_ratio")
            ) -> pd.DataFrame:
    """Main metrics at a few leads (those of `metrics` the skill has): one row per (variable, source), one
    column per (metric, lead)."""
    leads = summary_leads(skill[LEAD].values)
    metrics = tuple(m for m in metrics if m in skill["metric"].values)
    rows = {}
    for channel in map(str, skill.data_vars):
        for source in map(str, skill["source"].values):
            values = skill[channel].sel(source=source, metric=list(metrics), **{LEAD: leads})
            rows[(label(channel), source)] = {
                f"{m} {lead / np.timedelta64(1, 'h'):g}h": float(values.sel(metric=m, **{LEAD: lead}))
                for m in metrics for lead in leads}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(["variable", "source"])
