"""Forecast job: load a model, roll it out from many init times of a zarr store, write a forecast zarr store
in the WeatherBench2 layout (time, prediction_timedelta, [level,] latitude, longitude).

    python jobs/forecast.py --model ckpt.pt --out forecast.zarr --init-start 2016-06-01 --init-end 2016-06-30 \\
        --init-every 24h --context 20 --steps 72
    python jobs/forecast.py --model models:/z500-minconvgru/3 --warmup all ...   # Min cells: one scan over the record
    python jobs/forecast.py --model official:best.pt --arch minconvgru --padding cylinder --stats stats.json ...
    python jobs/forecast.py ... --out s3://bucket/fc.zarr --out-storage-options '{"anon": false}'

The model normalises its inputs and de-normalises its forecasts itself (the statistics are in its weights);
official checkpoints have none, so they take --stats. The store defaults to the embedded synthetic one.
See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from minconv_dist.data import DimNames, NormStats, default_store
from minconv_dist.data.store import redact, redact_config
from minconv_dist.errors import run_job
from minconv_dist.evaluate import init_times, load_model, open_channels, write_forecast
from minconv_dist.evaluate.outputs import check_target
from minconv_dist.job_args import dims_arg, job_parser


def warmup_arg(value: str) -> int | str:
    """'all' or a positive number of frames."""
    if value == "all":
        return value
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--warmup {value!r}: expected 'all' or a number of frames >= 1")
    return int(value)


def parser() -> argparse.ArgumentParser:
    p = job_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="checkpoint file, models:/name/version, runs:/id/path or official:PATH")
    p.add_argument("--tracking-uri", help="MLflow store of a models:/ or runs:/ --model; else $MLFLOW_TRACKING_URI")
    p.add_argument("--arch", help="architecture, for official checkpoints")
    p.add_argument("--padding", default="zeros", help="padding, for official checkpoints")
    p.add_argument("--tanh-encoder", action="store_true", help="tanh on the encoder, for official checkpoints")
    p.add_argument("--stats", help="NormStats JSON, for official checkpoints (others carry their statistics)")
    p.add_argument("--data", help="zarr store of initial conditions (default: the embedded synthetic store)")
    p.add_argument("--storage-options", type=json.loads, default=None, help="JSON for fsspec")
    p.add_argument("--channels", help="channel specs, e.g. 'z' (default: those the model was trained on)")
    p.add_argument("--dims", type=dims_arg, default=DimNames(),
                   help='store dim names (DimNames fields), e.g. {"lat": "latitude", "lon": "longitude"}; default: '
                        "time, level, lat, lon")
    p.add_argument("--coarsen", type=int, default=1, help="block-average the grid by this factor (as in training)")
    p.add_argument("--init-start", help="first init time (default: the data's first)")
    p.add_argument("--init-end", help="last init time (default: the data's last)")
    p.add_argument("--init-every", default="24h", help="spacing of init times")
    p.add_argument("--context", type=int, default=20, help="frames of warm-up ending at init time, per init")
    p.add_argument("--warmup", type=warmup_arg, default=None,
                   help="Min cells only, instead of --context: 'all' or N: the state at every init time comes from "
                        "one pass over the record, from its start ('all') or N frames before the first init time")
    p.add_argument("--warmup-chunk", type=int, default=256, help="frames read per step of the --warmup pass")
    p.add_argument("--steps", type=int, default=24, help="lead steps (in the data's time step)")
    p.add_argument("--batch-size", type=int, default=8, help="init times per rollout batch (bounds memory)")
    p.add_argument("--device", default="cpu", help="torch device of the rollouts, e.g. cuda")
    p.add_argument("--out", required=True, help="forecast zarr store: local path or fsspec URL (s3://, gs://, memory://)")
    p.add_argument("--out-storage-options", type=json.loads, default=None, help="JSON for fsspec (--out)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.add_argument("--allow-nan", action="store_true",
                   help="write the (NaN) forecasts of init times whose inputs hold NaN, listed in the store's "
                        "nan_inputs attr, instead of refusing them")
    return p


def main(argv: list[str] | None = None) -> str:
    args = parser().parse_args(argv)
    check_target(args.out, args.out_storage_options, args.overwrite)  # before the long part
    stats = NormStats.load(args.stats) if args.stats else None
    model = load_model(args.model, arch=args.arch, padding=args.padding, tanh_encoder=args.tanh_encoder, stats=stats,
                       tracking_uri=args.tracking_uri)
    url = args.data or default_store()
    data = open_channels(url, args.channels or model.normalizer.channels, dims=args.dims,
                         coarsen=args.coarsen, storage_options=args.storage_options)
    inits = init_times(data["time"].values, args.init_start, args.init_end, args.init_every)
    config = {k: v for k, v in vars(args).items() if not k.endswith("storage_options")}  # credentials
    config["dims"] = asdict(args.dims)  # what jobs/evaluate.py reads back as the data_source's layout
    attrs = {"model_uri": args.model, "model_spec": model.spec, "data_source": redact(url), "coarsen": args.coarsen,
             "context": args.context, "warmup": str(args.warmup), "config": redact_config(config),
             "created_by": "jobs/forecast.py"}
    out = write_forecast(model, data, inits, context=args.context, steps=args.steps, out=args.out,
                         warmup=args.warmup, warmup_chunk=args.warmup_chunk, batch_size=args.batch_size,
                         attrs=attrs, device=args.device, overwrite=args.overwrite,
                         storage_options=args.out_storage_options, allow_nan=args.allow_nan)
    print(f"wrote {len(inits)} forecasts x {args.steps} leads to {redact(out)}")
    return out


if __name__ == "__main__":
    sys.exit(run_job(main))
