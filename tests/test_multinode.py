"""Training on a Ray cluster of several nodes on this host (issue 26): a head without CPUs (the driver and Ray
Train's controller run there) and two worker nodes of 2 CPUs, each a raylet of its own on 127.0.0.1
(`ray.cluster_utils.Cluster`). Workers packed or spread, checkpoints on storage every node sees (a local folder,
S3 on moto), a worker node lost mid-epoch or while a rank uploads a checkpoint, a worker preempted (SIGTERM),
the head lost. One cluster for the module, its processes stopped by PID (`Cluster.remove_node`); the figures
each test measures (time to recover, steps lost) go to `<pytest tmp dir>/multinode_figures.json` for
docs/cluster.md.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle
import fsspec
import mlflow
import psutil
import pytest
import ray
from ray.cluster_utils import Cluster

from minconv_dist.data import write_synthetic_era5
from minconv_dist.models import check_weights, load_model_file
from minconv_dist.train import fit
from minconv_dist.train.checkpoint import latest
from minconv_dist.train.local_ray import free_port
from tests.test_train_ray import STEPS, losses, model_of, tiny

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
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


def starts(log: Path) -> list[tuple[int, int, str, int, float]]:
    """RecordStarts' lines in attempt order: (rank, first step, node id, pid, time)."""
    rows = [line.split() for line in log.read_text().splitlines()]
    return sorted(((int(r), int(s), n, int(p), float(t)) for r, s, n, p, t in rows), key=lambda row: row[4])


class HoldBefore:
    """Rank `rank` writes its node id and pid to `marker` before global step `step` and waits there for good, once
    (a second attempt passes)."""

    def __init__(self, step: int, rank: int, marker: Path):
        self.step, self.rank, self.marker = step, rank, marker

    def __call__(self, engine, step: int, rank: int) -> None:
        if step == self.step and rank == self.rank and not self.marker.exists():
            self.marker.write_text(f"{ray.get_runtime_context().get_node_id()} {os.getpid()}")
            while True:
                time.sleep(1)


class UploadCutShort:
    """From global step `step` on, rank `rank` uploads its part of a checkpoint as a node lost mid-upload leaves it:
    its manifest whole, every other file half written; then writes its node id to `marker` and waits for good.
    Ray uploads with pyarrow."""

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
    """Rank `rank` writes its pid to `ready` before global step `step` (once) and waits until its SIGTERM handler
    has noted the notice (60 s at most), so that the test's SIGTERM lands at a known step."""

    def __init__(self, step: int, rank: int, ready: Path):
        self.step, self.rank, self.ready = step, rank, ready

    def __call__(self, engine, step: int, rank: int) -> None:
        from minconv_dist.train import preemption

        if step == self.step and rank == self.rank and not self.ready.exists():
            self.ready.write_text(str(os.getpid()))
            deadline = time.monotonic() + 60
            while preemption._NOTICE.received_at is None and time.monotonic() < deadline:
                time.sleep(0.1)


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    """Measured figures by test, written to <pytest tmp dir>/multinode_figures.json as they come."""
    path = tmp_path_factory.getbasetemp() / "multinode_figures.json"
    found: dict[str, dict] = {}

    def record(test: str, **values) -> None:
        found[test] = values
        path.write_text(json.dumps(found, indent=1))
        print(f"[figures] {test}: {values}")

    return record


@pytest.fixture(scope="module")
def cluster(s3_options, tmp_path_factory):
    """Head (0 CPUs) + 2 worker nodes on 127.0.0.1, in a temp dir of their own. The environment the nodes inherit:
    S3 on moto for run.storage_path=s3://..., RAY_ADDRESS for the Ray Train actors that look the cluster up (several
    Rays may run on this host), RAY_TMPDIR so that Ray's address file is the cluster's own."""
    temp = tempfile.mkdtemp(prefix="mcn", dir="/tmp")  # short: Ray's socket paths must stay < 108 characters
    os.mkdir(f"{temp}/ray")  # $RAY_TMPDIR/ray: where Ray writes the address file
    port = free_port()
    env = {"AWS_ENDPOINT_URL": s3_options["endpoint_url"], "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_TMPDIR": temp, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "gcs_server_port": port, "temp_dir": temp,
                                                          "include_dashboard": False, "dashboard_port": free_port()})
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=WORKER_CPUS)
        ray.init(address=nodes.address)
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)


