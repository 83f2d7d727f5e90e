"""Training on a Ray cluster of several nodes on this host (issue 26): a head without CPUs (the driver and Ray
Train's controller run there) and two worker nodes of 2 CPUs, each a raylet of its own on 127.0.0.1
(`ray.cluster_utils.Cluster`). Workers spread or packed; checkpoints on storage every node sees (a local folder,
S3 on moto). In one run: a worker node lost mid-epoch while its rank uploads a checkpoint (the other rank left
waiting on the other node), then a worker preempted (SIGTERM). In a job of its own process: the head lost, and
the job's --resume on a fresh Ray. Failures share runs to keep the module short: each restart costs a new worker
group (~20 s here), each run ~40 s.

One cluster for the module, in a temp dir of its own (Ray's address file included), its processes stopped by PID
(`Cluster.remove_node`/`shutdown`, then any left under that temp dir). The figures each test measures (time to
recover, steps lost) go to `<pytest tmp dir>/multinode_figures.json` for docs/cluster.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import threading
from concurrent.futures import Future
from pathlib import Path

import cloudpickle
import fsspec
import mlflow
import psutil
import pytest
import ray
import torch
import yaml
from ray.cluster_utils import Cluster

from minconv_dist.data import write_synthetic_era5
from minconv_dist.models import check_weights, load_model_file
from minconv_dist.train import fit
from minconv_dist.train.checkpoint import latest
from minconv_dist.train.local_ray import free_port, processes_under, stop
from minconv_dist.train.safe_files import torch_load
from tests.test_train_ray import STEPS, losses, tiny

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a busy 2-core machine: 3 minutes if idle
ROOT = Path(__file__).resolve().parents[1]
WORKER_CPUS = 2  # a worker node fits both training workers: after a node is lost, the run goes on on the other
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callbacks below reach the Ray workers


class RecordStarts:
    """Appends `rank step node pid time` at the first step each worker process runs: one line per rank and attempt."""

    def __init__(self, log: Path):
        self.log, self.started = log, False

    def __call__(self, engine, step: int, rank: int) -> None:
        if not self.started:
            self.started = True
            with open(self.log, "a") as f:
                f.write(f"{rank} {step} {ray.get_runtime_context().get_node_id()} {os.getpid()} {time.time()}\n")


def attempts(log: Path) -> list[list[tuple[int, int, str, int, float]]]:
    """RecordStarts' (or held_job's) lines `rank first_step node pid time`, grouped by attempt (two ranks each), in
    time order; each attempt sorted by rank."""
    rows = sorted(((int(r), int(s), n, int(p), float(t)) for r, s, n, p, t in
                   (line.split() for line in log.read_text().splitlines())), key=lambda row: row[4])
    return [sorted(rows[i:i + 2]) for i in range(0, len(rows), 2)]


class UploadCutShort:
    """In the first attempt (no `marker` yet), rank `rank` uploads its part of the checkpoint of global step `step`
    as a node lost mid-upload leaves it: its manifest whole, every other file half written; then writes its node
    id to `marker` and waits for good. Ray uploads with pyarrow."""

    def __init__(self, step: int, rank: int, marker: Path):
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, engine, step: int, rank: int) -> None:
        import pyarrow.fs

        if step != self.step or rank != self.rank or self.marker.exists():
            return

        def cut_short(source, destination, source_filesystem=None, destination_filesystem=None, **kwargs):
            for path in sorted(p for p in Path(source).rglob("*") if p.is_file()):
                data = path.read_bytes()
                with destination_filesystem.open_output_stream(
                        f"{destination}/{path.relative_to(source).as_posix()}") as f:
                    f.write(data if path.name.startswith("manifest_") else data[:len(data) // 2])
            self.marker.write_text(ray.get_runtime_context().get_node_id())
            while True:
                time.sleep(1)

        pyarrow.fs.copy_files = cut_short


class AwaitNotice:
    """Once `after` exists (a later attempt), rank `rank` writes its pid to `ready` before global step `step` (once)
    and waits until its SIGTERM handler has noted the notice (60 s at most), so the test's SIGTERM lands at a known
    step."""

    def __init__(self, step: int, rank: int, ready: Path, after: Path):
        self.step, self.rank, self.ready, self.after = step, rank, ready, after

    def __call__(self, engine, step: int, rank: int) -> None:
        from minconv_dist.train import preemption

        if step == self.step and rank == self.rank and self.after.exists() and not self.ready.exists():
            self.ready.write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while preemption._NOTICE.received_at is None and time.monotonic() < deadline:
                time.sleep(0.1)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Measured figures by test, written to <pytest tmp dir>/multinode_figures.json as they come."""
    path = tmp_path_factory.getbasetemp() / "multinode_figures.json"
    found: dict[str, dict] = {}

    def record(failure: str, **values) -> None:
        found[failure] = {**values, "load_average_1min": round(os.getloadavg()[0], 1)}  # the machine is shared
        path.write_text(json.dumps(found, indent=1))
        print(f"[figures] {failure}: {found[failure]}")

    return record


