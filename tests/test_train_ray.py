"""Training under Ray Train + DeepSpeed on 2 CPU workers (gloo): ZeRO stages, fault tolerance, resume,
NaN handling, MLflow and the errors raised before any worker starts. One local Ray session for the module.
The tiny runs train the area-weighted loss (their grid has latitudes) and keep an EMA of the weights, so every
check of exactness covers both.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cloudpickle

import mlflow
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from minconv_dist.data import NormStats, compute_stats, generate_navier_stokes, open_store, write_synthetic_era5
from minconv_dist.data.store import COMPLETE_ATTR, set_attrs
from minconv_dist.evaluate import load_model
from minconv_dist.models import check_weights, load_model_file
from minconv_dist.train import ConfigError, fit, load_config
from minconv_dist.train.checkpoint import latest
from minconv_dist.train.meter import NonFiniteLossError
from minconv_dist.train.safe_files import torch_load
from minconv_dist.train.resume import RunFinished, resume_config
from minconv_dist.train.trainer import TrainingError
from tests.checkpoint_damage import plant, truncate

pytestmark = pytest.mark.timeout(600)

STEPS = 6
ROOT = Path(__file__).resolve().parents[1]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callbacks below reach the Ray workers


class KillLastWorker:
    """Ends the last rank's process just before global step `step`, once (a marker file remembers)."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def __call__(self, engine, step: int, rank: int) -> None:
        if step == self.step and rank == engine.world_size - 1 and not self.marker.exists():
            self.marker.touch()
            os._exit(1)


class DivergeWeights:
    """Sets a weight to NaN just before global step `step`, as a diverged update would; notes each time."""

    def __init__(self, step: int, notes: Path):
        self.step, self.notes = step, notes

    def __call__(self, engine, step: int, rank: int) -> None:
        if step == self.step:
            with self.notes.open("a") as f:
                f.write(f"rank {rank}\n")
            with torch.no_grad():
                next(engine.module.parameters()).fill_(float("nan"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("store") / "era5.zarr")
    write_synthetic_era5(path, start="2015-01-01", end="2015-03-01", nlat=16, nlon=32)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


def tiny(store: str, workdir: Path, name: str, *overrides: str):
    return load_config(overrides=[
        f"data.url={store}", "data.channels=[z]", "data.train_range=[2015-01-01, 2015-01-31]",
        "data.val_range=[2015-02-01, 2015-02-28]", "data.coarsen=2", "data.sequence_length=6", "data.teacher_steps=4",
        "data.stride=6", "data.batch_size=2",
        "model.hidden_size=4", "model.layers=2", "optim.epochs=2", f"optim.steps_per_epoch={STEPS // 2}", "optim.lr=5e-3",
        "optim.warmup_steps=1", "checkpoint.val_every=2", "checkpoint.val_batches=1", "tracking.log_every=1",
        f"tracking.uri=sqlite:///{workdir}/mlflow.db", "tracking.registered_model=tiny", f"run.name={name}",
        f"run.storage_path={workdir}/runs", "parallel.max_failures=1", "optim.ema_decay=0.5", *overrides,
    ])


def by_step(result, key: str = "train_loss") -> dict[int, float]:
    history = mlflow.tracking.MlflowClient(result.mlflow_uri).get_metric_history(result.mlflow_run_id, key)
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), "a step logged twice (a restarted worker must not log its replay again)"
    return {m.step: m.value for m in sorted(history, key=lambda m: m.step)}


def losses(result) -> list[float]:
    return list(by_step(result).values())


def model_of(result) -> torch.nn.Module:
    """The network of a run's last checkpoint (its model file): the EMA of the weights in the tiny runs."""
    return load_model_file(f"{result.checkpoint}/model.pt")


def raw_weights(result) -> dict[str, torch.Tensor]:
    """The weights training goes on with: DeepSpeed's module state (fp32 on CPU: the masters themselves)."""
    return torch_load(f"{result.checkpoint}/ds/mp_rank_00_model_states.pt", "module states")["module"]


