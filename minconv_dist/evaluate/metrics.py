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

Ensembles: a forecast with a `realization` dim (WeatherBench2's `REALIZATION`) is scored by the
probabilistic metrics below (`crps`, `spread_skill_ratio`, `ensemble_mean_rmse`, `rank_histogram`) and by
the deterministic ones applied to its ensemble mean. A forecast without the dim is a 1-member ensemble, as
WeatherBench2 treats one (its CRPS is the MAE, its spread 0). The truth is never an ensemble.
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import numpy as np
import xarray as xr

from minconv_dist.data.grid import cell_area_weights
from minconv_dist.evaluate.layout import LAT, LEAD, LON, REALIZATION, TIME

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


def _members(forecast: X, truth: X) -> X:
    """`forecast` with a `realization` dim (a deterministic forecast becomes a 1-member ensemble); refuses
    an ensemble truth, which would otherwise broadcast against the members without a word."""
    if REALIZATION in truth.dims:
        raise ValueError(f"the truth has a {REALIZATION!r} dim ({truth.sizes[REALIZATION]} members): an "
                         "ensemble is scored against one truth (e.g. ERA5), not against another ensemble")
    return forecast if REALIZATION in forecast.dims else forecast.expand_dims(REALIZATION)


def ensemble_mean(forecast: X) -> X:
    """The mean over `realization` (NaN propagates); a forecast without the dim is returned as it is."""
    return forecast.mean(REALIZATION, skipna=False) if REALIZATION in forecast.dims else forecast


def _fair_spread(members: X) -> X:
    """`E|X - X'|` per point, the unbiased estimate over distinct pairs `Σ_{i≠j} |x_i - x_j| / (n (n - 1))`, as
    `2 / (n (n - 1)) Σ_i (2i - n - 1) x_(i)` over the sorted members (O(n log n)); 0 for one member.

    Source: weatherbench2 `weatherbench2/metrics.py`, `_pointwise_crps_spread` (Zamo & Naveau 2018, the PWM
    form of the fair estimator).
    """
    n = members.sizes[REALIZATION]
    if n < 2:
        return xr.zeros_like(members.isel({REALIZATION: 0}, drop=True))
    weights = (2 * np.arange(1, n + 1) - n - 1) * (2 / (n * (n - 1)))
    return xr.apply_ufunc(lambda a: np.sort(a, axis=-1) @ weights, members,
                          input_core_dims=[[REALIZATION]], keep_attrs=False)


def crps_per_time(forecast: X, truth: X) -> X:
    """CRPS per init time: `area_mean(E|X - Y|) - 0.5 area_mean(E|X - X'|)`, both expectations over the
    members, the second the fair (unbiased) estimate `_fair_spread`.

    Source: weatherbench2 `weatherbench2/metrics.py`, `CRPS.compute_chunk` = `CRPSSkill` - 0.5 `CRPSSpread`
    (`_pointwise_crps_skill`, `_pointwise_crps_spread`, each averaged by `_spatial_average`).
    """
    members = _members(forecast, truth)
    skill = abs(members - truth).mean(REALIZATION, skipna=False)
    return area_mean(skill) - 0.5 * area_mean(_fair_spread(members))


def crps(forecast: X, truth: X) -> X:
    """WeatherBench2 CRPS: `crps_per_time` averaged over init times; the MAE for a deterministic forecast.

    Source: weatherbench2 `weatherbench2/metrics.py`, `CRPS` (`EnsembleMetric.compute`: mean over `time`).
    Unbiased at each time for 2 or more members, so an ensemble's size does not favour it.
    """
    return crps_per_time(forecast, truth).mean(TIME, skipna=False)


def ensemble_variance_per_time(forecast: X) -> X:
    """`area_mean(var(X))` per init time, the variance over members with `ddof=1` (the unbiased `n/(n-1)`);
    0 for one member. Source: weatherbench2 `weatherbench2/metrics.py`, `EnsembleVariance.compute_chunk`."""
    members = forecast if REALIZATION in forecast.dims else forecast.expand_dims(REALIZATION)
    if members.sizes[REALIZATION] < 2:
        return xr.zeros_like(area_mean(members.isel({REALIZATION: 0}, drop=True)))
    return area_mean(members.var(REALIZATION, ddof=1, skipna=False))


def ensemble_mean_rmse(forecast: X, truth: X) -> X:
    """`sqrt(mean_time(area_mean((mean(X) - Y)²)))`: the RMSE of the ensemble mean, the root after the
    time mean as for `rmse`. Source: weatherbench2 `weatherbench2/metrics.py`, `EnsembleMeanMSE` (biased by
    `σ²/n` as its docstring says; `DebiasedEnsembleMeanMSE` removes that), square root as for `MSE`."""
    return rmse(ensemble_mean(_members(forecast, truth)), truth)


def spread_skill_ratio(forecast: X, truth: X) -> X:
    """`sqrt(mean_time(ensemble_variance_per_time)) / ensemble_mean_rmse`: both roots after the time mean.

    Source: weatherbench2 `weatherbench2/visualization.py`, `compute_spread_skill_ratio` (`ensemble_stddev /
    ensemble_mean_rmse`, the square roots of `EnsembleVariance` and `EnsembleMeanMSE` taken after their
    time means, as their docstrings advise). For members and truth drawn from one distribution it tends to
    `sqrt(n / (n + 1))`, not 1: the ensemble-mean error includes the mean's own sampling error `σ²/n`
    (Fortin et al. 2014). 0 for a deterministic forecast.
    """
    spread = np.sqrt(ensemble_variance_per_time(_members(forecast, truth)).mean(TIME, skipna=False))
    return spread / ensemble_mean_rmse(forecast, truth)


def _ranks(members: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank of the truth among the members [..., n] (the number of members below it, 0..n), ties broken at
    random among the tied positions; NaN where the truth or a member is NaN."""
    below = (members < truth[..., None]).sum(-1)
    ties = (members == truth[..., None]).sum(-1)
    rank = below + np.floor(rng.random(below.shape) * (ties + 1))
    return np.where(np.isnan(truth) | np.isnan(members).any(-1), np.nan, rank)


def rank_histogram(forecast: X, truth: X, seed: int = 0) -> X:
    """Frequency of the truth's rank among the n members, dim `rank` (0..n): the area-weighted fraction of
    grid points per init time, averaged over init times (each variable's bins sum to 1). Flat at
    `1 / (n + 1)` for a calibrated ensemble; U-shaped when the spread is too small.

    Ranks as Earth2Studio's `earth2studio/statistics/rank.py` `rank_histogram` counts them (members `<=` the
    truth, a tie placed uniformly at random among the tied positions, `seed` fixes that draw), the
    counting weighted by cell area and averaged per init time as weatherbench2's `RankHistogram` (one-hot
    ranks, `compute` = mean over time) and the metrics above. NaN propagates.
    """
    members = _members(forecast, truth)
    n = members.sizes[REALIZATION]
    rank = xr.apply_ufunc(_ranks, members, truth, kwargs={"rng": np.random.default_rng(seed)},
                          input_core_dims=[[REALIZATION], []])
    bins = [area_mean((rank == r).where(rank.notnull())).mean(TIME, skipna=False) for r in range(n + 1)]
    return xr.concat(bins, dim="rank", coords="minimal", compat="override").assign_coords(rank=np.arange(n + 1))


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
#: An ensemble is scored by these on its ensemble mean.
METRICS: dict[str, dict[str, Callable[..., Any]]] = {
    "weatherbench": {"weighted_rmse": compute_weighted_rmse, "bias": bias, "acc": compute_weighted_acc},
    "weatherbench2": {"weighted_rmse": rmse, "rmse_sqrt_before_time_avg": rmse_sqrt_before_time_avg,
                      "bias": bias, "acc": acc},
}
DEFINITIONS = tuple(METRICS)
#: definition -> label -> probabilistic metric(forecast, truth) of the whole ensemble (WeatherBench v1 has none).
ENSEMBLE_METRICS: dict[str, dict[str, Callable[..., Any]]] = {
    "weatherbench": {},
    "weatherbench2": {"crps": crps, "spread_skill_ratio": spread_skill_ratio, "ensemble_mean_rmse": ensemble_mean_rmse},
}


def score(
    forecast: xr.Dataset,
    truth: xr.Dataset,
    climatology: xr.Dataset | None = None,
    definition: str = "weatherbench",
    metrics: tuple[str, ...] | None = None,
) -> xr.Dataset:
    """The definition's metrics stacked along a `metric` dim: by default all of `METRICS[definition]`, and for
    an ensemble (a `realization` dim) also `ENSEMBLE_METRICS[definition]`.

    Gives `(metric, prediction_timedelta)` per variable. ACC needs `climatology`; without one it is skipped.
    The deterministic metrics score an ensemble's mean (`ensemble_mean`); the probabilistic ones score a
    deterministic forecast as a 1-member ensemble (CRPS = MAE, spread 0).
    """
    if definition not in METRICS:
        raise ValueError(f"unknown metric definition {definition!r}; expected one of {DEFINITIONS}")
    table = {**METRICS[definition], **ENSEMBLE_METRICS[definition]}
    default = (*METRICS[definition], *(ENSEMBLE_METRICS[definition] if REALIZATION in forecast.dims else ()))
    names = default if metrics is None else tuple(metrics)
    unknown = set(names) - set(table)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)} for definition {definition!r}; "
                         f"expected some of {list(table)}")
    names = tuple(m for m in names if m != "acc" or climatology is not None)
    mean = ensemble_mean(forecast)
    _members(forecast, truth)  # refuses an ensemble truth
    parts = [table[m](forecast, truth) if m in ENSEMBLE_METRICS[definition] else
             table[m](mean, truth, climatology) if m == "acc" else table[m](mean, truth) for m in names]
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
