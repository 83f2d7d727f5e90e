"""What the results benchmarks (`forecast_grade.py`, `long_context.py`) share: train a table's rows as
`ray job submit` jobs all at once on shares of one GPU, forecast from each registered model all at once, score
every forecast in one `jobs/evaluate.py --definition weatherbench2` beside persistence and climatology, and print
the table. Each step skips what the work folder already holds, so a table can be built over several device calls
on one warm machine: a row whose run was cut off (the call's time ran out) resumes from its newest checkpoint."""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_e2e import Session  # noqa: E402
from minconv_dist.train.checkpoint import latest  # noqa: E402
from minconv_dist.train.config import flatten  # noqa: E402
from minconv_dist.train.local_ray import local_ray_head  # noqa: E402


def parser(doc: str, init_every: str, lead_steps: int) -> argparse.ArgumentParser:
    """The options every table shares: --work, --cpu, --train-only, --init-every, --lead-steps; add --rows."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="MLflow store, runs and forecasts (reused)")
    p.add_argument("--cpu", action="store_true", help="2 gloo CPU workers in fp32 instead of 1 GPU")
    p.add_argument("--train-only", action="store_true", help="train the rows, forecast nothing")
    p.add_argument("--init-every", default=init_every, help="spacing of the test init times")
    p.add_argument("--lead-steps", type=int, default=lead_steps, help="forecast length in hours")
    return p


@contextmanager
def session(args: argparse.Namespace, title: str, registered: str, gpu_cpus: int) -> Iterator[Session]:
    """Print the table's header line (command, device, torch, date), then a local Ray head (1 GPU, `gpu_cpus`
    CPUs; with --cpu 2 CPUs) and a `Session` on --work that registers its models as `registered`."""
    args.work.mkdir(parents=True, exist_ok=True)
    device = "CPU (gloo, 2 workers)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"# {title}: `{' '.join(sys.argv)}`, {device}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}", flush=True)
    gpus, workers = (0, 2) if args.cpu else (1, 1)
    with local_ray_head(num_cpus=2 if args.cpu else gpu_cpus, num_gpus=gpus) as head:
        s = Session(head, gpus, workers, args.work)
        s.registered = registered
        yield s


def recipe() -> list[str]:
    """configs/era5_forecast_grade.yaml as `--set` values: the recipe of the forecast-grade table."""
    values = yaml.safe_load((ROOT / "configs" / "era5_forecast_grade.yaml").read_text())
    return [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in flatten(values).items()]


def device_args(cpu: bool) -> list[str]:
    return ["--device", "cpu" if cpu else "cuda"]


def publish(work: Path, name: str) -> None:
    """The evaluation's tables and plots (not its stores) into $OUT/`name`, when $OUT is set (the device)."""
    if os.environ.get("OUT"):
        shutil.copytree(work / "eval", Path(os.environ["OUT"]) / name, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.zarr"))


def run_name(row: str, prefix: str) -> str:
    """The row as a run (or file) name: ("+forcings/static", "fg") -> "fg-forcings-static", ("stateful T=24",
    "lc") -> "lc-stateful-T-24"."""
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9.]+", "-", row).strip("-")


def train_rows(s: Session, rows: dict[str, list[str]], prefix: str, cpu: bool) -> None:
    """Train the rows (row -> `--set` values) not yet registered, all at once: each job's worker gets an equal
    share of the GPU (a row of these sizes is too small to fill an H200; sharing changes the time a row takes,
    not what it computes). A row whose run has a checkpoint but no registered model is resumed (`--resume`)."""
    todo = [row for row in rows if not s.version(run_name(row, prefix))]
    for row in rows:
        if row not in todo:
            print(f"[rows] {row}: already trained (models:/{s.registered}/{s.version(run_name(row, prefix))})",
                  flush=True)
    share = [] if cpu or not todo else [f"parallel.gpus_per_worker={1 / len(todo):.4f}"]
    start, jobs = time.perf_counter(), {}
    for row in todo:
        name = run_name(row, prefix)
        resume = name if latest(f"{s.work}/runs/{name}") else None
        if resume:  # the saved plan, on this call's share of the GPU (a resume may change where it runs)
            print(f"[rows] {row}: resuming {name} from its newest checkpoint", flush=True)
        jobs[row], _, _ = s.submit(s.settings(name, *([] if resume else rows[row]), *share), resume=resume,
                                   wait=False)
    failed = []
    while jobs:
        time.sleep(5)
        for row, job in list(jobs.items()):
            status = s.status(job)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                del jobs[row]
                print(f"[rows] {row}: {status} after {time.perf_counter() - start:.0f} s, val_mse "
                      f"{s.metric(run_name(row, prefix), 'val_mse')}", flush=True)
                if status != "SUCCEEDED":
                    print(s.client().get_job_logs(job)[-3000:], flush=True)
                    failed.append(row)
    if failed:
        raise SystemExit(f"training rows {failed} failed")


