"""Evaluation job: score a forecast zarr store against a truth store, beside persistence and climatology.

    python jobs/evaluate.py --forecast forecast.zarr --out results/ --climatology-range 2015-01-01 2015-12-31

Writes metrics.csv and skill.zarr (dims source, metric, lead_time; one variable per channel), skill_<var>.png
and maps_<var>.png; with --mlflow-run-id also logs them to that MLflow run. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json

import xarray as xr

from minconv_dist.data import CLIMATOLOGIES, DimNames
from minconv_dist.evaluate import DEFINITIONS, to_frame
from minconv_dist.evaluate.run import evaluate_store, log_to_mlflow, write_outputs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--forecast", required=True, help="forecast zarr store written by jobs/forecast.py")
    p.add_argument("--truth", help="truth zarr store (default: the forecast's data_source attr, else the embedded store)")
    p.add_argument("--storage-options", type=json.loads, default=None, help="JSON for fsspec (truth store)")
    p.add_argument("--dims", type=json.loads, default={}, help='truth dim names, e.g. {"lat": "latitude", "lon": "longitude"}')
    p.add_argument("--coarsen", type=int, help="block-average the truth grid (default: the forecast's coarsen attr)")
    p.add_argument("--climatology", choices=list(CLIMATOLOGIES), default="weatherbench2",
                   help="weatherbench2: mean by day of year and hour, smoothed over 61 days (WeatherBench2's); "
                        "dayofyear: plain mean per day of year")
    p.add_argument("--climatology-range", nargs=2, metavar=("START", "END"),
                   help="reference period of the climatology (the training years; WeatherBench2 uses 1990-01-01 "
                        "2019-12-31); without it no climatology baseline")
    p.add_argument("--definition", choices=DEFINITIONS, default="weatherbench",
                   help="metric definitions: weatherbench2 (weatherbench2/metrics.py) or weatherbench (WeatherBench "
                        "v1 src/score.py); see docs/evaluation.md")
    p.add_argument("--name", default="model", help="label of the model in tables and plots")
    p.add_argument("--map-leads", type=int, nargs="*", help="lead steps shown in the maps (default: first, middle, last)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mlflow-run-id", help="log metrics and files to this MLflow run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of that run (default: $MLFLOW_TRACKING_URI)")
    return p


def main(argv: list[str] | None = None) -> xr.Dataset:
    args = parser().parse_args(argv)
    skill, forecast, truth = evaluate_store(
        args.forecast, truth_url=args.truth, dims=DimNames(**args.dims), coarsen=args.coarsen,
        storage_options=args.storage_options, climatology=args.climatology,
        climatology_range=args.climatology_range, definition=args.definition, name=args.name)
    files = write_outputs(skill, forecast, truth, args.out, args.map_leads)
    if args.mlflow_run_id:
        log_to_mlflow(skill, files, args.mlflow_run_id, args.tracking_uri)
    print(to_frame(skill).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return skill


if __name__ == "__main__":
    main()
