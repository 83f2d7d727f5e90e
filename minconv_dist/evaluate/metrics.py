"""Skill metrics as small named functions over xarray objects, one number per variable and lead time.

Inputs are aligned: `forecast` and `truth` have the same dims, normally
`(init_time, lead_time, latitude, longitude)` (use `align_truth`). Every function reduces over
`init_time` (the "time" of the papers), `latitude` and `longitude` and keeps everything else, so a
Dataset with one variable per channel and a `lead_time` dim gives a skill curve per variable.

Two definitions, chosen by name (`definition=`):
- "weatherbench" (Rasp et al. 2020, `score.py`): RMSE = sqrt of the latitude-weighted mean squared
  error over time, lat and lon together; ACC = weighted correlation of anomalies against a
  climatology, with the mean anomaly removed, summed over time, lat and lon together.
- "weatherbench2" (Rasp et al. 2024): RMSE per init time (sqrt of the weighted spatial mean), then
  averaged over init times; ACC per init time (anomalies against a day-of-year/hour climatology, no
  mean removal), then averaged.
Latitude weights are cos(lat) normalised to mean 1 in both.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import numpy as np
import xarray as xr

X = TypeVar("X", xr.DataArray, xr.Dataset)

TIME, LEAD, LAT, LON = "init_time", "lead_time", "latitude", "longitude"
SPACE = (LAT, LON)
DEFINITIONS = ("weatherbench", "weatherbench2")


def latitude_weights(latitude: xr.DataArray) -> xr.DataArray:
    """cos(latitude) normalised to mean 1, so a weighted mean of a constant is that constant."""
    w = np.cos(np.deg2rad(latitude))
    return w / w.mean()


def _check_definition(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown metric definition {definition!r}; expected one of {DEFINITIONS}")


def rmse(forecast: X, truth: X) -> X:
    """Unweighted RMSE over init time, lat and lon (equal-area grids; a reference for the weighted one)."""
    return np.sqrt(((forecast - truth) ** 2).mean((TIME, *SPACE)))


def weighted_rmse(forecast: X, truth: X, definition: str = "weatherbench") -> X:
    """Latitude-weighted RMSE: cells near the poles cover less area and count less."""
    _check_definition(definition)
    se = ((forecast - truth) ** 2).weighted(latitude_weights(truth[LAT]))
    if definition == "weatherbench":
        return np.sqrt(se.mean((TIME, *SPACE)))
    return np.sqrt(se.mean(SPACE)).mean(TIME)


def bias(forecast: X, truth: X) -> X:
    """Latitude-weighted mean error: positive when the forecast runs high (same in both definitions)."""
    return (forecast - truth).weighted(latitude_weights(truth[LAT])).mean((TIME, *SPACE))


def acc(forecast: X, truth: X, climatology: X, definition: str = "weatherbench") -> X:
    """Anomaly correlation: skill at placing the departures from climatology, blind to amplitude.

    `climatology` broadcasts against `truth`: for "weatherbench" Rasp et al. use the truth's mean over
    the test period; for "weatherbench2" a day-of-year/hour climatology at each valid time.
    """
    _check_definition(definition)
    w = latitude_weights(truth[LAT])
    fa, a = forecast - climatology, truth - climatology
    if definition == "weatherbench":
        dims = (TIME, *SPACE)
        fa, a = fa - fa.mean(dims), a - a.mean(dims)
    else:
        dims = SPACE
    num = (w * fa * a).sum(dims)
    den = np.sqrt((w * fa**2).sum(dims) * (w * a**2).sum(dims))
    score = num / den
    return score if definition == "weatherbench" else score.mean(TIME)


#: metric name -> function(forecast, truth, climatology, definition)
METRICS: dict[str, Callable[..., xr.Dataset]] = {
    "rmse": lambda f, t, c, d: rmse(f, t),
    "weighted_rmse": lambda f, t, c, d: weighted_rmse(f, t, d),
    "bias": lambda f, t, c, d: bias(f, t),
    "acc": lambda f, t, c, d: acc(f, t, c, d),
}


def score(
    forecast: xr.Dataset,
    truth: xr.Dataset,
    climatology: xr.Dataset | None = None,
    definition: str = "weatherbench",
    metrics: tuple[str, ...] = ("rmse", "weighted_rmse", "bias", "acc"),
) -> xr.Dataset:
    """All named metrics stacked along a `metric` dim: `(metric, lead_time)` per variable.

    ACC needs `climatology`; without one it is skipped.
    """
    _check_definition(definition)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; expected some of {sorted(METRICS)}")
    names = [m for m in metrics if m != "acc" or climatology is not None]
    parts = [METRICS[m](forecast, truth, climatology, definition) for m in names]
    return xr.concat(parts, dim="metric", coords="minimal", compat="override").assign_coords(metric=names)


def align_truth(forecast: xr.Dataset, truth: xr.Dataset) -> xr.Dataset:
    """The truth at each forecast's valid time, laid out like `forecast` (init_time, lead_time, lat, lon).

    Raises ValueError, naming what differs, if variables, grids or times do not line up, so a long
    evaluation never starts on mismatched inputs. `truth` has dims (time, latitude, longitude).
    """
    missing = sorted(set(map(str, forecast.data_vars)) - set(map(str, truth.data_vars)))
    if missing:
        raise ValueError(f"forecast variables {missing} are not in the truth store, which has "
                         f"{sorted(map(str, truth.data_vars))}")
    truth = truth[list(forecast.data_vars)]
    for dim in SPACE:
        f, t = forecast[dim].values, truth[dim].values
        if f.shape != t.shape or not np.allclose(np.sort(f), np.sort(t), atol=1e-6):
            raise ValueError(
                f"grids differ in {dim}: forecast has {f.size} points [{f.min():g}..{f.max():g}], truth has "
                f"{t.size} [{t.min():g}..{t.max():g}]; coarsen/regrid the truth to the forecast grid"
            )
        truth = truth.assign_coords({dim: t}).reindex({dim: f}, method="nearest", tolerance=1e-6)
    valid = forecast[TIME] + forecast[LEAD]
    flat = valid.values.ravel()
    absent = ~np.isin(flat, truth["time"].values)
    if absent.any():
        t0, t1 = truth["time"].values[[0, -1]]
        raise ValueError(
            f"{int(absent.sum())} of {flat.size} valid times (init_time + lead_time) are not in the truth "
            f"(which covers {t0} .. {t1}); first missing: {flat[absent][0]}. Shorten the leads or "
            "drop the last init times"
        )
    return truth.sel(time=valid).drop_vars("time")
