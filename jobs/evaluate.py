"""Evaluation job: score forecast zarr stores in the WeatherBench2 layout (ours, or published ones) against a
truth store, beside persistence and climatology.

    python jobs/evaluate.py --forecast forecast.zarr --out results/ --climatology-range 2015-01-01 2015-12-31
    python jobs/evaluate.py --forecast forecast.zarr gs://weatherbench2/datasets/hres/...zarr --name ours hres \\
        --forecast-storage-options '{"token": "anon"}' --truth gs://... --dims '{"lat": "latitude", "lon": "longitude"}'

Prints a summary (the main metrics at a few leads); writes metrics.csv (every value), skill.zarr (WB2
variables with a `level` dim), skill_<variable>_<level>.png and maps_<variable>_<level>.png to --out (any
fsspec URL, all or nothing); with --mlflow-run-id also logs them to that MLflow run. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import PurePosixPath

import xarray as xr

from minconv_dist.data import CLIMATOLOGIES
from minconv_dist.data.store import redact
from minconv_dist.evaluate import DEFINITIONS, summary
from minconv_dist.evaluate.report import nan_note
from minconv_dist.evaluate.outputs import check_target
from minconv_dist.errors import run_job
from minconv_dist.job_args import dims_arg, job_parser
from minconv_dist.evaluate.run import check_mlflow_run, evaluate_stores, write_outputs


def parser() -> argparse.ArgumentParser:
    p = job_parser(__doc__.split("\n\n")[0])
    p.add_argument("--forecast", required=True, nargs="+",
                   help="forecast zarr stores (WB2 layout: time, prediction_timedelta, [level,] latitude, longitude); "
                        "all are scored on the variables and init times they share, the first one's data_source "
                        "and coarsen attrs pick the truth")
    p.add_argument("--name", nargs="+", help="labels of the forecasts in tables and plots (default: 'model', then "
                                             "each store's file name)")
    p.add_argument("--forecast-storage-options", type=json.loads, default=None, help="JSON for fsspec (forecasts)")
    p.add_argument("--truth", help="truth zarr store (default: the forecast's data_source attr, else the embedded store)")
    p.add_argument("--storage-options", type=json.loads, default=None, help="JSON for fsspec (truth store)")
    p.add_argument("--dims", type=dims_arg, help='truth store dim names (DimNames fields), e.g. {"lat": "latitude", '
                                                 '"lon": "longitude"}; default: those the first forecast store records '
                                                 "for its data_source (when it is the truth), else time, level, lat, lon")
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
    p.add_argument("--drop-nan-inits", action="store_true",
                   help="score only the init times at which no forecast and no truth value is NaN (all sources "
                        "alike; the summary says how many were left out); by default a NaN makes the scores it "
                        "enters NaN")
    p.add_argument("--map-leads", type=int, nargs="*", help="lead steps shown in the maps (default: first, middle, last)")
    p.add_argument("--out", required=True, help="output folder: local path or fsspec URL (s3://, gs://, memory://)")
    p.add_argument("--out-storage-options", type=json.loads, default=None, help="JSON for fsspec (--out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--mlflow-run-id", help="log metrics and files to this MLflow run")
    p.add_argument("--tracking-uri", help="MLflow tracking URI of that run (default: $MLFLOW_TRACKING_URI)")
    return p


def names(urls: list[str], given: list[str] | None) -> list[str]:
    """The forecasts' labels: given ones (one per store), else 'model' then each further store's file stem."""
    if given is not None and len(given) != len(urls):
        raise ValueError(f"--name: {len(given)} names for {len(urls)} forecasts")
    out = given or ["model", *(PurePosixPath(u.rstrip("/")).stem for u in urls[1:])]
    if len(set(out)) != len(out) or {"persistence", "climatology"} & set(out):
        raise ValueError(f"--name: labels {out} must be distinct and not 'persistence' or 'climatology'")
    return out


def main(argv: list[str] | None = None) -> xr.Dataset:
    args = parser().parse_args(argv)
    check_target(args.out, args.out_storage_options, args.overwrite)  # before the long part
    if args.mlflow_run_id:
        check_mlflow_run(args.mlflow_run_id, args.tracking_uri)
    skill, forecasts, truth = evaluate_stores(
        dict(zip(names(args.forecast, args.name), args.forecast)), truth_url=args.truth, dims=args.dims,
        coarsen=args.coarsen, storage_options=args.storage_options,
        forecast_storage_options=args.forecast_storage_options, climatology=args.climatology,
        climatology_range=args.climatology_range, definition=args.definition, drop_nan_inits=args.drop_nan_inits)
    write_outputs(skill, next(iter(forecasts.values())), truth, args.out, args.map_leads,
                  storage_options=args.out_storage_options, overwrite=args.overwrite,
                  mlflow_run_id=args.mlflow_run_id, tracking_uri=args.tracking_uri)
    print(summary(skill).to_string(float_format=lambda v: f"{v:.4g}"))
    print(nan_note(skill))
    print(f"all metrics: {redact(args.out.rstrip('/'))}/metrics.csv")
    return skill


if __name__ == "__main__":
    sys.exit(run_job(main))