def forecast_rows(s: Session, forecasts: dict[str, tuple[str, list[str]]]) -> list[Path]:
    """One `jobs/forecast.py` per label (label -> (run name, its arguments but --model and --out)), all at once
    (each is small); a label whose forecast store exists is kept. Returns the stores in the labels' order."""
    env = dict(s.head.env, MLFLOW_TRACKING_URI=s.mlflow)
    stores, running, start = [], {}, time.perf_counter()
    for label, (name, args) in forecasts.items():
        out = s.work / f"forecast_{run_name(label, 'f')}.zarr"
        stores.append(out)
        if out.exists():  # a forecast store is written all or nothing
            continue
        command = [sys.executable, "jobs/forecast.py", "--model", f"models:/{s.registered}/{s.version(name)}",
                   "--out", str(out), *args]
        running[label] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
    for label, proc in running.items():
        output, _ = proc.communicate()
        print(f"[rows] forecast {label}: rc {proc.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
        if proc.returncode:
            raise SystemExit(f"forecast {label} failed:\n{output[-3000:]}")
    return stores


def evaluate(s: Session, labels: list[str], stores: list[Path], *args: str) -> pd.DataFrame:
    """`jobs/evaluate.py --definition weatherbench2` of every store (named by its label) beside persistence and
    the climatology; the evaluation's extra `args`; its metrics.csv."""
    out = s.work / "eval"
    command = [sys.executable, "jobs/evaluate.py", "--forecast", *map(str, stores), "--name", *labels,
               "--definition", "weatherbench2", "--out", str(out), "--overwrite", *args]
    subprocess.run(command, cwd=ROOT, env=dict(os.environ), check=True, capture_output=True, text=True)
    return pd.read_csv(out / "metrics.csv")


# metric -> (column name, format) of `table`'s default: the deterministic tables' WB2 RMSE then ACC
SKILL_COLUMNS = {"weighted_rmse": ("RMSE", ".4g"), "acc": ("ACC", ".3f")}


def table(metrics: pd.DataFrame, sources: list[str], leads_h: tuple[int, ...],
          columns: dict[str, tuple[str, str]] = SKILL_COLUMNS) -> str:
    """Markdown: a row per (source, variable), each of `columns`' metrics at `leads_h` in turn; persistence and
    climatology last."""
    wanted = metrics[metrics.lead_time_h.isin(leads_h) & metrics.metric.isin(columns)]
    lines = ["| source | variable | " + " | ".join(f"{name} {h} h" for name, _ in columns.values() for h in leads_h)
             + " |", "|---|---|" + "---|" * len(columns) * len(leads_h)]
    for channel in sorted(wanted.channel.unique()):
        for source in [*sources, "persistence", "climatology"]:
            cells = wanted[(wanted.source == source) & (wanted.channel == channel)]
            if cells.empty:
                continue
            value = {(m, h): v for m, h, v in zip(cells.metric, cells.lead_time_h, cells.value)}
            numbers = [format(value.get((metric, h), float("nan")), spec) for metric, (_, spec) in columns.items()
                       for h in leads_h]
            lines.append(f"| {source} | {channel} | " + " | ".join(numbers) + " |")
    return "\n".join(lines)
