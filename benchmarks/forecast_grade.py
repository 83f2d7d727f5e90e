"""Issue 23's table: what the area-weighted loss, the forcings and static inputs and the EMA of the weights each
do to the forecasts, and all of them together, on the embedded store, at the same budget.

Each row is `ray job submit -- python jobs/train_era5.py` on a local Ray head (bf16 on the GPU), registered in
MLflow, then `jobs/forecast.py --model models:/...` over the test period (after the training and validation
periods) and one `jobs/evaluate.py --definition weatherbench2` of every row beside persistence and the
climatology of the training year. Prints one markdown table (WB2 RMSE and ACC at 6, 24, 72 and 120 h per
variable) and leaves the evaluation's plots in the work folder (and in $OUT when set).

    python benchmarks/forecast_grade.py --work /tmp/fg                    # on the GPU machine, all rows
    python benchmarks/forecast_grade.py --work /tmp/fg --rows baseline all  # some rows (one call each part)
    python benchmarks/forecast_grade.py --work /tmp/fg --evaluate-only      # score what is trained
    python benchmarks/forecast_grade.py --work /tmp/fg --cpu --steps 20     # 2 gloo CPU workers (a check)
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_e2e import Session  # noqa: E402
from minconv_dist.train.local_ray import local_ray_head  # noqa: E402

FORCINGS = "data.forcings=[local_solar_time, day_of_year, toa_insolation, cos_latitude, longitude]"
STATIC = "data.static=[geopotential_at_surface, land_sea_mask]"
# the EMA's horizon, 1 / (1 - decay) = 200 steps, is an eighth of a row's ~1640; the anchors' 0.999 (a horizon of
# 1000) suits their runs of 10^5 steps and would here average in the first half of training
EMA = "optim.ema_decay=0.995"
PLAIN = "loss.area_weighted=false"  # the loss before issue 23: every grid row weighs the same
ALL = ["loss.area_weighted=true", FORCINGS, STATIC, EMA]
TENDENCY = "model.predict=tendency"  # the decoder predicts each hour's change (docs/models.md, "State or tendency")
ROWS = {
    "baseline": [PLAIN],
    "+area": ["loss.area_weighted=true"],
    "+forcings/static": [PLAIN, FORCINGS, STATIC],
    "+EMA": [PLAIN, EMA],
    "all": ALL,
    "all+tendency": [*ALL, TENDENCY],
    # 12 closed-loop steps instead of 4: the rollout it is scored on is 120 steps long
    "all+tendency+loop12": [*ALL, TENDENCY, "data.teacher_steps=12"],
}
LEADS_H = (6, 24, 72, 120)
TEST = ("2016-04-08", "2016-12-20")  # after data.val_range (2016-01-01 .. 2016-03-31) and its 20-frame context


def budget(steps: int, cpu: bool) -> list[str]:
    """The same for every row: the demo's model and windows (MinConvGRU 3x24, T = 24, 20 teacher-forced), a
    window starting at every hour of 2015 (8736), at most `steps` optimiser steps of 16 windows in 3 epochs (1638
    at most: 546 an epoch), the default learning-rate schedule."""
    per_epoch = max(1, steps // 3)
    return ["model.arch=minconvgru", "data.stride=1", "data.batch_size=16", "optim.epochs=3",
            f"optim.steps_per_epoch={per_epoch}",
            f"checkpoint.val_every={per_epoch}", "checkpoint.val_batches=4", "tracking.log_every=50",
            "tracking.plot=false", *(["parallel.precision=fp32"] if cpu else [])]


def slug(row: str) -> str:
    """The row as a run name: "+forcings/static" -> "forcings_static", "all+tendency" -> "all-tendency"."""
    return row.strip("+").replace("/", "_").replace("+", "-")


def train_rows(s: Session, rows: list[str], steps: int, cpu: bool) -> None:
    """Train the rows not yet registered, all at once: each job's worker gets an equal share of the GPU (a row
    is too small to fill an H200; sharing changes the time a row takes, not what it computes)."""
    todo = [row for row in rows if not s.version(f"fg-{slug(row)}")]
    for row in sorted(set(rows) - set(todo), key=rows.index):
        print(f"[fg] {row}: already trained (models:/{s.registered}/{s.version(f'fg-{slug(row)}')})", flush=True)
    share = [] if cpu or not todo else [f"parallel.gpus_per_worker={1 / len(todo):.4f}"]
    start, jobs = time.perf_counter(), {}
    for row in todo:
        jobs[row], _, _ = s.submit(s.settings(f"fg-{slug(row)}", *budget(steps, cpu), *ROWS[row], *share), wait=False)
    failed = []
    while jobs:
        time.sleep(5)
        for row, job in list(jobs.items()):
            status = s.status(job)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                del jobs[row]
                print(f"[fg] {row}: {status} after {time.perf_counter() - start:.0f} s, val_mse "
                      f"{s.metric(f'fg-{slug(row)}', 'val_mse')}", flush=True)
                if status != "SUCCEEDED":
                    print(s.client().get_job_logs(job)[-3000:], flush=True)
                    failed.append(row)
    if failed:
        raise SystemExit(f"training rows {failed} failed")


def forecast_rows(s: Session, rows: list[str], cpu: bool, init_every: str, steps: int) -> list[Path]:
    """One `jobs/forecast.py` per row, all at once (each is small); the rows whose forecast store exists are kept."""
    env = dict(s.head.env, MLFLOW_TRACKING_URI=s.mlflow)
    stores, running, start = [], {}, time.perf_counter()
    for row in rows:
        out = s.work / f"forecast_{slug(row)}.zarr"
        stores.append(out)
        if out.exists():
            continue
        version = s.version(f"fg-{slug(row)}")
        args = [sys.executable, "jobs/forecast.py", "--model", f"models:/{s.registered}/{version}", "--out", str(out),
                "--coarsen", "2", "--init-start", TEST[0], "--init-end", TEST[1], "--init-every", init_every,
                "--steps", str(steps), "--context", "20", "--batch-size", "16", "--device", "cpu" if cpu else "cuda"]
        running[row] = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True)
    for row, proc in running.items():
        output, _ = proc.communicate()
        print(f"[fg] forecast {row}: rc {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode:
            raise SystemExit(f"forecast of row {row} failed:\n{output[-3000:]}")
    return stores


def evaluate(s: Session, rows: list[str], stores: list[Path]) -> pd.DataFrame:
    out = s.work / "eval"
    args = [sys.executable, "jobs/evaluate.py", "--forecast", *map(str, stores), "--name", *rows,
            "--definition", "weatherbench2", "--climatology-range", "2015-01-01", "2015-12-31", "--out", str(out),
            "--map-leads", "24", "72", "120", "--overwrite"]
    subprocess.run(args, cwd=ROOT, env=dict(os.environ), check=True, capture_output=True, text=True)
    return pd.read_csv(out / "metrics.csv")


def table(metrics: pd.DataFrame, sources: list[str]) -> str:
    """Markdown: a row per (source, variable), WB2 RMSE then ACC at LEADS_H; persistence and climatology last."""
    wanted = metrics[metrics.lead_time_h.isin(LEADS_H) & metrics.metric.isin(["weighted_rmse", "acc"])]
    lines = ["| source | variable | " + " | ".join(f"RMSE {h} h" for h in LEADS_H) + " | "
             + " | ".join(f"ACC {h} h" for h in LEADS_H) + " |", "|---|---|" + "---|" * 2 * len(LEADS_H)]
    for channel in sorted(wanted.channel.unique()):
        for source in [*sources, "persistence", "climatology"]:
            cells = wanted[(wanted.source == source) & (wanted.channel == channel)]
            if cells.empty:
                continue
            value = {(m, h): v for m, h, v in zip(cells.metric, cells.lead_time_h, cells.value)}
            rmse = [f"{value.get(('weighted_rmse', h), float('nan')):.4g}" for h in LEADS_H]
            acc = [f"{value.get(('acc', h), float('nan')):.3f}" for h in LEADS_H]
            lines.append(f"| {source} | {channel} | " + " | ".join(rmse + acc) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="MLflow store, runs and forecasts (reused)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--steps", type=int, default=1650, help="optimiser steps per row (the budget)")
    parser.add_argument("--cpu", action="store_true", help="2 gloo CPU workers in fp32 instead of 1 GPU")
    parser.add_argument("--evaluate-only", action="store_true", help="forecast and score the trained rows")
    parser.add_argument("--train-only", action="store_true", help="train the rows, forecast nothing")
    parser.add_argument("--init-every", default="4D", help="spacing of the test init times")
    parser.add_argument("--lead-steps", type=int, default=120, help="forecast length in hours")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    device = "CPU (gloo, 2 workers)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"# forecast grade: `{' '.join(sys.argv)}`, {device}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}", flush=True)
    gpus, workers = (0, 2) if args.cpu else (1, 1)
    with local_ray_head(num_cpus=2 if args.cpu else 8, num_gpus=gpus) as head:
        s = Session(head, gpus, workers, args.work)
        s.registered = "forecast-grade"
        if not args.evaluate_only:
            train_rows(s, args.rows, args.steps, args.cpu)
        if args.train_only:
            return
        rows = [row for row in ROWS if s.version(f"fg-{slug(row)}")]
        stores = forecast_rows(s, rows, args.cpu, args.init_every, args.lead_steps)
    metrics = evaluate(s, rows, stores)
    print(table(metrics, rows), flush=True)
    if os.environ.get("OUT"):
        shutil.copytree(args.work / "eval", Path(os.environ["OUT"]) / "forecast_grade", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.zarr"))


if __name__ == "__main__":
    main()
