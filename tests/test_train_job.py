"""A real local Ray cluster (`ray start --head` on 127.0.0.1, its own temp dir and ports) and
`ray job submit --working-dir . -- python jobs/train_era5.py` with a tiny config, ending SUCCEEDED.
The cluster is stopped by the PIDs of its own processes (found through its unique temp dir), never with a
bare `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from minconv_dist.data import write_synthetic_era5

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def own_processes(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def local_cluster():
    temp_dir = tempfile.mkdtemp(prefix="mcr", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    port, dashboard = free_port(), free_port()
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_TMPDIR=temp_dir,
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=180,
    )
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        procs = own_processes(temp_dir)
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=15)
        for proc in alive:
            proc.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_train_era5_succeeds(local_cluster, tmp_path, monkeypatch):
    address, env = local_cluster
    store = str(tmp_path / "era5.zarr")
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    job_id = f"minconv-test-{uuid.uuid4().hex[:8]}"
    settings = [
        f"data.url={store}", "data.train_range=[2015-01-01, 2015-01-31]", "data.val_range=[2015-02-01, 2015-02-28]",
        "data.sequence_length=6", "data.teacher_steps=4", "data.stride=6", "data.batch_size=2",
        "model.hidden_sizes=[4, 4]", "optim.epochs=1", "optim.steps_per_epoch=2", "checkpoint.val_every=2",
        "checkpoint.val_batches=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"run.storage_path={tmp_path}/runs",
        "run.name=job",
    ]
    submit = subprocess.run(
        [RAY, "job", "submit", f"--address={address}", f"--submission-id={job_id}", "--working-dir", ".", "--",
         "python", "jobs/train_era5.py", *(arg for s in settings for arg in ("--set", s))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    status = JobSubmissionClient(address).get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert list((tmp_path / "runs" / "job").glob("checkpoint_*/model.pt"))
    assert (tmp_path / "mlflow.db").exists()
