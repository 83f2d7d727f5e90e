"""A real local Ray cluster (`ray start --head` on 127.0.0.1, its own temp dir and ports) and
`ray job submit --working-dir . -- python jobs/train_era5.py` with a tiny config, ending SUCCEEDED.
The cluster is stopped by the PIDs of its own processes (found through its unique temp dir), never with a
bare `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus

from minconv_dist.data import write_synthetic_era5
from minconv_dist.train.local_ray import local_ray_head, ray_executable

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def local_cluster():
    with local_ray_head(num_cpus=2) as head:
        yield head.address, head.env, head


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_submit_train_era5_succeeds(local_cluster, tmp_path):
    address, env, head = local_cluster
    store = str(tmp_path / "era5.zarr")
    # the default data.channels (geopotential@500, temperature@850) and dims (lat read as latitude) fit this layout
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32, layout="weatherbench2")
    job_id = f"minconv-test-{uuid.uuid4().hex[:8]}"
    settings = [
        f"data.url={store}", "data.train_range=[2015-01-01, 2015-01-31]", "data.val_range=[2015-02-01, 2015-02-28]",
        "data.sequence_length=6", "data.teacher_steps=4", "data.stride=6", "data.batch_size=2",
        "model.hidden_size=4", "model.layers=2", "optim.epochs=1", "optim.steps_per_epoch=2", "checkpoint.val_every=2",
        "checkpoint.val_batches=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"run.storage_path={tmp_path}/runs",
        "run.name=job",
    ]
    submit = subprocess.run(
        [ray_executable(), "job", "submit", f"--address={address}", f"--submission-id={job_id}", "--working-dir", ".", "--",
         "python", "jobs/train_era5.py", *(arg for s in settings for arg in ("--set", s))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=540,
    )
    status = head.job_client().get_job_status(job_id)
    assert status == JobStatus.SUCCEEDED, submit.stdout[-4000:] + submit.stderr[-2000:]
    assert list((tmp_path / "runs" / "job").glob("checkpoint_*/model.pt"))
    assert (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_ends_the_run_as_killed_cleans_up_and_prints_the_resume_command(tmp_path):
    """SIGINT to the driver mid-training: exit 130, the MLflow run KILLED, the resume command printed, and no
    process of the Ray it started left behind."""
    store = str(tmp_path / "era5.zarr")
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    ray_tmp = tempfile.mkdtemp(prefix="mci", dir="/tmp")  # this job's Ray session lives here only
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    settings = [f"data.url={store}", "data.channels=[z]", "data.train_range=[2015-01-01, 2015-01-31]",
                "data.val_range=[2015-02-01, 2015-02-28]", "model.hidden_size=4", "model.layers=1",
                "optim.epochs=50", "tracking.log_every=1", f"tracking.uri={uri}", f"run.storage_path={tmp_path}/runs",
                "run.name=interrupted"]
    # started as from a terminal: a shell's background job (`pytest &`, as CI runners may start it) ignores
    # SIGINT, a child inherits that, and Python then never raises KeyboardInterrupt
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler: SIG_DFL again in the child
    try:
        proc = subprocess.Popen([sys.executable, "jobs/train_era5.py", *(a for s in settings for a in ("--set", s))],
                                cwd=ROOT, env=dict(os.environ, RAY_TMPDIR=ray_tmp), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    finally:
        signal.signal(signal.SIGINT, before)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "[minconv] epoch 0 step 2/" in line:
            break
    proc.send_signal(signal.SIGINT)
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out[-3000:]
    lines = [line for line in out.splitlines() if "[minconv] epoch" in line]
    assert lines and len(lines) == len(set(lines)), "a worker line shown twice on the driver"
    assert f"continue with: python jobs/train_era5.py --resume {tmp_path}/runs/interrupted" in out
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("minconv_dist").experiment_id])[0]
    assert run.info.status == "KILLED"
    time.sleep(2)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes left behind: {left}"
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_head_listens_on_loopback_only_and_wants_its_token(local_cluster):
    """The documented local head: no socket of its processes is reachable from the network, and a job client
    without the head's token is turned away."""
    address, env, _ = local_cluster
    head_dir = env["RAY_TMPDIR"]
    procs = {p.pid for p in psutil.process_iter(["cmdline"]) if head_dir in " ".join(p.info["cmdline"] or [])}
    listening = [c.laddr for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in procs]
    assert listening, "found no listening socket of the head: the check would prove nothing"
    exposed = [a for a in listening if a.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    with_token = subprocess.run([ray_executable(), "job", "list", f"--address={address}"], env=env,
                                capture_output=True, text=True, timeout=60)
    assert with_token.returncode == 0, with_token.stderr[-2000:]
    stranger = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN_PATH"} | {"HOME": str(Path(head_dir) / "nohome")}
    without = subprocess.run([ray_executable(), "job", "list", f"--address={address}"], env=stranger,
                             capture_output=True, text=True, timeout=60)
    assert without.returncode != 0 and "token" in without.stderr.lower()
