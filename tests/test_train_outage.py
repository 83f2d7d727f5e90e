"""Tracking never stops training (issue 22, finding 3): a real `mlflow server` on 127.0.0.1 (a free port, its own
process group, stopped by its PID) is killed while a tiny run trains, (a) and started again while the run still
trains, (b) and not before the run has ended, then the documented `python -m minconv_dist.train.sync` brings the
MLflow run up to date. Either way: training reaches its planned step at its pace, every metric step is on the
server exactly once, the run ends FINISHED and the model is registered. One local Ray session for the module.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import cloudpickle
import mlflow
import pytest
import ray

from minconv_dist.data import write_synthetic_era5
from minconv_dist.train import ConfigError, fit, load_config
from minconv_dist.train.checkpoint import latest
from minconv_dist.train.local_ray import free_port
from minconv_dist.train.spool import Spool, load_target, spool_dir
from minconv_dist.train.tracking import STEP_TAG

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # 2 epochs of 6; a validation (checkpoint, plot) every 4 steps
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callbacks below reach the Ray workers


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store and proxied artifacts under `root`; `kill` and `start`
    again on the same port and store, as a restarted server would."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = root, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{self.root}/mlflow.db", "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=open(self.root / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return
            except OSError:
                assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server on {self.url} not ready in 300 s")

    def kill(self) -> None:
        """SIGKILL to its own process group (the server and its uvicorn worker), as a crash would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


class AtStep:
    """On rank 0, before global step `step`: touch `touch` (the test then kills the server), or wait, bounded,
    until `ready()` holds (so that the run is still training when the test has done its part)."""

    def __init__(self, step: int, touch: Path | None = None, ready=None):
        self.step, self.touch, self.ready = step, touch, ready

    def __call__(self, engine, step: int, rank: int) -> None:
        if rank != 0 or step != self.step:
            return
        if self.touch is not None:
            self.touch.touch()
        deadline = time.monotonic() + 600
        while self.ready is not None and not self.ready() and time.monotonic() < deadline:
            time.sleep(0.2)


class FileExists:
    def __init__(self, path: Path):
        self.path = path

    def __call__(self) -> bool:
        return self.path.exists()


class SpoolSent:
    """Rank 0 spooled something (it noticed the outage) and its spool holds nothing the server lacks."""

    def __init__(self, run_dir: str):
        self.directory = spool_dir(run_dir)

    def __call__(self) -> bool:
        target = load_target(self.directory)
        return bool(target) and not Spool(self.directory, target["uri"], target["run_id"]).pending()


@pytest.fixture(scope="module")
def ray_session():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)  # not another user's Ray
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("store") / "era5.zarr")
    write_synthetic_era5(path, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    return path


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path)
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def tiny(store: str, uri: str, runs: Path, name: str, *overrides: str):
    return load_config(overrides=[
        f"data.url={store}", "data.train_range=[2015-01-01, 2015-01-31]", "data.val_range=[2015-02-01, 2015-02-28]",
        "data.coarsen=2", "data.sequence_length=6", "data.teacher_steps=4", "data.stride=6", "data.batch_size=2",
        "model.hidden_size=4", "model.layers=1", "optim.epochs=2", f"optim.steps_per_epoch={STEPS // 2}",
        "checkpoint.val_every=4", "checkpoint.val_batches=1", "tracking.log_every=1", f"tracking.uri={uri}",
        "tracking.registered_model=tiny-outage", "tracking.timeout_s=5", "tracking.retry_every_s=1",
        "tracking.wait_s=3", f"run.name={name}", f"run.storage_path={runs}", *overrides,
    ])


def kill_on(signal_file: Path, server: MlflowServer, then=None) -> threading.Thread:
    """A thread that kills the server once `signal_file` exists, then calls `then()`."""
    def chaos():
        while not signal_file.exists():
            time.sleep(0.1)
        server.kill()
        if then is not None:
            then()

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    return thread