def assert_same_weights(result, reference) -> None:
    """Bit-equal exported (EMA) and raw weights, and each rank's saved EMA."""
    check_weights(model_of(result), model_of(reference))  # bit-equal
    for key, value in raw_weights(reference).items():
        assert torch.equal(raw_weights(result)[key], value), f"raw {key}"
    for rank in range(2):
        ema, expected = (torch_load(f"{r.checkpoint}/ema_rank{rank}.pt", "ema") for r in (result, reference))
        assert expected and all(torch.equal(ema[key], value) for key, value in expected.items()), rank


@pytest.fixture(scope="module")
def reference(store, workdir, ray_session):
    """An uninterrupted ZeRO-0 run: the baseline for ZeRO-3, fault tolerance and resume."""
    return fit(tiny(store, workdir, "zero0"))


@pytest.fixture(scope="module")
def zero2(store, workdir, ray_session):
    """An uninterrupted ZeRO-2 run (its EMA sharded over the ranks): the baseline for its resume."""
    return fit(tiny(store, workdir, "zero2", "parallel.zero_stage=2"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_decreases_loss(stage, store, workdir, reference, request):
    result = (request.getfixturevalue("zero2") if stage == 2 else
              fit(tiny(store, workdir, f"zero{stage}", f"parallel.zero_stage={stage}")))
    got = losses(result)
    assert len(got) == STEPS and got[-1] < got[0]
    if stage == 3:  # ZeRO-3 partitions parameters but must compute the same thing as ZeRO-0
        torch.testing.assert_close(torch.tensor(got), torch.tensor(losses(reference)), rtol=1e-4, atol=1e-6)
        # its reduce-scatter sums gradients in another order: fp32 rounding, which AdamW's division by |g|
        # can lift to ~1e-5 of a weight where a gradient nearly cancels; buffers are copied, so exact
        check_weights(model_of(result), model_of(reference), rel_tol=1e-4)


@pytest.mark.slow
def test_worker_killed_mid_epoch_recovers_exactly(store, workdir, reference, tmp_path):
    marker = tmp_path / "killed"
    result = fit(tiny(store, workdir, "killed"), callbacks=[KillLastWorker(3, marker)])
    assert marker.exists(), "the hook did not kill a worker"
    assert losses(result)[-1] == losses(reference)[-1]
    assert_same_weights(result, reference)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three runs (the baseline's included) on a busy machine
@pytest.mark.parametrize("stage", [0, 2])
def test_resume_continues_a_stopped_run_exactly(stage, store, workdir, request):
    """Stopped after 3 of 6 steps, then --resume: the losses, the raw weights and their EMA (validation's loss,
    model.pt, each rank's part) are those of the uninterrupted run, at ZeRO-0 (EMA whole on each rank) and ZeRO-2
    (EMA sharded)."""
    whole = request.getfixturevalue("reference" if stage == 0 else "zero2")
    name, zero = f"stopped{stage}", f"parallel.zero_stage={stage}"
    first = fit(tiny(store, workdir, name, zero, "run.stop_after_steps=3"))
    assert latest(first.run_dir)[1]["global_step"] == 3
    client = mlflow.tracking.MlflowClient(first.mlflow_uri)
    versions = lambda: client.search_model_versions(f"run_id = '{first.mlflow_run_id}'")  # noqa: E731
    assert client.get_run(first.mlflow_run_id).info.status == "KILLED"  # stopped, not finished
    assert first.model_version is None and not versions()
    resumed = fit(tiny(store, workdir, "ignored", zero), resume=name)
    assert resumed.run_dir == first.run_dir and resumed.mlflow_run_id == first.mlflow_run_id
    assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"
    assert [str(v.version) for v in versions()] == [resumed.model_version]  # the only version of the run
    assert latest(resumed.run_dir)[1]["global_step"] == STEPS
    assert losses(resumed) == losses(whole)
    validated = by_step(whole, "val_loss")  # the stopped run also validated where it stopped
    assert {step: v for step, v in by_step(resumed, "val_loss").items() if step in validated} == validated
    assert_same_weights(resumed, whole)
    exported = model_of(whole).state_dict()
    assert any(not torch.equal(exported[k], v) for k, v in raw_weights(whole).items())  # model.pt: the EMA
    with pytest.raises(ConfigError, match=f"run '{name}' already exists in .*; continue it with --resume {name}"):
        fit(tiny(store, workdir, name, zero))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three runs on a busy machine
def test_an_ensemble_run_with_input_noise_resumes_exactly(store, workdir, ray_session):
    """loss.kind=crps, 3 members from input noise, stopped after 3 of 6 steps (an extra validation there), then
    --resume: the losses and raw weights are the uninterrupted run's. Before the loaders had generators of their
    own, that validation's iterator drew from the noise's stream and step 4 differed (0.516377 vs 0.516447)."""
    crps = ["loss.kind=crps", "loss.members=3", "data.input_noise=0.05"]
    whole = fit(tiny(store, workdir, "crps-whole", *crps))
    client = mlflow.tracking.MlflowClient(whole.mlflow_uri)
    tag = client.get_run(whole.mlflow_run_id).data.tags["minconv.loss"]
    assert tag.startswith("almost-fair CRPS (AFCRPS) of 3 members (input noise 0.05), alpha 0.95: area (cell-area")
    fit(tiny(store, workdir, "crps-stopped", *crps, "run.stop_after_steps=3"))
    resumed = fit(tiny(store, workdir, "ignored", *crps), resume="crps-stopped")
    assert losses(resumed) == losses(whole)
    validated = by_step(whole, "val_loss")
    assert {step: v for step, v in by_step(resumed, "val_loss").items() if step in validated} == validated
    for key, value in raw_weights(whole).items():
        assert torch.equal(raw_weights(resumed)[key], value), key


@pytest.mark.parametrize("change, match", [
    ("optim.lr=1e-2", r"optim.lr was 0.005 in the run and would be 0.01"),
    ("parallel.num_workers=1", r"parallel.num_workers was 2 in the run and would be 1"),  # the world size
    ("optim.epochs=1", r"optim.epochs was 2 in the run and would be 1"),  # fewer epochs: another plan
    ("data.batch_size=4", r"data.batch_size was 2"),
])
def test_resume_keeps_the_saved_plan(change, match, store, workdir, reference):
    """A resume starts from the run's config.yaml; changes that would break exactness are refused before Ray."""
    where = f"run.storage_path={workdir}/runs"
    assert resume_config("zero0", None, [where]) == tiny(store, workdir, "zero0")  # no flags: the saved plan
    resume_config("zero0", None, [where, "tracking.log_every=2", "run.stop_after_steps=4", "optim.epochs=5",
                                  "parallel.gpus_per_worker=0.25", "parallel.cpus_per_worker=2"])  # where it runs
    with pytest.raises(ConfigError, match=match):
        resume_config("zero0", None, [where, change])


def test_resuming_a_finished_run_says_so_and_exits(store, workdir, reference):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "jobs/train_era5.py", "--resume", "zero0", "--set",
                          f"run.storage_path={workdir}/runs"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "run zero0 is finished (step 6); nothing to resume" in out.stdout, out.stderr
    assert time.monotonic() - start < 30  # no Ray, no DeepSpeed
    with pytest.raises(RunFinished):
        fit(tiny(store, workdir, "zero0"), resume="zero0")


@pytest.mark.slow
def test_nan_loss_stops_once_with_clear_error_and_keeps_checkpoint(store, workdir, ray_session, tmp_path):
    cfg = tiny(store, workdir, "nan", "parallel.max_failures=2")
    notes = tmp_path / "diverged"
    with pytest.raises(NonFiniteLossError, match=r"non-finite training loss.*step 3.*last good checkpoint"):
        fit(cfg, callbacks=[DivergeWeights(3, notes)])
    assert latest(f"{workdir}/runs/nan")[1]["global_step"] == 2
    assert sorted(notes.read_text().split("\n")[:-1]) == ["rank 0", "rank 1"]  # one attempt: not retried


@pytest.mark.slow
def test_mlflow_run_and_registered_model(reference, store):
    client = mlflow.tracking.MlflowClient(reference.mlflow_uri)
    run = client.get_run(reference.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["parallel.zero_stage"] == "0" and run.data.params["model.arch"] == "minconvgru"
    for key in ("train_loss", "train_mse", "val_loss", "val_mse", "lr", "samples_per_s", "time_per_step_s",
                "memory_rss_mb", "epoch_train_loss"):
        assert key in run.data.metrics, key
    # the loss says how it is weighted; the plain normalised MSE is logged beside it
    assert run.data.tags["minconv.loss"].startswith("weighted normalised MSE: area (cell-area weights of 8 latitude")
    assert run.data.metrics["train_mse"] != run.data.metrics["train_loss"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "stats.json" not in artifacts  # the statistics live in the weights
    assert len(client.list_artifacts(run.info.run_id, "plots")) == STEPS // 2
    assert reference.model_version is not None
    mlflow.set_tracking_uri(reference.mlflow_uri)
    model = mlflow.pytorch.load_model(f"models:/tiny/{reference.model_version}")
    context = torch.from_numpy(open_store(store).z.values[:4, None, ::2, ::2].copy())[None]  # physical, coarsened
    forecast, _ = model.rollout(context.repeat(3, 1, 1, 1, 1), steps=5)  # any batch size
    assert forecast.shape == (3, 5, 1, 8, 16) and torch.isfinite(forecast).all()
    assert 4e4 < forecast.mean() < 7e4  # a registered model forecasts in physical units (z500 ~ 5.4e4)
    # What the forecast job loads: the bare network, whose normaliser holds the training statistics.
    network = load_model(f"models:/tiny/{reference.model_version}")
    stats = compute_stats(store, ["z"], time_range=("2015-01-01", "2015-01-31"), progress=False)
    assert network.spec["arch"] == "minconvgru" and network.normalizer.channels == ["z"]
    torch.testing.assert_close(network.normalizer.mean, torch.tensor(stats.mean, dtype=torch.float32))
    torch.testing.assert_close(network.normalizer.std, torch.tensor(stats.std, dtype=torch.float32))
    checkpoint_model = load_model_file(f"{reference.checkpoint}/model.pt")
    for key, value in checkpoint_model.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


@pytest.mark.parametrize("override, match", [
    ("data.url=/nonexistent/store.zarr", "data.url: no zarr store at '/nonexistent/store.zarr'"),
    ("parallel.num_workers=16", "parallel: the Ray cluster cannot fit 16 workers"),
    ("data.train_range=[1990-01-01, 1990-02-01]", "data.train_range.*selects no time steps"),
    ("data.channels=[geopotential@500]", "data.channels.*geopotential"),
    ("data.batch_size=100000", r"data.train_range=.*: fewer than data.batch_size=100000 windows per worker for 2"),
])
def test_bad_setup_fails_before_any_worker(override, match, store, workdir, ray_session):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=match):
        fit(tiny(store, workdir, "bad", override))
    assert time.monotonic() - start < 20
    assert not (workdir / "runs" / "bad").exists()


def scale_january(path: str) -> None:
    """A decodable chunk of garbage in the training period: what a corrupt unchecksummed store gives."""
    arr = zarr.open_array(os.path.join(path, "z"), mode="r+")
    arr[240:264] = arr[240:264] * np.float32(1e22)  # 2015-01-11


def flip_a_byte(path: str) -> None:
    chunk = os.path.join(path, "z", "c", "10", "0", "0")
    data = bytearray(Path(chunk).read_bytes())
    data[len(data) // 2] ^= 0x40
    Path(chunk).write_bytes(bytes(data))


def rewrite(path: str, change) -> None:
    ds = change(xr.open_zarr(path)).load()
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(path, mode="w", zarr_format=3, consolidated=False)


def swap_two_times(ds: xr.Dataset) -> xr.Dataset:
    times = ds.time.values.copy()
    times[[100, 101]] = times[[101, 100]]
    return ds.assign_coords(time=times)


@pytest.mark.parametrize("corrupt, match", [
    (scale_january, r"data.url: values outside the plausible range \[30000, 70000\] \(.*e\+26\) in channel z "
                    r"\(variable 'z'\) at time 2015-01-11T00:00:00 \(and 23 more frames .*\) of '.*bad.zarr'"),
    (lambda p: zarr.open_array(os.path.join(p, "z"), mode="r+").__setitem__((300, 2, 2), np.nan),
     r"data.url: NaN in channel z \(variable 'z'\) at time 2015-01-13T12:00:00 of '.*bad.zarr'; set data.nan_policy"),
    (flip_a_byte, r"data.url: cannot read channel z time .* of '.*bad.zarr': chunk 'z/c/10/0/0' does not decode"),
    (lambda p: os.remove(os.path.join(p, "z", "c", "10", "0", "0")),
     r"data.url: chunk 'z/c/10/0/0' of variable 'z' \(time 2015-01-11T00:00:00 to 2015-01-11T23:00:00\) is missing "
     r"from '.*bad.zarr' \(zarr reads it as NaN"),
    (lambda p: rewrite(p, swap_two_times), r"data.url: the time coordinate 'time' of '.*bad.zarr' is not strictly"),
    (lambda p: rewrite(p, lambda ds: ds.drop_vars("time")), r"data.url: '.*bad.zarr' has no time coordinate 'time'"),
    (lambda p: set_attrs(p, None, **{COMPLETE_ATTR: False}), r"data.url: zarr store '.*bad.zarr' is incomplete"),
], ids=["implausible", "nan", "checksum", "missing-chunk", "time-order", "no-time", "incomplete"])
def test_bad_data_fails_before_any_worker(corrupt, match, store, workdir, ray_session, tmp_path):
    """Each error is one line naming the store and the problem, raised on the driver."""
    bad = str(tmp_path / "bad.zarr")
    shutil.copytree(store, bad)
    corrupt(bad)
    start = time.monotonic()
    with pytest.raises(ConfigError, match=match) as info:
        fit(tiny(bad, workdir, "bad-data"))
    assert "\n" not in str(info.value) and time.monotonic() - start < 20
    assert not (workdir / "runs" / "bad-data").exists()


class RecordAttempt:
    """Appends `rank pid` to a file at global step 1: one line per rank per attempt."""

    def __init__(self, log: Path):
        self.log = log

    def __call__(self, engine, step: int, rank: int) -> None:
        if step == 1:
            with open(self.log, "a") as f:
                f.write(f"{rank} {os.getpid()}\n")


@pytest.mark.slow
@pytest.mark.parametrize("name, corrupt, match", [
    ("late-nan", lambda arr, p: arr.__setitem__((1300, 1, 1), np.nan),  # 2015-02-24T04:00
     r"NaN in channel z \(variable 'z'\) at time 2015-02-24T04:00:00 of '.*late.zarr'"),
    ("late-chunk", lambda arr, p: os.remove(os.path.join(p, "z", "c", "54", "0", "0")),  # 2015-02-24
     r"chunk 'z/c/54/0/0' of variable 'z' \(time 2015-02-24T00:00:00 to 2015-02-24T23:00:00\) is missing from "
     r"'.*late.zarr'"),
])
def test_data_error_in_a_worker_stops_the_run_without_retries(name, corrupt, match, store, workdir, ray_session,
                                                               tmp_path):
    """Bad data where the driver does not look (the second half of the validation period, rank 1's): the
    worker's DataError ends the run at once, though parallel.max_failures would allow two more attempts."""
    bad = str(tmp_path / "late.zarr")
    shutil.copytree(store, bad)
    corrupt(zarr.open_array(os.path.join(bad, "z"), mode="r+"), bad)
    attempts = tmp_path / "attempts"
    with pytest.raises(TrainingError, match=rf"run {name} stopped on bad data \(not retried\): " + match) as info:
        fit(tiny(bad, workdir, name, "parallel.max_failures=2"), callbacks=[RecordAttempt(attempts)])
    assert "\n" not in str(info.value)
    assert len(attempts.read_text().splitlines()) == 2  # both ranks, once


@pytest.mark.slow
def test_navier_stokes_job_setup_trains_and_logs(workdir, ray_session, tmp_path):
    """The job's sample-split set-up, shrunk: a real (tiny) NS store, 2 workers, MLflow run and model."""
    store = str(tmp_path / "ns.zarr")
    generate_navier_stokes(store, samples=6, resolution=16, downsample=2, time_units=8, dt=1e-2, batch_size=3,
                           progress=False)
    cfg = load_config(preset=ROOT / "configs" / "navier_stokes.yaml", overrides=[
        f"data.url={store}", "data.train_samples=[0, 4]", "data.val_samples=[4, 6]", "data.sequence_length=5",
        "data.teacher_steps=3", "data.stride=2", "model.hidden_size=4", "model.layers=2", "optim.epochs=1",
        "optim.steps_per_epoch=3", "checkpoint.val_batches=1", "tracking.log_every=1",
        f"tracking.uri=sqlite:///{workdir}/mlflow.db", "tracking.registered_model=tiny-ns", "run.name=ns",
        f"run.storage_path={workdir}/runs",
    ])
    assert cfg.model.padding == "circular" and cfg.data.dims.sample == "sample"
    result = fit(cfg)
    run = mlflow.tracking.MlflowClient(result.mlflow_uri).get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED" and {"train_loss", "val_loss"} <= set(run.data.metrics)
    assert run.data.tags["minconv.loss"] == "plain normalised MSE"  # no latitude: uniform rows
    assert run.data.metrics["train_mse"] == run.data.metrics["train_loss"]
    assert run.data.params["data.train_samples"] == "[0, 4]"
    mlflow.set_tracking_uri(result.mlflow_uri)
    forecast, _ = mlflow.pytorch.load_model(f"models:/tiny-ns/{result.model_version}").rollout(
        torch.randn(2, 3, 1, 8, 8), steps=4)
    assert forecast.shape == (2, 4, 1, 8, 8) and torch.isfinite(forecast).all()


@pytest.mark.parametrize("override, match", [
    ("run.storage_path=runs", r"run.storage_path='runs' is relative: in a Ray job"),
    ("tracking.uri=null", "tracking.uri is not set: in a Ray job"),
])
def test_ray_job_needs_durable_locations(override, match, store, workdir, monkeypatch):
    """What `ray job submit --working-dir` does: the driver runs in a throw-away copy of the working dir."""
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match=match):
        fit(tiny(store, workdir, "job", override))


def test_loaded_statistics_must_be_for_the_runs_channels(store, workdir, tmp_path):
    path = tmp_path / "stats.json"
    NormStats(["t2m"], [280.0], [10.0]).save(str(path))
    with pytest.raises(ConfigError, match=r"^data.stats_path: statistics for channels \['t2m'\], data.channels are \['z'\]"):
        fit(tiny(store, workdir, "wrongstats", f"data.stats_path={path}", "data.bounds=[null]"))


@pytest.mark.slow
def test_forcings_and_static_fields_train_and_the_registered_model_forecasts(store, workdir, ray_session, tmp_path,
                                                                              monkeypatch):
    """A run reading every forcing and two static fields from a second store (latitude descending, unlike the
    data's): the loss is finite and falls, the registered model carries its inputs, and jobs/forecast.py
    forecasts with it."""
    from jobs import forecast as forecast_job

    from minconv_dist.data.forcings import FORCINGS, forcing_channels
    from tests.conftest import add_static_fields

    static_url = str(tmp_path / "static.zarr")
    grid = open_store(store)
    xr.Dataset(coords={"lat": grid["lat"].values[::-1], "lon": grid["lon"].values}).to_zarr(
        static_url, zarr_format=3, consolidated=False)
    add_static_fields(static_url, "lat", "lon")
    static = ["land_sea_mask", "geopotential_at_surface"]
    result = fit(tiny(store, workdir, "inputs", f"data.forcings={list(FORCINGS)}", f"data.static={static}",
                      f"data.static_url={static_url}", "tracking.registered_model=tiny-inputs"))
    got = losses(result)
    assert len(got) == STEPS and np.isfinite(got).all() and got[-1] < got[0], got
    mlflow.set_tracking_uri(result.mlflow_uri)  # load_model's tracking_uri does not reach the model registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", result.mlflow_uri)  # what the forecast job's user exports
    network = load_model(f"models:/tiny-inputs/{result.model_version}")
    assert network.forcings == forcing_channels(list(FORCINGS)) and network.static.channels == static
    raw = np.stack([open_store(static_url)[name].values[::-1] for name in static])  # latitude as the data's
    expected = raw.reshape(2, 8, 2, 16, 2).mean(axis=(2, 4))  # 2x2 block means: coarsened as the data
    assert not np.array_equal(expected[:, ::-1], expected)  # the flip shows
    torch.testing.assert_close(network.static.values, torch.from_numpy(expected))
    out = tmp_path / "fc.zarr"
    forecast_job.main(["--model", f"models:/tiny-inputs/{result.model_version}", "--data", store, "--coarsen", "2",
                       "--context", "4", "--steps", "6", "--init-start", "2015-02-10", "--init-end", "2015-02-11",
                       "--out", str(out)])
    fc = xr.open_zarr(out)
    assert fc.attrs["model_spec"].count("toa_insolation") == 1 and fc["geopotential"].shape == (2, 6, 1, 8, 16)
    assert np.isfinite(fc["geopotential"].values).all() and 4e4 < float(fc["geopotential"].mean()) < 7e4


class RecordStarts:
    """Appends `rank step` at the first step each worker process runs: one line per rank per attempt."""

    def __init__(self, log: Path):
        self.log, self.started = log, False

    def __call__(self, engine, step: int, rank: int) -> None:
        if not self.started:
            self.started = True
            with open(self.log, "a") as f:
                f.write(f"{rank} {step}\n")


class FullDiskFrom:
    """From global step `step` on, this worker's uploads to the run's storage fail as on a full disk: every file
    is created and left empty, then ENOSPC (what the issue's 20 MB tmpfs did). Ray uploads with pyarrow."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, engine, step: int, rank: int) -> None:
        import pyarrow.fs

        if step != self.step:
            return

        def full(source, destination, source_filesystem=None, destination_filesystem=None, **kwargs):
            for path in sorted(Path(source).rglob("*")):
                target = f"{destination}/{path.relative_to(source).as_posix()}"
                if path.is_dir():
                    destination_filesystem.create_dir(target)
                else:
                    destination_filesystem.open_output_stream(target).close()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)

        pyarrow.fs.copy_files = full


def run_job(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/train_era5.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_full_disk_ends_the_run_in_one_line_and_resume_skips_what_it_left(store, workdir, reference, tmp_path, capsys):
    """Issue 22, findings 1 and 6. The disk fills at the final checkpoint: the run ends at once (not retried), in
    one line naming the storage and its free space, and the last good checkpoint stays. Its 0-byte folder, and
    then a truncated model-states file in the newest good checkpoint, are skipped by --resume, which continues
    from the one before, once, exactly."""
    attempts = tmp_path / "attempts"
    with pytest.raises(TrainingError) as info:
        fit(tiny(store, workdir, "full", "parallel.max_failures=2"),
            callbacks=[FullDiskFrom(STEPS), RecordStarts(attempts)])
    run = workdir / "runs" / "full"
    assert re.fullmatch(rf"run full failed: checkpoint of step {STEPS} not written: \[Errno 28\] No space left on "
                        rf"device: '{run}/checkpoint_\S+' \(run.storage_path {run}: \d+\.\d [GM]iB free\); last good "
                        rf"checkpoint: {run}/checkpoint_\S+ \(step 4\); continue with: .*", str(info.value)), info.value
    assert sorted(attempts.read_text().splitlines()) == ["0 1", "1 1"]  # one attempt: not retried
    empty = [c for c in run.glob("checkpoint_*/") if (c / "position.json").exists()
             and (c / "position.json").stat().st_size == 0]
    assert len(empty) == 1, "the full disk left no 0-byte checkpoint: the test would prove nothing"
    last_good = Path(latest(str(run))[0])
    truncate(last_good / "ds" / "mp_rank_00_model_states.pt")
    capsys.readouterr()

    attempts.unlink()
    resumed = fit(tiny(store, workdir, "full"), resume="full", callbacks=[RecordStarts(attempts)])
    out = capsys.readouterr().out
    assert f"[minconv] --resume full: skipped {empty[0].name}: position.json is 0 bytes" in out
    assert re.search(rf"\[minconv\] --resume full: skipped {last_good.name}: ds/mp_rank_00_model_states.pt is \d+ "
                     rf"bytes, the manifest says \d+", out), out
    assert sorted(attempts.read_text().splitlines()) == ["0 3", "1 3"]  # once, from step 2
    assert losses(resumed) == losses(reference)
    check_weights(model_of(resumed), model_of(reference))  # bit-equal


@pytest.mark.parametrize("target", ["rng_rank1.pt", "ds/mp_rank_00_model_states.pt"])
def test_resume_refuses_a_crafted_checkpoint_file_naming_it(target, store, workdir, reference, tmp_path):
    """Issue 22, finding 2: a pickle that would create a marker when unpickled, as rank 1's RNG file or DeepSpeed's
    model states, with the manifests resealed around it. --resume refuses it in one line naming the file, before
    Ray or MLflow is touched, and the marker never appears."""
    run = tmp_path / "crafted"
    shutil.copytree(reference.run_dir, run)
    newest = Path(latest(str(run))[0])
    marker = tmp_path / "marker"
    plant(newest, target, marker)
    out = run_job("--resume", str(run), "--set", "optim.epochs=3")
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: --resume {run}: {newest.name}: {target} is not a data-only file (Unsupported global: GLOBAL io.open "
        "was not an allowed global by default); refused to load it"), out.stderr[-3000:]
    assert not marker.exists()
    assert mlflow.tracking.MlflowClient(reference.mlflow_uri).get_run(reference.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.parametrize("empty_position", [False, True], ids=["truncated", "truncated-and-empty-position"])
def test_resume_without_a_verified_checkpoint_says_why_and_leaves_mlflow_alone(empty_position, store, workdir,
                                                                               reference, tmp_path):
    """Issue 22, finding 6: every checkpoint's model states truncated (and the newest one's position.json emptied):
    --resume stops on the driver in one line that names each skipped checkpoint and why, without a traceback,
    without starting Ray, and the finished MLflow run stays FINISHED."""
    run = tmp_path / "broken"
    shutil.copytree(reference.run_dir, run)
    checkpoints = sorted(c for c in run.glob("checkpoint_*") if c.is_dir())
    for c in checkpoints:
        truncate(c / "ds" / "mp_rank_00_model_states.pt")
    if empty_position:
        (checkpoints[-1] / "position.json").write_text("")
    start = time.monotonic()
    out = run_job("--resume", str(run), "--set", "optim.epochs=3")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]
    assert out.stderr.startswith(f"error: --resume: no verified checkpoint under {run} (skipped ")
    for c in checkpoints:
        why = ("position.json is 0 bytes" if empty_position and c == checkpoints[-1] else
               r"ds/mp_rank_00_model_states.pt is \d+ bytes, the manifest says \d+")
        assert re.search(rf"skipped {c.name}: {why}", out.stderr), out.stderr
    assert time.monotonic() - start < 60
    assert mlflow.tracking.MlflowClient(reference.mlflow_uri).get_run(reference.mlflow_run_id).info.status == "FINISHED"


class HoldAt:
    """Every rank waits before global step `step` until `go` exists, after touching `waiting`."""

    def __init__(self, step: int, waiting: Path, go: Path):
        self.step, self.waiting, self.go = step, waiting, go

    def __call__(self, engine, step: int, rank: int) -> None:
        if step == self.step:
            self.waiting.touch()
            while not self.go.exists():
                time.sleep(0.1)


@pytest.mark.slow
def test_a_second_run_with_the_same_name_is_refused(store, workdir, ray_session, tmp_path):
    """Issue 22, finding 5: while a run trains, before its first checkpoint, a second start with its name is
    refused with the --resume hint; the first one ends with the directory and the checkpoints its own."""
    waiting, go = tmp_path / "waiting", tmp_path / "go"
    pool = ThreadPoolExecutor(2)
    first = pool.submit(fit, tiny(store, workdir, "twice", "optim.epochs=1"), callbacks=[HoldAt(1, waiting, go)])
    try:
        deadline = time.monotonic() + 300
        while not waiting.exists() and not first.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert waiting.exists(), first.exception() if first.done() else "the first run did not start"
        assert not list((workdir / "runs" / "twice").glob("checkpoint_*"))
        second = pool.submit(fit, tiny(store, workdir, "twice", "optim.epochs=1"))
        with pytest.raises(ConfigError, match=r"^run.name: run 'twice' already exists in .*twice \(started .*\); "
                                              r"continue it with --resume twice, or choose another run.name$"):
            second.result(timeout=120)
    finally:
        go.touch()
    result = first.result(timeout=300)
    position = json.loads((Path(result.checkpoint) / "position.json").read_text())
    assert position["mlflow_run_id"] == result.mlflow_run_id
    client = mlflow.tracking.MlflowClient(result.mlflow_uri)
    experiment = client.get_experiment_by_name("minconv_dist").experiment_id
    assert len(client.search_runs([experiment], "attributes.run_name = 'twice'")) == 1
