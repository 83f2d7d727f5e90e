"""Score forecasts against the truth, with persistence and climatology beside them, and tabulate the skill."""
from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.evaluate.baselines import climatology_forecast, persistence
from minconv_dist.evaluate.layout import LAT, LEAD, LON, TIME, label, weatherbench2_key
from minconv_dist.evaluate.metrics import align_truth, score

BASELINES = ("persistence", "climatology")
NAN_METRICS = ("nan_fraction", "truth_nan_fraction")  # of a source's values, of the truth's it is scored against


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
    definition: str = "weatherbench", drop_nan_inits: bool = False,
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

    NaN are never skipped silently: every source also gets the metrics `nan_fraction` (of its values) and
    `truth_nan_fraction` (of the truth it is scored against) per lead, and a NaN makes the scores it enters NaN
    under both definitions. `drop_nan_inits`: score only the init times at which no source and no truth holds
    a NaN (all sources alike); the attr `nan_inits_dropped` counts the others (the NaN fractions are of all).
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
    inits = complete_inits(sources, truths) if drop_nan_inits else first[TIME].values
    if definition == "weatherbench":
        acc_ref = truth[names].sel(time=np.unique((inits[:, None] + leads.values).ravel())).mean("time")
    else:
        acc_ref = sources["climatology"].sel({TIME: inits}) if "climatology" in sources else None
    parts = []
    for name, src in sources.items():  # one source in memory at a time
        src, tr = src.load(), truths[name].load()
        scores = score(src.sel({TIME: inits}), tr.sel({TIME: inits}), acc_ref, definition)
        parts.append(xr.concat([scores, nan_fractions(src, tr)], dim="metric", coords="minimal", compat="override"))
    out = xr.concat(parts, dim="source", coords="minimal", compat="override", join="outer")
    out = out.assign_coords(source=list(sources)).load()  # small; its dask parts would be chunked unevenly
    out.attrs.update(definition=definition, nan_inits_dropped=int(first.sizes[TIME] - inits.size))
    return out


def nan_fractions(forecast: xr.Dataset, truth: xr.Dataset) -> xr.Dataset:
    """Per variable and lead, the fraction of NaN among the forecast's values and the truth's it is scored
    against, along a `metric` dim (`nan_fraction`, `truth_nan_fraction`)."""
    parts = [x.isnull().mean((TIME, LAT, LON)) for x in (forecast, truth)]
    return xr.concat(parts, dim="metric").assign_coords(metric=list(NAN_METRICS))


def complete_inits(sources: dict[str, xr.Dataset], truths: dict[str, xr.Dataset]) -> np.ndarray:
    """The init times at which no source and no truth holds a NaN (one lazy reduction per variable); raises
    ValueError if there is none."""
    first = next(iter(sources.values()))
    bad = np.zeros(first.sizes[TIME], dtype=bool)
    for ds in (*sources.values(), *truths.values()):
        for var in ds.data_vars.values():
            bad |= var.isnull().any([d for d in var.dims if d != TIME]).values
    if bad.all():
        raise ValueError(f"--drop-nan-inits: every one of the {bad.size} init times holds a NaN in some forecast "
                         "or in the truth; nothing is left to score")
    return first[TIME].values[~bad]


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


def summary(skill: xr.Dataset, metrics: tuple[str, ...] = ("weighted_rmse", "acc")) -> pd.DataFrame:
    """Main metrics at a few leads: one row per (variable, source), one column per (metric, lead)."""
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


def nan_note(skill: xr.Dataset) -> str:
    """What the printed summary says about NaN: one line when there are none, else the NaN fractions (in %) of
    the sources and truths that have some, at the summary's leads, and what they did to the scores."""
    dropped = int(skill.attrs.get("nan_inits_dropped", 0))
    fractions = skill.sel(metric=list(NAN_METRICS))
    if not any(float(fractions[c].max()) > 0 for c in map(str, skill.data_vars)):
        return "no NaN in the forecasts or the truth"
    leads = summary_leads(skill[LEAD].values)
    rows = {}
    for channel in map(str, skill.data_vars):
        for source in map(str, skill["source"].values):
            values = fractions[channel].sel(source=source, **{LEAD: leads})
            if float(values.max()) > 0:
                rows[(label(channel), source)] = {
                    f"{'truth ' if m.startswith('truth') else ''}NaN % {lead / np.timedelta64(1, 'h'):g}h":
                        100 * float(values.sel(metric=m, **{LEAD: lead})) for m in NAN_METRICS for lead in leads}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis(["variable", "source"])
    effect = (f"--drop-nan-inits left {dropped} init times that hold NaN out of every score" if dropped else
              "a score that meets a NaN is NaN, under both definitions (WeatherBench2 propagates NaN); "
              "--drop-nan-inits scores only the init times without NaN")
    return f"{table.to_string(float_format=lambda v: f'{v:.3g}')}\nNaN among the values scored: {effect}"