def assert_every_step_once(client, run_id: str) -> dict[str, list[int]]:
    run = client.get_run(run_id)
    steps = {key: sorted(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
    for key, got in steps.items():
        assert len(got) == len(set(got)), f"{key}: a step logged twice: {got}"
    assert steps["train_loss"] == list(range(1, STEPS + 1)), steps["train_loss"]
    assert steps["val_loss"] == [4, 8, 12] and steps["epoch_train_loss"] == [6, 12], steps
    assert len(client.list_artifacts(run_id, "plots")) == 3
    return steps


def assert_not_slowed(times: dict[int, float], during: list[int], outside: list[int], timeout_s: float = 5.0) -> None:
    """A step while the server was down (median) is slower than one outside the outage (median, the same run
    under the same load) by less than a tenth of `timeout_s`. The guarded cost: a loop that logged in line with
    training would wait at least one request timeout (tracking.timeout_s, 5 s here) per logging step (every
    step here), MLflow's own retries minutes; spooling costs a local write on another thread, which on a
    tiny model's ~20 ms step under a loaded CPU shows as a few ms (the thread holds the GIL meanwhile)."""
    slow, usual = statistics.median(times[s] for s in during), statistics.median(times[s] for s in outside)
    assert slow - usual < timeout_s / 10, f"steps took {slow:.3f} s during the outage, {usual:.3f} s outside it"


def step_times(client, run_id: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, "time_per_step_s")}


def test_server_killed_and_back_while_training(store, ray_session, server, tmp_path, capsys):
    killed, back = tmp_path / "killed", tmp_path / "back"
    kill_on(killed, server, then=lambda: (server.start(), back.touch()))
    runs = tmp_path / "runs"
    # the kill before step 3; step 9 waits for the restarted server; the last step for the spool to be sent
    callbacks = [AtStep(3, touch=killed), AtStep(9, ready=FileExists(back)),
                 AtStep(STEPS, ready=SpoolSent(str(runs / "a")))]
    result = fit(tiny(store, server.url, runs, "a"), callbacks=callbacks)
    assert latest(result.run_dir)[1]["global_step"] == STEPS
    assert result.unsynced is None and not (spool_dir(result.run_dir) / "sync.json").exists()
    client = mlflow.tracking.MlflowClient(server.url)
    assert_every_step_once(client, result.mlflow_run_id)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    versions = client.search_model_versions(f"name = 'tiny-outage' and run_id = '{result.mlflow_run_id}'")
    assert [(v.version, v.tags[STEP_TAG]) for v in versions] == [("1", str(STEPS))]
    # outside: neither step 1 (warm-up) nor the steps whose time holds a callback's wait (9, 12)
    assert_not_slowed(step_times(client, result.mlflow_run_id), during=[5, 6, 7, 8], outside=[2, 10, 11])
    out = capsys.readouterr().out
    assert out.count("[minconv] warning: MLflow at") == 1, out[-5000:]


def test_server_killed_and_back_only_after_the_run_then_synced(store, ray_session, server, tmp_path, capsys):
    killed = tmp_path / "killed"
    kill_on(killed, server)
    result = fit(tiny(store, server.url, tmp_path / "runs", "b"), callbacks=[AtStep(7, touch=killed)])
    assert latest(result.run_dir)[1]["global_step"] == STEPS  # training went on to its planned end
    assert result.model_version is None and "its registration as tiny-outage" in result.unsynced
    out = capsys.readouterr().out
    assert out.count("[minconv] warning: MLflow at") == 1, out[-5000:]
    assert f"when it answers: python -m minconv_dist.train.sync {result.run_dir}" in out, out[-3000:]

    server.start()
    sync = subprocess.run([sys.executable, "-m", "minconv_dist.train.sync", result.run_dir], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert sync.returncode == 0, sync.stdout[-2000:] + sync.stderr[-3000:]
    assert "status FINISHED; model tiny-outage version 1" in sync.stdout
    client = mlflow.tracking.MlflowClient(server.url)
    assert_every_step_once(client, result.mlflow_run_id)
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"
    versions = client.search_model_versions(f"name = 'tiny-outage' and run_id = '{result.mlflow_run_id}'")
    assert [(v.version, v.tags[STEP_TAG]) for v in versions] == [("1", str(STEPS))]
    assert_not_slowed(step_times(client, result.mlflow_run_id), during=[9, 10, 11, 12], outside=[2, 3, 5, 6])
    again = subprocess.run([sys.executable, "-m", "minconv_dist.train.sync", result.run_dir], cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "nothing to sync" in again.stdout, again.stderr  # nothing is sent twice


def test_a_new_run_needs_the_server_once(store, ray_session, tmp_path):
    """Nothing to keep yet: a new run is refused in one line, before any worker starts."""
    cfg = tiny(store, f"http://127.0.0.1:{free_port()}", tmp_path / "runs", "nobody", "tracking.wait_s=0")
    with pytest.raises(ConfigError, match=r"tracking.uri: MLflow at http://127.0.0.1:\d+ did not answer for "
                                          r"tracking.wait_s=0 s \(.*Connection refused\)") as info:
        fit(cfg)
    assert "\n" not in str(info.value)