def worker_nodes(cluster: Cluster, count: int = 2) -> None:
    """Add worker nodes until `count` are up (after a test removed one)."""
    while len(cluster.worker_nodes) < count:
        cluster.add_node(num_cpus=WORKER_CPUS)


def node_with_id(cluster: Cluster, node_id: str):
    return next(node for node in cluster.worker_nodes if node.node_id == node_id)


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


def no_run_left_running(result) -> None:
    client = mlflow.tracking.MlflowClient(result.mlflow_uri)
    experiment = client.get_experiment_by_name("minconv_dist").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"


def model_versions(result, name: str) -> int:
    return len(mlflow.tracking.MlflowClient(result.mlflow_uri).search_model_versions(f"name = '{name}'"))


@pytest.fixture(scope="module")
def reference(cluster, store, workdir, tmp_path_factory):
    """An uninterrupted run with the workers spread: the baseline every recovery must equal, bit for bit."""
    log = tmp_path_factory.mktemp("reference") / "starts"
    result = fit(tiny(store, workdir, "spread", "parallel.placement=spread"), callbacks=[RecordStarts(log)])
    return result, starts(log)


def test_spread_puts_each_worker_on_its_own_node(cluster, reference):
    result, started = reference
    nodes = {rank: node for rank, _, node, _, _ in started}
    assert len(started) == 2 and sorted(nodes) == [0, 1]  # one attempt
    assert nodes[0] != nodes[1] and cluster.head_node.node_id not in nodes.values()
    assert {nodes[0], nodes[1]} == {node.node_id for node in cluster.worker_nodes}
    assert latest(result.run_dir)[1]["global_step"] == STEPS and result.model_version == "1"


def test_packed_workers_checkpoint_to_s3_and_a_node_lost_mid_upload_is_never_latest(
        cluster, store, workdir, reference, s3_bucket, tmp_path, figures):
    """Both workers on one node (pack), checkpoints in an S3 bucket. Rank 1's upload of the step-4 checkpoint is cut
    short (its manifest whole, its other files half written) and its node is lost: the partial checkpoint is skipped
    by `latest`, whatever the listing shows, and Ray restarts the run from step 2 on the other node, which ends with
    the reference's weights."""
    worker_nodes(cluster)
    log, marker = tmp_path / "starts", tmp_path / "cut"
    cfg = tiny(store, workdir, "s3", f"run.storage_path=s3://{s3_bucket}/runs", "tracking.registered_model=tiny-s3")
    run_dir = f"s3://{s3_bucket}/runs/s3"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(fit, cfg, callbacks=[RecordStarts(log), UploadCutShort(4, 1, marker)])
        deadline = time.monotonic() + 600
        while not marker.exists() and not running.done() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), running.exception() if running.done() else "rank 1 never uploaded step 4"
        skipped: list[str] = []
        while time.monotonic() < deadline:  # until rank 0's part is whole: then only rank 1's cut shows
            skipped.clear()
            found = latest(run_dir, on_skip=skipped.append)
            if any("rng_rank1.pt is" in line for line in skipped):
                break
            time.sleep(1)
        assert found[1]["global_step"] == 2, skipped
        assert len(skipped) == 1 and re.fullmatch(r"skipped checkpoint_\S+: rng_rank1.pt is \d+ bytes, the manifest "
                                                  r"says \d+", skipped[0]), skipped
        partial = skipped[0].split()[1].rstrip(":")
        killed = time.time()
        cluster.remove_node(node_with_id(cluster, marker.read_text()), allow_graceful=False)
        result = running.result(timeout=600)
    first, second = starts(log)[:2], starts(log)[2:]
    assert first[0][2] == first[1][2] == marker.read_text()  # packed on the node that was lost
    assert [(r, s) for r, s, *_ in sorted(second)] == [(0, 3), (1, 3)] and second[0][2] == second[1][2] != first[0][2]
    with fsspec.open(f"{result.checkpoint}/model.pt", "rb") as f:
        check_weights(load_model_file(f), model_of(reference[0]))  # bit-equal
    skipped.clear()
    assert latest(run_dir, on_skip=skipped.append)[1]["global_step"] == STEPS
    assert any(line.startswith(f"skipped {partial}: rng_rank1.pt is") for line in skipped), skipped
    assert model_versions(result, "tiny-s3") == 1
    assert not still_running([pid for *_, pid, _ in starts(log)])  # every attempt's workers ended
    no_run_left_running(result)
    figures("node lost during a checkpoint upload (S3)", recover_s=round(min(t for *_, t in second) - killed, 1),
            steps_lost=4 - 2, restarted_at_step=3)
    worker_nodes(cluster)