@pytest.fixture(scope="module")
def cluster(s3_options):
    """Head (0 CPUs) + 2 worker nodes on 127.0.0.1, in a temp dir of their own, stopped by PID. Set in this process
    for the module and restored after it: S3 on moto (run.storage_path=s3://..., here and on the nodes), and
    RAY_TMPDIR, so that Ray's address file is the cluster's own: a later `ray.init()` must never find this cluster.
    RAY_ADDRESS is never set here: only the nodes' raylets get it (`env_vars`: Ray Train's actors look the cluster
    up through it; several Rays run on this host), and the job's process."""
    temp = tempfile.mkdtemp(prefix="mcn", dir="/tmp")  # short: Ray's socket paths must stay < 108 characters
    os.mkdir(f"{temp}/ray")  # $RAY_TMPDIR/ray: where Ray writes the address file
    port = free_port()
    env = {"AWS_ENDPOINT_URL": s3_options["endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "RAY_TMPDIR": temp, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    saved = {key: os.environ.get(key) for key in env}
    nodes = Cluster(initialize_head=False)
    nodes.env_vars = {"RAY_ADDRESS": f"127.0.0.1:{port}"}  # for every raylet (`worker_nodes`)
    try:
        os.environ.update(env)
        nodes.add_node(num_cpus=0, gcs_server_port=port, temp_dir=temp, include_dashboard=False,
                       dashboard_port=free_port(), env_vars=nodes.env_vars)
        worker_nodes(nodes)
        ray.init(address=nodes.address)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        stop(processes_under(temp))  # any daemon the nodes' own shutdown missed
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)


def worker_nodes(cluster: Cluster, count: int = 2) -> None:
    """Add worker nodes until `count` are up (after a test removed one)."""
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=WORKER_CPUS, env_vars=cluster.env_vars)


def node_with_id(cluster: Cluster, node_id: str):
    return next(node for node in cluster.worker_nodes if node.node_id == node_id)


def wait_for(condition, what: str, timeout: float = 600, running=None) -> None:
    """Poll `condition()` until true; fail naming `what` after `timeout` s, or at once if `running` (a future or a
    Popen) has ended."""
    deadline = time.monotonic() + timeout
    while not condition():
        ended = running is not None and (running.done() if hasattr(running, "done") else running.poll() is not None)
        if ended or time.monotonic() > deadline:
            detail = running.exception() if hasattr(running, "exception") and ended else ""
            raise AssertionError(f"{what} did not happen{' (the run ended)' if ended else ''} {detail}")
        time.sleep(0.3)


def in_background(fn, *args, **kwargs) -> Future:
    """`fn(*args, **kwargs)` on a daemon thread: a run that a failed test leaves hanging never holds up the exit (the
    module's teardown takes its cluster down)."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the test as it is
            future.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return future


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("store") / "era5.zarr")
    write_synthetic_era5(path, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Storage every node sees: they all run on this host."""
    return tmp_path_factory.mktemp("multinode")


def still_running(pids: list[int], timeout: float = 60) -> list[int]:
    """Those of `pids` (Ray Train workers) that have not ended within `timeout` seconds."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return [proc.pid for proc in psutil.wait_procs(procs, timeout=timeout)[1]]


def only_run_finished(uri: str, run_id: str) -> None:
    client = mlflow.tracking.MlflowClient(uri)
    experiment = client.get_experiment_by_name("minconv_dist").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert client.get_run(run_id).info.status == "FINISHED"


def model_versions(uri: str, name: str) -> int:
    return len(mlflow.tracking.MlflowClient(uri).search_model_versions(f"name = '{name}'"))


def assert_same_weights(checkpoint: str, reference: str) -> None:
    """Bit-equal exported (EMA) weights, raw weights and each rank's EMA, at two checkpoint URLs (local or s3://)."""
    def load(ckpt: str, name: str, read=torch_load):
        with fsspec.open(f"{ckpt}/{name}", "rb") as f:
            return read(f) if read is load_model_file else read(f, name)

    check_weights(load(checkpoint, "model.pt", load_model_file), load(reference, "model.pt", load_model_file))
    for name, key in [("ds/mp_rank_00_model_states.pt", "module"), ("ema_rank0.pt", None), ("ema_rank1.pt", None)]:
        got, want = (load(c, name) for c in (checkpoint, reference))
        got, want = (got[key], want[key]) if key else (got, want)
        assert want and got.keys() == want.keys(), name
        assert all(torch.equal(got[k], v) for k, v in want.items()), name


