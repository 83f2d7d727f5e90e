"""Evaluation job: score a forecast zarr store against a truth store, beside persistence and climatology.

    python jobs/evaluate.py --forecast forecast.zarr --out results/ --climatology-range 2015-01-01 2015-12-31

Writes metrics.csv and skill.zarr (dims source, metric, lead_time; one variable per channel), skill_<var>.png
and maps_<var>.png; with --mlflow-run-id also logs them to that MLflow run. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import xarray as xr  # noqa: E402

from minconv_dist.data import CLIMATOLOGIES, DimNames, default_store, open_store  # noqa: E402
from minconv_dist.evaluate import DEFINITIONS, align_truth, as_fields, evaluate_forecast, open_channels, to_frame  # noqa: E402
from minconv_dist.evaluate.plots import plot_maps, plot_skill  # noqa: E402


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
    return p


def main(argv: list[str] | None = None) -> xr.Dataset:
    args = parser().parse_args(argv)
    forecast = open_store(args.forecast)
    url = args.truth or forecast.attrs.get("data_source") or default_store()
    coarsen = args.coarsen or int(forecast.attrs.get("coarsen", 1))
    dims = DimNames(**args.dims)
    channels = list(map(str, forecast.data_vars))
    truth = as_fields(open_channels(url, channels, dims=dims, coarsen=coarsen, storage_options=args.storage_options))
    align_truth(forecast, truth)  # fail on mismatched variables, grids or times before the climatology pass
    climatology = None
    if args.climatology_range:
        clim = CLIMATOLOGIES[args.climatology](url, channels, dims, tuple(args.climatology_range), args.storage_options,
                                              progress=False)
        climatology = as_fields(clim.coarsen(lat=coarsen, lon=coarsen).mean() if coarsen > 1 else clim)
    skill = evaluate_forecast(forecast, truth, climatology, args.definition, args.name)

    os.makedirs(args.out, exist_ok=True)
    table = to_frame(skill)
    table.to_csv(os.path.join(args.out, "metrics.csv"), index=False)
    labels = {d: skill[d].values.astype(object) for d in ("source", "metric")}  # variable-length strings in zarr v3
    skill.assign_coords(labels).to_zarr(os.path.join(args.out, "skill.zarr"), mode="w", consolidated=False)
    files = [os.path.join(args.out, "metrics.csv")]
    for var in channels:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", var)
        files.append(str(plot_skill(skill, var, os.path.join(args.out, f"skill_{safe}.png"))))
        files.append(str(plot_maps(forecast, truth, var, os.path.join(args.out, f"maps_{safe}.png"), args.map_leads)))
    if args.mlflow_run_id:
        import mlflow

        with mlflow.start_run(run_id=args.mlflow_run_id):
            for row in table.to_dict("records"):
                for var in channels:
                    key = re.sub(r"[^A-Za-z0-9_./ -]", "_", f"eval/{row['source']}/{row['metric']}/{var}")
                    mlflow.log_metric(key, float(row[var]), step=int(row["lead_time_h"]))
            for f in files:
                mlflow.log_artifact(f, artifact_path="evaluation")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return skill


if __name__ == "__main__":
    main()