def test_a_node_lost_mid_epoch_restarts_from_the_last_checkpoint_exactly(cluster, store, workdir, reference, tmp_path,
                                                                         figures):
    """Workers spread; rank 1's node is lost before step 6 (epoch 1, step 2 of 3). Ray restarts both workers on the
    node that is left, from the checkpoint of step 4, and the run ends with the reference's weights and losses,
    one registered version and its MLflow run FINISHED."""
    worker_nodes(cluster)
    log, marker = tmp_path / "starts", tmp_path / "held"
    cfg = tiny(store, workdir, "node-lost", "parallel.placement=spread", "tracking.registered_model=tiny-lost")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(fit, cfg, callbacks=[RecordStarts(log), HoldBefore(6, 1, marker)])
        deadline = time.monotonic() + 600
        while not marker.exists() and not running.done() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), running.exception() if running.done() else "rank 1 never reached step 6"
        node_id, _ = marker.read_text().split()
        killed = time.time()
        cluster.remove_node(node_with_id(cluster, node_id), allow_graceful=False)
        result = running.result(timeout=600)
    first, second = starts(log)[:2], starts(log)[2:]
    assert first[0][2] != first[1][2] and node_id in (first[0][2], first[1][2])  # spread, one of them lost
    assert [(r, s) for r, s, *_ in sorted(second)] == [(0, 5), (1, 5)]  # from step 4: mid-epoch
    assert second[0][2] == second[1][2] != node_id  # both on the node that is left
    assert losses(result) == losses(reference[0])
    check_weights(model_of(result), model_of(reference[0]))  # bit-equal
    assert model_versions(result, "tiny-lost") == 1
    assert not still_running([pid for *_, pid, _ in starts(log)])  # every attempt's workers ended
    no_run_left_running(result)
    figures("worker node lost mid-epoch", recover_s=round(min(t for *_, t in second) - killed, 1),
            steps_lost=5 - 4, restarted_at_step=5)
    worker_nodes(cluster)


@pytest.mark.parametrize("grace_s, restart_step, steps_lost", [(120, 5, 0), (0, 3, 1)],
                         ids=["checkpoint-due", "no-grace"])
