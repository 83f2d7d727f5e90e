"""The GPU training path end to end, as a user runs it, on a local Ray head bound to 127.0.0.1:

  `ray job submit -- python jobs/train_era5.py --gpu true` at ZeRO 0, 2 and 3 in the default precision (auto:
  bf16-mixed on a GPU; or `--precision bf16|bf16-mixed`), each SUCCEEDED with a registered model version; forecast
  and evaluate from that `models:/` URI; `--resume` of a stopped run and a worker killed mid-epoch (each compared
  with the uninterrupted ZeRO-2 run); and `model.chunk_size` training at T = 8760 through the job itself. The small
  runs train the area-weighted loss on the embedded store's two prognostic variables with every forcing and its two
  static fields as inputs, predict tendencies, and keep an EMA of the weights (validated and registered), so
  training, registration, forecast, evaluation and the recovery checks cover them all; one more ZeRO-2 run trains
  the CRPS loss of a 2-member ensemble.

    python benchmarks/gpu_e2e.py --gpus 1 2        # on the GPU machine (see benchmarks/gpu_e2e.sh)
    python benchmarks/gpu_e2e.py --cpu             # the same steps on 2 gloo CPU workers, small (smoke test)
    python benchmarks/gpu_e2e.py --gpus 1 --parts train   # one part (then recover, then long), where one
                                                          # call is limited to 10 minutes

Prints one markdown table (GPUs, check, result, detail) for docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minconv_dist.data import write_synthetic_era5  # noqa: E402
from minconv_dist.models import check_weights, load_model_file  # noqa: E402
from minconv_dist.train.checkpoint import latest  # noqa: E402
from minconv_dist.train.local_ray import local_ray_head, ray_executable  # noqa: E402

ROWS: list[str] = []
PARTS = ("train", "recover", "long")


def row(gpus: int, check: str, ok: bool, detail: str) -> bool:
    ROWS.append(f"| {gpus} | {check} | {'ok' if ok else '**FAILED**'} | {detail} |")
    print(ROWS[-1], flush=True)
    return ok


class Session:
    """One local Ray head with `gpus` GPUs (0: CPU workers) and one MLflow store / run folder under `work`."""

    def __init__(self, head, gpus: int, workers: int, work: Path, precision: str):
        self.head, self.gpus, self.workers, self.work, self.precision = head, gpus, workers, work, precision
        self.mlflow = f"sqlite:///{work}/mlflow.db"
        self.registered = f"e2e-{gpus}gpu"

    def settings(self, name: str, *extra: str) -> list[str]:
        gpu = self.gpus > 0
        return [f"parallel.num_workers={self.workers}", f"parallel.use_gpu={str(gpu).lower()}",
                f"parallel.precision={self.precision}", f"tracking.uri={self.mlflow}", f"tracking.registered_model={self.registered}",
                f"run.storage_path={self.work}/runs", f"run.name={name}", *extra]

    def submit(self, sets: list[str], resume: str | None = None, wait: bool = True) -> tuple[str, str, float]:
        """`ray job submit --working-dir .` of jobs/train_era5.py; (job id, status, seconds). A job whose working
        dir package vanished from the GCS (Ray issue #46625: an unchanged working dir submitted right after the
        job that uploaded it ended) is submitted once more; the retry is printed."""
        for attempt in range(2):
            job = f"e2e-{uuid.uuid4().hex[:8]}"
            args = [ray_executable(), "job", "submit", f"--address={self.head.address}", f"--submission-id={job}",
                    "--working-dir", ".", *([] if wait else ["--no-wait"]), "--", "python", "jobs/train_era5.py",
                    *(a for s in sets for a in ("--set", s)), *(["--resume", resume] if resume else [])]
            start = time.perf_counter()
            out = subprocess.run(args, cwd=ROOT, env=self.head.env, capture_output=True, text=True, timeout=900)
            if not wait:
                return job, "SUBMITTED", 0.0
            status = self.status(job)
            message = self.client().get_job_info(job).message or ""
            if status == "FAILED" and "runtime_env file package" in message and attempt == 0:
                print(f"(job {job}: working dir package missing from the GCS, Ray issue #46625; resubmitting)")
                time.sleep(2)
                continue
            if status != "SUCCEEDED":
                print(out.stdout[-3000:], out.stderr[-2000:], flush=True)
            return job, status, time.perf_counter() - start
        raise AssertionError("unreachable")

    def client(self):
        return self.head.job_client()

    def status(self, job: str) -> str:
        return str(self.client().get_job_status(job)).rsplit(".", 1)[-1]

    def version(self, name: str) -> str | None:
        """The model version registered by run `name`."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow)
        experiment = client.get_experiment_by_name("minconv_dist")
        if experiment is None:  # nothing trained yet
            return None
        runs = client.search_runs(experiment.experiment_id, f"attributes.run_name = '{name}'")
        versions = [v.version for r in runs for v in client.search_model_versions(f"run_id = '{r.info.run_id}'")]
        return max(versions, key=int) if versions else None

    def model(self, name: str) -> torch.nn.Module:
        """The network of run `name`'s last checkpoint."""
        return load_model_file(f"{latest(f'{self.work}/runs/{name}')[0]}/model.pt")

    def metric(self, name: str, key: str) -> float | None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.mlflow)
        runs = client.search_runs(client.get_experiment_by_name("minconv_dist").experiment_id,
                                  f"attributes.run_name = '{name}'")
        return runs[0].data.metrics.get(key) if runs else None


