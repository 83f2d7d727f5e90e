"""Skill metrics as small functions over xarray objects, each named by what it computes and citing its source.

Inputs are aligned: `forecast` and `truth` have the same dims, normally WeatherBench2's
`(time, prediction_timedelta, latitude, longitude)` with `time` the init time (use `align_truth`), one
variable per channel. Every score reduces over the init time, `latitude` and `longitude` and keeps
everything else, so it is a skill curve over `prediction_timedelta` per variable.

Two sources, selected by `definition=` in `score`:
- "weatherbench2": google-research/weatherbench2, `weatherbench2/metrics.py`. Spatial means are weighted by
  grid-cell area (`cell_area_weights`, their `get_lat_weights`); a metric is computed per init time
  (`Metric.compute_chunk`) and then averaged over init times (`Metric.compute`). RMSE is the square root of
  the time-mean MSE (their `MSE`, square root taken after the evaluation as in `docs/source/evaluation.ipynb`);
  `rmse_sqrt_before_time_avg` is their `RMSESqrtBeforeTimeAvg`. NaNs propagate (their default
  `skipna=False`).
- "weatherbench": pangeo-data/WeatherBench (v1, Rasp et al. 2020), `src/score.py`: `compute_weighted_rmse`
  and `compute_weighted_acc`, with cos-latitude weights normalised to mean 1 (`cos_latitude_weights`), one
  mean over time, latitude and longitude together. NaNs propagate here too (v1's xarray means skip them,
  which silently scores the other cases).
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import numpy as np
import xarray as xr

from minconv_dist.data.grid import cell_area_weights
from minconv_dist.evaluate.layout import LAT, LEAD, LON, TIME

X = TypeVar("X", xr.DataArray, xr.Dataset)

SPACE = (LAT, LON)


def cos_latitude_weights(latitude: xr.DataArray) -> xr.DataArray:
    """`cos(latitude)` normalised to mean 1 (WeatherBench v1's weights; 0 at a pole row).

    Source: WeatherBench `src/score.py`, `compute_weighted_rmse` / `compute_weighted_acc` (`weights_lat`).
    """
    w = np.cos(np.deg2rad(latitude))
    return w / w.mean()


def area_mean(x: X) -> X:
    """Mean over latitude and longitude weighted by `cell_area_weights`, one value per remaining index.

    Source: weatherbench2 `weatherbench2/metrics.py`, `_spatial_average` (global, no region mask).
    """
    return x.weighted(cell_area_weights(x[LAT])).mean(SPACE, skipna=False)


def mse_per_time(forecast: X, truth: X) -> X:
    """Area-weighted mean squared error per init time: `mean_{lat,lon}(w (f - t)²)`.

    Source: weatherbench2 `weatherbench2/metrics.py`, `MSE.compute_chunk`.
    """
    return area_mean((forecast - truth) ** 2)


def mse(forecast: X, truth: X) -> X:
    """`mse_per_time` averaged over init times. Source: weatherbench2 `metrics.py`, `MSE` (`Metric.compute`)."""
    return mse_per_time(forecast, truth).mean(TIME, skipna=False)


def rmse(forecast: X, truth: X) -> X:
    """WeatherBench2 RMSE: `sqrt(mean_time(mean_{lat,lon}(w (f - t)²)))`, the root taken after the time mean.

    Source: weatherbench2 `weatherbench2/metrics.py`, `MSE`, whose square root gives the published RMSE
    (`docs/source/evaluation.ipynb`: "taking the square root after the time mean", ECMWF's convention).
    """
    return np.sqrt(mse(forecast, truth))


def rmse_sqrt_before_time_avg(forecast: X, truth: X) -> X:
    """`mean_time(sqrt(mean_{lat,lon}(w (f - t)²)))`: the per-time RMSE averaged over init times.

    Source: weatherbench2 `weatherbench2/metrics.py`, `RMSESqrtBeforeTimeAvg`. Never above `rmse`, and
    equal to it only when every init time has the same error.
    """
    return np.sqrt(mse_per_time(forecast, truth)).mean(TIME, skipna=False)


def bias(forecast: X, truth: X) -> X:
    """Mean error `mean_time(mean_{lat,lon}(w (f - t)))`, area-weighted; positive when the forecast runs high.

    Source: weatherbench2 `weatherbench2/metrics.py`, `Bias`. WeatherBench v1 defines no bias, so both
    definitions report this one.
    """
    return area_mean(forecast - truth).mean(TIME, skipna=False)


def acc_per_time(forecast: X, truth: X, climatology: X) -> X:
    """Anomaly correlation per init time: `mean(w f'a') / sqrt(mean(w f'²) mean(w a'²))` over lat and lon.

    `f' = f - c`, `a' = t - c` with `c` the climatology at each valid time (broadcast against `truth`);
    no mean anomaly is removed. Source: weatherbench2 `weatherbench2/metrics.py`, `ACC.compute_chunk`.
    """
    fa, a = forecast - climatology, truth - climatology
    return area_mean(fa * a) / np.sqrt(area_mean(fa**2) * area_mean(a**2))


def acc(forecast: X, truth: X, climatology: X) -> X:
    """WeatherBench2 ACC: `acc_per_time` averaged over init times. Source: weatherbench2 `metrics.py`, `ACC`."""
    return acc_per_time(forecast, truth, climatology).mean(TIME, skipna=False)


def compute_weighted_rmse(forecast: X, truth: X) -> X:
    """WeatherBench v1 RMSE: `sqrt(mean_{time,lat,lon}(w (f - t)²))`, `w` = `cos_latitude_weights`.

    Source: WeatherBench `src/score.py`, `compute_weighted_rmse`, applied per lead time as their
    `evaluate_iterative_forecast` does. NaN propagate (theirs, xarray's default `skipna`, would score the
    values left and say nothing).
    """
    return np.sqrt((cos_latitude_weights(truth[LAT]) * (forecast - truth) ** 2).mean((TIME, *SPACE), skipna=False))


def compute_weighted_acc(forecast: X, truth: X, climatology: X) -> X:
    """WeatherBench v1 ACC: `Σ w f'a' / sqrt(Σ w f'² Σ w a'²)`, sums over time, lat and lon together.

    `f' = f - c - mean(f - c)`, `a' = t - c - mean(t - c)` (unweighted means over time, lat and lon),
    `w` = `cos_latitude_weights`. Source: WeatherBench `src/score.py`, `compute_weighted_acc`, where `c` is
    the truth's mean over time (`da_true.mean('time')`) and the score is taken per lead time. NaN propagate,
    as in `compute_weighted_rmse`.
    """
    dims, keep = (TIME, *SPACE), {"skipna": False}
    w = cos_latitude_weights(truth[LAT])
    fa, a = forecast - climatology, truth - climatology
    fa, a = fa - fa.mean(dims, **keep), a - a.mean(dims, **keep)
    return (w * fa * a).sum(dims, **keep) / np.sqrt((w * fa**2).sum(dims, **keep) * (w * a**2).sum(dims, **keep))


#: definition -> table label -> metric(forecast, truth); "acc" also takes the climatology.
#: "weighted_rmse" is each definition's RMSE: WeatherBench2 `rmse` or WeatherBench v1 `compute_weighted_rmse`.
METRICS: dict[str, dict[str, Callable[..., Any]]] = {
    "weatherbench": {"weighted_rmse": compute_weighted_rmse, "bias": bias, "acc": compute_weighted_acc},
    "weatherbench2": {"weighted_rmse": rmse, "rmse_sqrt_before_time_avg": rmse_sqrt_before_time_avg,
                      "bias": bias, "acc": acc},
}
DEFINITIONS = tuple(METRICS)


def score(
    forecast: xr.Dataset,
    truth: xr.Dataset,
    climatology: xr.Dataset | None = None,
    definition: str = "weatherbench",
    metrics: tuple[str, ...] | None = None,
) -> xr.Dataset:
    """The definition's metrics (all of `METRICS[definition]` by default) stacked along a `metric` dim.

    Gives `(metric, prediction_timedelta)` per variable. ACC needs `climatology`; without one it is skipped.
    """
    if definition not in METRICS:
        raise ValueError(f"unknown metric definition {definition!r}; expected one of {DEFINITIONS}")
    table = METRICS[definition]
    names = tuple(table) if metrics is None else metrics
    unknown = set(names) - set(table)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)} for definition {definition!r}; "
                         f"expected some of {list(table)}")
    names = tuple(m for m in names if m != "acc" or climatology is not None)
    parts = [table[m](forecast, truth, climatology) if m == "acc" else table[m](forecast, truth) for m in names]
    return xr.concat(parts, dim="metric", coords="minimal", compat="override").assign_coords(metric=list(names))


def match_grid(ds: X, reference: xr.Dataset | xr.DataArray, names: tuple[str, str] = ("truth", "forecast")) -> X:
    """`ds` on `reference`'s latitude/longitude labels and order; raises ValueError naming the dim if the two
    grids differ by more than 1e-6 degrees (latitude order may differ). `names`: what ds and reference are."""
    for dim in SPACE:
        f, t = reference[dim].values, ds[dim].values
        if f.shape != t.shape or not np.allclose(np.sort(f), np.sort(t), atol=1e-6):
            raise ValueError(
                f"grids differ in {dim}: {names[1]} has {f.size} points [{f.min():g}..{f.max():g}], {names[0]} has "
                f"{t.size} [{t.min():g}..{t.max():g}]; coarsen/regrid the truth to the forecast grid"
            )
        ds = ds.assign_coords({dim: t}).reindex({dim: f}, method="nearest", tolerance=1e-6)
    return ds


def align_truth(forecast: xr.Dataset, truth: xr.Dataset) -> xr.Dataset:
    """The truth at each forecast's valid time, laid out like `forecast` (time, prediction_timedelta, lat, lon).

    Raises ValueError, naming what differs, if variables, grids or times do not line up, so a long
    evaluation never starts on mismatched inputs. `truth` has dims (time, latitude, longitude), its `time`
    the valid time; the forecast's `time` is the init time (WeatherBench2's init-time convention,
    `docs/source/init-vs-valid-time.md`).
    """
    missing = sorted(set(map(str, forecast.data_vars)) - set(map(str, truth.data_vars)))
    if missing:
        raise ValueError(f"forecast variables {missing} are not in the truth store, which has "
                         f"{sorted(map(str, truth.data_vars))}")
    truth = match_grid(truth[list(forecast.data_vars)], forecast)
    valid = forecast[TIME] + forecast[LEAD]
    flat = valid.values.ravel()
    absent = ~np.isin(flat, truth["time"].values)
    if absent.any():
        t0, t1 = truth["time"].values[[0, -1]]
        raise ValueError(
            f"{int(absent.sum())} of {flat.size} valid times (init time + prediction_timedelta) are not in the "
            f"truth (which covers {t0} .. {t1}); first missing: {flat[absent][0]}. Shorten the leads or "
            "drop the last init times"
        )
    return truth.rename(time="valid_time").sel(valid_time=valid).drop_vars("valid_time")