def test_a_preempted_worker_saves_the_due_checkpoint_or_the_run_relies_on_the_last(
        grace_s, restart_step, steps_lost, cluster, store, workdir, reference, tmp_path, figures):
    """SIGTERM (a spot node's preemption notice) to rank 1's process before step 4, on the node it has to itself
    (spread). With a grace period the checkpoint of step 4 fits in: the worker trains on to it, writes it with rank
    0, and leaves; Ray restarts from it and no step is lost. Without one (grace 0: Ray's own handler) it ends at
    once and the run restarts from step 2: step 3 is lost. Either way the run ends with the reference's weights."""
    worker_nodes(cluster)
    log, ready = tmp_path / "starts", tmp_path / "ready"
    cfg = tiny(store, workdir, f"preempted-{grace_s}", "parallel.placement=spread",
               f"checkpoint.preemption_grace_s={grace_s}", f"tracking.registered_model=tiny-preempted-{grace_s}")
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(fit, cfg, callbacks=[RecordStarts(log), AwaitNotice(4, 1, ready)])
        deadline = time.monotonic() + 600
        while not ready.exists() and not running.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), running.exception() if running.done() else "rank 1 never reached step 4"
        noticed = time.time()
        os.kill(int(ready.read_text()), signal.SIGTERM)
        result = running.result(timeout=600)
    first, second = starts(log)[:2], starts(log)[2:]
    assert first[0][2] != first[1][2]
    assert [(r, s) for r, s, *_ in sorted(second)] == [(0, restart_step), (1, restart_step)]
    check_weights(model_of(result), model_of(reference[0]))  # bit-equal
    assert not still_running([pid for *_, pid, _ in starts(log)])  # every attempt's workers ended
    no_run_left_running(result)
    figures(f"worker preempted (SIGTERM), checkpoint.preemption_grace_s={grace_s}",
            recover_s=round(min(t for *_, t in second) - noticed, 1), steps_lost=steps_lost,
            restarted_at_step=restart_step)


def test_losing_the_head_ends_the_job_with_the_resume_command_which_continues_exactly(
        cluster, store, workdir, reference, tmp_path, figures):
    """The job (jobs/train_era5.py, in a process of its own attached to the cluster) holds before step 5; the head's
    processes are killed. The job ends within Ray's minute, in one line naming the last good checkpoint and the
    exact --resume command, exit code 1; that command, on a fresh one-node Ray, continues the run to the
    reference's weights, in the same MLflow run. Last in the module: it takes the cluster down."""
    ray.shutdown()  # this process's own connection must not outlive the head
    marker = tmp_path / "held"
    settings = [f"data.url={store}", "data.train_range=[2015-01-01, 2015-01-31]",
                "data.val_range=[2015-02-01, 2015-02-28]", "data.coarsen=2", "data.sequence_length=6",
                "data.teacher_steps=4", "data.stride=6", "data.batch_size=2", "model.hidden_size=4", "model.layers=2",
                "optim.epochs=2", f"optim.steps_per_epoch={STEPS // 2}", "optim.lr=5e-3", "optim.warmup_steps=1",
                "checkpoint.val_every=2", "checkpoint.val_batches=1", "tracking.log_every=1",
                f"tracking.uri=sqlite:///{workdir}/mlflow.db", "tracking.registered_model=tiny-head",
                "run.name=head-lost", f"run.storage_path={workdir}/runs", "parallel.max_failures=1",
                "parallel.placement=spread"]
    job = subprocess.Popen([sys.executable, "tests/held_job.py", "5", str(marker),
                            *(arg for s in settings for arg in ("--set", s))], cwd=ROOT, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert marker.exists(), job.communicate(timeout=60)[1][-3000:] if job.poll() is not None else "no step 5"
        killed = time.monotonic()
        cluster.remove_node(cluster.head_node, allow_graceful=False)
        out, err = job.communicate(timeout=120)
        ended = time.monotonic() - killed
    finally:
        if job.poll() is None:
            job.kill()
        for node in list(cluster.worker_nodes):  # their raylets would wait a minute for the head, then abort
            cluster.remove_node(node, allow_graceful=False)
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
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[minconv] resumed at epoch 1 step 4" in resumed.stdout, resumed.stdout[-3000:]
    final = latest(str(run))
    assert final[1]["global_step"] == STEPS
    check_weights(load_model_file(f"{final[0]}/model.pt"), model_of(reference[0]))  # bit-equal
    client = mlflow.tracking.MlflowClient(reference[0].mlflow_uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("minconv_dist").experiment_id],
                                       "attributes.run_name = 'head-lost'")
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_id == final[1]["mlflow_run_id"]
    assert len(client.search_model_versions("name = 'tiny-head'")) == 1
    figures("head lost", job_ended_s=round(ended, 1), resume_s=round(time.monotonic() - start, 1), steps_lost=0)
