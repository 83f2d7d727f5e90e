"""Evaluation: WeatherBench2/WeatherBench metrics by lead time, persistence/climatology baselines, forecast writer
(WeatherBench2 layout), plots.

Imports xarray and zarr; the models never import this package.
"""
from minconv_dist.evaluate.baselines import climatology_at, climatology_forecast, persistence
from minconv_dist.evaluate.forecast import (check_inputs, init_times, open_channels, open_forecast, time_step,
                                            write_forecast)
from minconv_dist.evaluate.layout import (from_weatherbench2, label, store_channels, to_weatherbench2,
                                          weatherbench2_key, with_cf_attrs)
from minconv_dist.evaluate.metrics import (
    DEFINITIONS, ENSEMBLE_METRICS, METRICS, acc, acc_per_time, align_truth, area_mean, bias, cell_area_weights,
    compute_weighted_acc, compute_weighted_rmse, cos_latitude_weights, crps, crps_per_time, ensemble_mean,
    ensemble_mean_rmse, ensemble_variance_per_time, match_grid, mse, mse_per_time, rank_histogram, rmse,
    rmse_sqrt_before_time_avg, score, spread_skill_ratio,
)
from minconv_dist.evaluate.model_uri import load_model
from minconv_dist.evaluate.report import as_fields, evaluate_forecast, evaluate_forecasts, summary, to_frame

__all__ = [
    "DEFINITIONS", "ENSEMBLE_METRICS", "METRICS", "acc", "acc_per_time", "align_truth", "area_mean", "as_fields",
    "bias", "cell_area_weights", "check_inputs", "climatology_at", "climatology_forecast", "compute_weighted_acc",
    "compute_weighted_rmse", "cos_latitude_weights", "crps", "crps_per_time", "ensemble_mean", "ensemble_mean_rmse",
    "ensemble_variance_per_time", "evaluate_forecast", "evaluate_forecasts", "from_weatherbench2", "init_times",
    "label", "load_model", "match_grid", "mse", "mse_per_time", "open_channels", "open_forecast", "persistence",
    "rank_histogram", "rmse", "rmse_sqrt_before_time_avg", "score", "spread_skill_ratio", "store_channels",
    "summary", "time_step", "to_frame", "to_weatherbench2", "weatherbench2_key", "with_cf_attrs", "write_forecast",
]