@pytest.fixture(scope="module")
def reference(cluster, store, workdir, tmp_path_factory):
    """An uninterrupted run with the workers spread, its checkpoints in a local folder: the baseline every recovery
    must equal, bit for bit."""
    log = tmp_path_factory.mktemp("reference") / "starts"
    result = fit(tiny(store, workdir, "spread", "parallel.placement=spread"), callbacks=[RecordStarts(log)])
    return result, attempts(log)


def test_spread_puts_each_worker_on_its_own_node(cluster, reference):
    result, started = reference
    assert len(started) == 1  # one attempt
    (rank0, _, node0, *_), (rank1, _, node1, *_) = started[0]
    assert (rank0, rank1) == (0, 1) and node0 != node1
    assert {node0, node1} == {node.node_id for node in cluster.worker_nodes}  # the head (0 CPUs) has none
    assert latest(result.run_dir)[1]["global_step"] == STEPS and result.model_version == "1"


def test_a_node_lost_mid_epoch_and_mid_upload_and_a_preempted_worker_recover_exactly(
        cluster, store, workdir, reference, s3_bucket, tmp_path, figures):
    """Workers spread, checkpoints in an S3 bucket, one run, two failures.
    1. Mid-epoch, rank 1's upload of the step-4 checkpoint is cut short (its manifest whole, its other files half
       written) and its node is lost; rank 0, on the other node, is left waiting for it. `latest` skips the partial
       checkpoint, whatever the listing shows, and Ray restarts both workers on the node that is left, from the
       checkpoint of step 2.
    2. In that second attempt rank 1 gets SIGTERM (a spot node's preemption notice) before step 4, with
       checkpoint.preemption_grace_s=120: it trains on to the checkpoint of step 4, writes it with rank 0, leaves,
       and Ray restarts from it: no step lost.
    The run ends with the reference's weights, one registered version and its MLflow run FINISHED."""
    worker_nodes(cluster)
    log, cut, ready = tmp_path / "starts", tmp_path / "cut", tmp_path / "ready"
    cfg = tiny(store, workdir, "s3", f"run.storage_path=s3://{s3_bucket}/runs", "tracking.registered_model=tiny-s3",
               "parallel.placement=spread", "parallel.max_failures=2", "checkpoint.preemption_grace_s=120")
    run_dir = f"s3://{s3_bucket}/runs/s3"
    running = in_background(fit, cfg, callbacks=[RecordStarts(log), UploadCutShort(4, 1, cut),
                                                  AwaitNotice(4, 1, ready, after=cut)])
    wait_for(cut.exists, "rank 1's cut-short upload of step 4", running=running)
    skipped: list[str] = []

    def only_rank1_cut() -> bool:  # once rank 0's part is whole, only rank 1's cut shows
        skipped.clear()
        found = latest(run_dir, on_skip=skipped.append)
        return found is not None and found[1]["global_step"] == 2 and \
            any(re.search(r": \w+_rank1\.pt is", line) for line in skipped)

    wait_for(only_rank1_cut, "rank 0's upload of step 4", running=running)
    assert len(skipped) == 1 and re.fullmatch(r"skipped checkpoint_\S+: \w+_rank1\.pt is \d+ bytes, the "
                                              r"manifest says \d+", skipped[0]), skipped
    partial = skipped[0].split()[1].rstrip(":")
    lost_at = time.time()
    cluster.remove_node(node_with_id(cluster, cut.read_text()), allow_graceful=False)
    wait_for(ready.exists, "rank 1 before step 4 in the restarted run", running=running)
    noticed_at = time.time()
    os.kill(int(ready.read_text()), signal.SIGTERM)
    result = running.result(timeout=600)
    first, second, third = attempts(log)
    assert first[0][2] != first[1][2] == cut.read_text()  # spread; rank 1's node was lost
    assert [(r, s) for r, s, *_ in second] == [(0, 3), (1, 3)]
    assert second[0][2] == second[1][2] == first[0][2]  # both on the node that was left
    assert [(r, s) for r, s, *_ in third] == [(0, 5), (1, 5)] and int(ready.read_text()) == second[1][3]
    assert_same_weights(result.checkpoint, reference[0].checkpoint)
    assert losses(result) == losses(reference[0])
    skipped.clear()
    assert latest(run_dir, on_skip=skipped.append)[1]["global_step"] == STEPS
    assert any(re.match(rf"skipped {partial}: \w+_rank1\.pt is", line) for line in skipped), skipped
    assert model_versions(result.mlflow_uri, "tiny-s3") == 1
    assert not still_running([pid for attempt in (first, second, third) for *_, pid, _ in attempt])
    only_run_finished(result.mlflow_uri, result.mlflow_run_id)
    figures("worker node lost mid-epoch, during a checkpoint upload (S3)",
            recover_s=round(min(t for *_, t in second) - lost_at, 1), steps_lost=2, restarted_at_step=3)
    figures("worker preempted (SIGTERM), checkpoint due within checkpoint.preemption_grace_s",
            recover_s=round(min(t for *_, t in third) - noticed_at, 1), steps_lost=0, restarted_at_step=5)


