"""Evaluation: WeatherBench metrics by lead time, persistence/climatology baselines, forecast writer, plots.

Imports xarray and zarr; the models never import this package.
"""
from minconv_dist.evaluate.baselines import climatology_at, climatology_forecast, persistence
from minconv_dist.evaluate.forecast import check_inputs, init_times, open_channels, time_step, write_forecast
from minconv_dist.evaluate.metrics import (
    DEFINITIONS, METRICS, acc, align_truth, bias, latitude_weights, rmse, score, weighted_rmse,
)
from minconv_dist.evaluate.model_io import load_model
from minconv_dist.evaluate.report import as_fields, evaluate_forecast, to_frame

__all__ = [
    "DEFINITIONS", "METRICS", "acc", "align_truth", "as_fields", "bias", "check_inputs", "climatology_at",
    "climatology_forecast", "evaluate_forecast", "init_times", "latitude_weights", "load_model",
    "open_channels", "persistence", "rmse", "score", "time_step", "to_frame",
    "weighted_rmse", "write_forecast",
]