def same_weights(s: Session, name: str, reference: torch.nn.Module) -> tuple[bool, str]:
    """Run `name`'s weights against the reference run's: every parameter bit-equal (a restart replays the same
    steps from a checkpoint that holds every state), every buffer exactly equal; (ok, what differed most)."""
    try:
        diffs = check_weights(s.model(name), reference)
    except AssertionError as err:
        return False, str(err)
    return True, f"every parameter and buffer bit-equal ({len(diffs)} tensors)"


def run_training(s: Session, small: list[str], cpu: bool) -> None:
    """Train at ZeRO 0/2/3 and register; forecast and evaluate the ZeRO-2 model."""
    n = s.gpus or s.workers
    for stage in (0, 2, 3):
        train(s, small, stage)
    # the almost-fair CRPS of 2 members a window (each from its own input noise) under ZeRO-2
    _, status, sec = s.submit(s.settings("crps", *small, "parallel.zero_stage=2", "loss.kind=crps", "loss.members=2",
                                         "data.input_noise=0.05"))
    row(n, f"train ZeRO-2 {s.precision}, `loss.kind=crps` (2 members)", status == "SUCCEEDED" and s.version("crps") is not None,
        f"{status}, {sec:.0f} s, val_loss {s.metric('crps', 'val_loss')}, val_mse {s.metric('crps', 'val_mse')}")
    version = s.version("zero2")
    env = dict(s.head.env, MLFLOW_TRACKING_URI=s.mlflow)
    fc, ev = s.work / "forecast.zarr", s.work / "eval"
    device = "cpu" if cpu else "cuda"
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "jobs/forecast.py", "--model", f"models:/{s.registered}/{version}",
                          "--out", str(fc), "--coarsen", "2", "--init-start", "2016-02-01", "--init-end",
                          "2016-02-10", "--steps", "12", "--device", device, "--overwrite"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    row(n, f"forecast from `models:/{s.registered}/{version}`", out.returncode == 0,
        f"{time.perf_counter() - start:.0f} s; {(out.stdout or out.stderr).strip().splitlines()[-1][:120]}")
    out = subprocess.run([sys.executable, "jobs/evaluate.py", "--forecast", str(fc), "--out", str(ev)],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    row(n, "evaluate that forecast", out.returncode == 0 and (ev / "metrics.csv").exists(),
        "metrics.csv, skill and map plots written" if out.returncode == 0 else out.stderr[-300:])


def train(s: Session, small: list[str], stage: int) -> None:
    """One registered training run `zero{stage}` in the session's precision."""
    name = f"zero{stage}"
    _, status, sec = s.submit(s.settings(name, *small, f"parallel.zero_stage={stage}"))
    version = s.version(name) if status == "SUCCEEDED" else None
    ok = status == "SUCCEEDED" and version is not None
    row(s.gpus or s.workers, f"train ZeRO-{stage} {s.precision} (`ray job submit`)", ok,
        f"{status}, {sec:.0f} s, model `models:/{s.registered}/{version}`, val_loss {s.metric(name, 'val_loss')}")


def run_recovery(s: Session, small: list[str]) -> None:
    """`--resume` of a stopped run and a worker killed mid-epoch, each against the uninterrupted ZeRO-2 run
    (trained here when the training part did not run)."""
    n = s.gpus or s.workers
    if s.version("zero2") is None:
        train(s, small, 2)
    reference = s.model("zero2")
    _, status, _ = s.submit(s.settings("stopped", *small, "parallel.zero_stage=2", "run.stop_after_steps=37"))
    _, status2, sec = s.submit(s.settings("stopped", *small, "parallel.zero_stage=2"), resume="stopped")
    ok, detail = same_weights(s, "stopped", reference) if status == status2 == "SUCCEEDED" else (False, "")
    row(n, "`--resume` a run stopped at step 37 of 90", ok,
        f"{status}/{status2}; against the uninterrupted run: {detail}")

    job, _, _ = s.submit(s.settings("killed", *small, "parallel.zero_stage=2"), wait=False)
    killed_at = kill_a_worker_after(s, job, step=45)
    while s.status(job) in ("PENDING", "RUNNING"):
        time.sleep(1)
    status = s.status(job)
    logs = s.client().get_job_logs(job)
    restarted = "resumed at" in logs
    ok, detail = same_weights(s, "killed", reference) if status == "SUCCEEDED" else (False, "")
    row(n, f"worker killed at step {killed_at}", ok and restarted,
        f"{status}, restarted from checkpoint: {restarted}; against the uninterrupted run: {detail}")


def run_long_job(s: Session, long: list[str]) -> None:
    """`train_era5.py` itself on one long window, `model.chunk_size` keeping the activations to a chunk."""
    n = s.gpus or s.workers
    _, status, sec = s.submit(s.settings("long", *long))
    peak = s.metric("long", "gpu_memory_max_mb")
    row(n, f"`model.chunk_size` training at T = {long_t(long)}", status == "SUCCEEDED",
        f"{status}, {sec:.0f} s" + (f", peak GPU memory {peak:.0f} MiB" if peak else ""))


def long_t(sets: list[str]) -> str:
    return next(s.split("=")[1] for s in sets if s.startswith("data.sequence_length="))


def kill_a_worker_after(s: Session, job: str, step: int) -> int | None:
    """SIGKILL one Ray Train worker once the job's log shows training at or past `step`."""
    client = s.client()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        steps = [int(m) for m in re.findall(r"step (\d+)/", client.get_job_logs(job))]
        if steps and max(steps) >= step:
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
            if workers:
                max(workers, key=lambda p: p.pid).kill()
                return max(steps)
        time.sleep(0.2)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts, one Ray head each")
    parser.add_argument("--cpu", action="store_true", help="2 gloo CPU workers, small sizes (smoke test)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="train: ZeRO 0/2/3, forecast, evaluate; recover: resume and a killed worker; "
                             "long: the model.chunk_size job at long T (one part fits a 10-minute call)")
    parser.add_argument("--precision", choices=["auto", "bf16", "bf16-mixed"], default="auto",
                        help="parallel.precision of every run (auto: bf16-mixed on a GPU, fp32 on --cpu; the others "
                             "on --cpu too, under autocast on the CPU)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a timeout still stops the Ray head (finally)
    work = Path(tempfile.mkdtemp(prefix="gpu-e2e-"))
    store = str(work / "era5_4y.zarr")  # T = 8760 needs more than a year per split
    write_synthetic_era5(store, start="2013-01-01", end="2017-01-01", nlat=16, nlon=32, chunks=240)
    device = "CPU (gloo)" if args.cpu else torch.cuda.get_device_name(0)
    print(f"# GPU end-to-end: `{' '.join(sys.argv)}`, {device}, torch {torch.__version__}, "
          f"{datetime.date.today().isoformat()}\n\n| GPUs | check | result | detail |\n|---|---|---|---|", flush=True)
    # 3 epochs x 30 steps, a checkpoint every 15: long enough to stop, resume and kill inside an epoch
    small = ["model.hidden_size=32", "model.layers=2", "data.sequence_length=12", "data.teacher_steps=8", "data.stride=12",
             "data.batch_size=2", "optim.epochs=3", "optim.steps_per_epoch=30", "checkpoint.val_every=15",
             "checkpoint.val_batches=2", "tracking.log_every=5",
             "optim.ema_decay=0.9",  # an EMA horizon of ~10 of the 90 steps (0.999 would hardly leave the init)
             "data.forcings=[local_solar_time, day_of_year, toa_insolation, cos_latitude, longitude]",
             "data.static=[geopotential_at_surface, land_sea_mask]", "model.predict=tendency"]
    T, chunk = (240, 48) if args.cpu else (8760, 730)
    long = [f"data.url={store}", "data.channels=[z]", "data.coarsen=1",
            "data.train_range=[2013-01-01, 2014-06-30]", "data.val_range=[2015-01-01, 2016-12-31]", f"data.sequence_length={T}", f"data.teacher_steps={T}",
            "data.stride=24", "data.batch_size=1", f"model.chunk_size={chunk}", "optim.epochs=1",
            "optim.steps_per_epoch=3", "checkpoint.val_batches=1", "tracking.log_every=1"]
    for gpus in [0] if args.cpu else args.gpus:
        env = dict(os.environ, **({} if args.cpu else {"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(gpus)))}))
        workers = 2 if args.cpu else gpus
        with local_ray_head(num_cpus=max(2, 4 * workers) if not args.cpu else 2, num_gpus=gpus, env=env) as head:
            row(gpus or workers, "local Ray head on 127.0.0.1", True, head.address)
            session = Session(head, gpus, workers, work / f"g{gpus}", args.precision)
            if "train" in args.parts:
                run_training(session, small, args.cpu)
            if "recover" in args.parts:
                run_recovery(session, small)
            if "long" in args.parts:
                run_long_job(session, long)
    failed = sum("FAILED" in r for r in ROWS)
    print(f"\n{len(ROWS) - failed} of {len(ROWS)} checks passed; work folder {work}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