def test_losing_the_head_ends_the_job_with_the_resume_command_which_continues_exactly(
        cluster, store, workdir, reference, tmp_path, figures):
    """jobs/train_era5.py in a process of its own, attached to the cluster (RAY_ADDRESS), workers packed (the
    default); both ranks hold before step 6 (epoch 1, step 3 of 3) and the head is lost. The job ends within Ray's
    minute, in one line naming the last good checkpoint and the exact --resume command, exit code 1. That command,
    on a fresh one-node Ray, continues the run to the reference's weights, in the same MLflow run, with one
    registered version. Last in the module: it takes the cluster down."""
    worker_nodes(cluster)
    ray.shutdown()  # this process's own connection must not outlive the head
    marker, config = tmp_path / "held", tmp_path / "job.yaml"
    cfg = tiny(store, workdir, "head-lost", "tracking.registered_model=tiny-head")
    config.write_text(yaml.safe_dump(cfg.to_dict()))  # the reference's plan, as a job's --config
    started = time.monotonic()
    job = subprocess.Popen([sys.executable, "tests/held_job.py", "6", str(marker), "--config", str(config)], cwd=ROOT,
                           env=dict(os.environ, RAY_ADDRESS=cluster.address), text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        wait_for(lambda: line_count(marker) == 2, "both ranks before step 6", running=job)
        held_s = time.monotonic() - started
        head_lost_at = time.monotonic()
        cluster.remove_node(cluster.head_node, allow_graceful=False)
        out, err = job.communicate(timeout=120)
        ended = time.monotonic() - head_lost_at
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
        for node in list(cluster.worker_nodes):  # their raylets would wait a minute for the head, then abort
            cluster.remove_node(node, allow_graceful=False)
    (held,) = attempts(marker)
    assert held[0][2] == held[1][2]  # packed: both ranks on one node
    run = workdir / "runs" / "head-lost"
    lines = err.strip().splitlines()
    assert job.returncode == 1 and lines, err[-3000:]
    assert re.fullmatch(
        rf"error: run head-lost stopped: lost the Ray head at 127\.0\.0\.1:\d+ \(no answer for \d+ s: .*\); MLflow run "
        rf"\w+ ended as FAILED; last good checkpoint: {run}/checkpoint_\S+ \(step 4\); on a new cluster, continue "
        rf"with: python jobs/train_era5\.py --resume {run}", lines[-1]), lines[-1]
    assert ended < 60, f"the job took {ended:.0f} s to end: Ray's own client would have aborted it"
    command = lines[-1].rsplit("continue with: ", 1)[1].split()
    ray_tmp = tempfile.mkdtemp(prefix="mch", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": ray_tmp}
    start = time.monotonic()
    try:
        resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=600)
    finally:
        stop(processes_under(ray_tmp))  # the job's own Ray stops with it; this is in case it did not
        shutil.rmtree(ray_tmp, ignore_errors=True)
    resume_s = time.monotonic() - start
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[minconv] resumed at epoch 1 step 4" in resumed.stdout, resumed.stdout[-3000:]
    final = latest(str(run))
    assert final[1]["global_step"] == STEPS
    assert_same_weights(final[0], reference[0].checkpoint)
    uri = reference[0].mlflow_uri
    client = mlflow.tracking.MlflowClient(uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("minconv_dist").experiment_id],
                                       "attributes.run_name = 'head-lost'")
    assert mlflow_run.info.run_id == final[1]["mlflow_run_id"]
    only_run_finished(uri, mlflow_run.info.run_id)
    assert model_versions(uri, "tiny-head") == 1
    figures("head lost", job_to_hold_s=round(held_s, 1), job_ended_s=round(ended, 1), resume_s=round(resume_s, 1),
            steps_lost=1, restarted_at_step=5)
