"""A real local Ray cluster (`ray start --head` on 127.0.0.1, its own temp dir and ports) and
`ray job submit --working-dir . -- python jobs/train_era5.py` with a tiny config, ending SUCCEEDED.
The cluster is stopped by the PIDs of its own processes (found through its unique temp dir), never with a
bare `ray stop`, which would stop every Ray on the machine.
"""
from __future__ import annotations

import os
import shlex
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


def tiny_job(store: str, root: Path, name: str, *extra: str) -> list[str]:
    """`jobs/train_era5.py` arguments for a tiny run: 1 epoch of 6 steps, a checkpoint every 2."""
    settings = [f"data.url={store}", "data.channels=[z]", "data.train_range=[2015-01-01, 2015-01-31]",
                "data.val_range=[2015-02-01, 2015-02-28]", "data.sequence_length=6", "data.teacher_steps=4",
                "data.stride=6", "data.batch_size=2", "model.hidden_size=4", "model.layers=1", "optim.epochs=1",
                "optim.steps_per_epoch=6", "checkpoint.val_every=2", "checkpoint.val_batches=1", "tracking.log_every=1",
                f"tracking.uri=sqlite:///{root}/mlflow.db", "tracking.registered_model=tiny-job",
                f"run.storage_path={root}/my runs", f"run.name={name}", *extra]
    return [a for s in settings for a in ("--set", s)]


def start_in_terminal(args: list[str], ray_tmp: str) -> subprocess.Popen:
    """Python `args` as a terminal starts a foreground job: a process group of its own (its Ray's processes
    join it), SIGINT's default action (a shell's background job, `pytest &` as CI runners may start it, ignores
    SIGINT, a child inherits that, and Python then never raises KeyboardInterrupt)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # a handler: SIG_DFL again in the child
    try:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(os.environ, RAY_TMPDIR=ray_tmp),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, before)


def ctrl_c(proc: subprocess.Popen, ready, presses: int = 1) -> str:
    """Read the job's output until `ready(line)`, then Ctrl-C (`presses` times, 0.3 s apart): SIGINT to its whole
    process group; the output."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if ready(line):
            break
    for press in range(presses):
        time.sleep(0.3 * bool(press))
        os.killpg(proc.pid, signal.SIGINT)
    return "".join(seen) + proc.communicate(timeout=240)[0]


def run_status(uri: str, name: str) -> str:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("minconv_dist").experiment_id],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, runs
    return runs[0].info.status


def assert_no_ray_left(ray_tmp: str) -> None:
    time.sleep(2)
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if ray_tmp in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes left behind: {left}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_ctrl_c_at_any_moment_ends_the_run_killed_and_prints_how_to_go_on(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the job's whole process group, Ray's processes included) right after the
    MLflow run is created, mid-training (pressed twice), and while the finished run's model is being logged: each
    time exit 130, the run KILLED (never RUNNING), no process of the job's Ray left, and the printed command, pasted
    (the runs folder has a space in it), goes on: the resume, then the sync that finishes the run."""
    store = str(tmp_path / "era5.zarr")
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    ray_tmp = tempfile.mkdtemp(prefix="mci", dir="/tmp")  # this test's Ray sessions live here only
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = tmp_path / "my runs"

    proc = start_in_terminal(["jobs/train_era5.py", *tiny_job(store, tmp_path, "early")], ray_tmp)
    out = ctrl_c(proc, lambda line: "[minconv] run early:" in line)  # the MLflow run exists, Ray's workers start
    assert proc.returncode == 130 and "run early interrupted before its first checkpoint" in out, out[-3000:]
    assert "nothing to resume" in out
    assert run_status(uri, "early") == "KILLED"
    assert_no_ray_left(ray_tmp)

    proc = start_in_terminal(["jobs/train_era5.py", *tiny_job(store, tmp_path, "mid")], ray_tmp)
    # after the step-2 checkpoint; pressed twice: the second must not cut the first's cleanup short
    out = ctrl_c(proc, lambda line: "[minconv] epoch 0 step 3/6" in line, presses=2)
    assert proc.returncode == 130, out[-3000:]
    lines = [line for line in out.splitlines() if "[minconv] epoch" in line]
    assert lines and len(lines) == len(set(lines)), "a worker line shown twice on the driver"
    resume = f"python jobs/train_era5.py --resume {shlex.quote(str(runs / 'mid'))}"
    assert f"continue with: {resume}" in out, out[-3000:]
    assert run_status(uri, "mid") == "KILLED"
    assert_no_ray_left(ray_tmp)

    def logging_the_model(line: str) -> bool:  # the driver has begun to log the final model: wait for its files
        if "[minconv] step 6/6 val_loss" not in line:
            return False
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("mlartifacts/models/*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    proc = start_in_terminal(shlex.split(resume)[1:], ray_tmp)
    out = ctrl_c(proc, logging_the_model)
    assert proc.returncode == 130 and "[minconv] resumed at epoch 0 step 2" in out, out[-3000:]
    finish = f"python -m minconv_dist.train.sync {shlex.quote(str(runs / 'mid'))}"
    assert "run mid interrupted while ending; MLflow run" in out and f"finish with: {finish}" in out, out[-3000:]
    assert run_status(uri, "mid") == "KILLED", out[-3000:]
    assert_no_ray_left(ray_tmp)

    synced = subprocess.run([sys.executable, *shlex.split(finish)[1:]], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert synced.returncode == 0 and "status FINISHED; model tiny-job version 1" in synced.stdout, synced.stderr
    assert run_status(uri, "mid") == "FINISHED"
    shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_job_prints_our_lines_and_ends_with_the_summary(tmp_path):
    """What `make demo` shows, on a tiny run: our `[minconv]` lines (the workers' among them, once each, without
    Ray's prefix), at most three of Ray's (when it starts it says that token authentication is on and where its
    dashboard is), and the summary last; no per-worker Ray Train, DeepSpeed or Ray core-worker lines."""
    store = str(tmp_path / "era5.zarr")
    write_synthetic_era5(store, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    ray_tmp = tempfile.mkdtemp(prefix="mco", dir="/tmp")
    out = subprocess.run([sys.executable, "jobs/train_era5.py", *tiny_job(store, tmp_path, "demo")], cwd=ROOT,
                         env=dict(os.environ, RAY_TMPDIR=ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=840)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert out.returncode == 0, "\n".join(lines[-40:])
    ours = [line for line in lines if line.startswith("[minconv] ")]
    others = [line for line in lines if not line.startswith("[minconv] ")]
    assert len(others) <= 3, "\n".join(others)
    assert len([line for line in ours if line.startswith("[minconv] epoch 0 step")]) == 6
    assert len(ours) == len(set(ours)), "a line shown twice"
    assert lines[-1].startswith("[minconv] done: checkpoint") and "model tiny-job version 1" in lines[-1], lines[-1]
    assert f"mlflow ui --backend-store-uri {shlex.quote(f'sqlite:///{tmp_path}/mlflow.db')}" in lines[-1]
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


def test_the_workers_setup_hook_leaves_torch_unloaded():
    """Ray runs the hook `fit` gives a Ray of its own on each worker before it sets the worker's OMP_NUM_THREADS
    (per task): a hook whose import loads torch left each worker one thread per core (2 here instead of 1, so a
    job's last bits differed from an in-process fit's; 48 on a 48-core node)."""
    from minconv_dist.train import trainer

    code = f"import sys, {trainer.ignore_sigint.__module__}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and out.stdout.strip() == "False", (trainer.ignore_sigint.__module__, out.stderr[-2000:])
