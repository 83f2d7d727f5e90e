"""`fit(config)`: check everything that can be checked on the driver, then run `worker_loop` on a Ray
Train `TorchTrainer`, and log + register the final model in MLflow.
"""
from __future__ import annotations

import os
import queue
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from minconv_dist.data import (DataError, NormStats, channel_bounds, check_stats, compute_stats, default_store,
                               open_store, parse_channels)
from minconv_dist.data.forcings import check_times
from minconv_dist.data.static import read_static
from minconv_dist.data.store import is_local, redact
from minconv_dist.models import load_model_file
from minconv_dist.train import checkpoint, runs, tracking
from minconv_dist.train.config import ConfigError, TrainConfig
from minconv_dist.train.datasets import split_of, window_dataset
from minconv_dist.train.head import HeadLost, HeadWatch
from minconv_dist.train.loop import StepCallback, worker_loop
from minconv_dist.train.meter import NonFiniteLossError
from minconv_dist.train.resume import check_plan, check_unfinished, run_dir, saved_plan


class TrainingError(RuntimeError):
    """Training failed; the message says why and where the last good checkpoint is. (A non-finite loss is
    the `NonFiniteLossError` of the worker that saw it, with the same message shape.)"""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to continue."""


def resume_command(directory: str) -> str:
    """The command that continues the run in `directory` (the job that is running, or the ERA5 job)."""
    job = sys.argv[0] if sys.argv[0].endswith(".py") and "pytest" not in sys.argv[0] else "jobs/train_era5.py"
    return f"python {job} --resume {directory}"


@dataclass
class FitResult:
    run_name: str
    run_dir: str
    checkpoint: str  # the last verified checkpoint
    metrics: dict[str, Any]
    mlflow_uri: str
    mlflow_run_id: str
    model_version: str | None


@contextmanager
def _config_errors(key: str, io_key: str = "data.url") -> Iterator[None]:
    """The data layer's errors as a ConfigError naming what to change: data.url for bad data (DataError),
    data.channels for a channel the store lacks, `io_key` for an unreadable store or file, `key` otherwise."""
    try:
        yield
    except ConfigError:
        raise  # already names its key
    except DataError as err:
        raise ConfigError(f"data.url: {err}") from err
    except KeyError as err:
        raise ConfigError(f"data.channels: {err}") from err
    except OSError as err:
        raise ConfigError(f"{io_key}: {err}") from err
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from err


def _check_data(cfg: TrainConfig, url: str) -> tuple[NormStats, tuple[int, int], int, int, np.ndarray | None]:
    """Open the store, compute (or load) the stats, size the epoch, read each split's first batch and the static
    fields, all checked (docs/data.md, "Checks"), so that bad data fail here, before any worker starts."""
    d = cfg.data
    # a sample store is split by data.<split>_samples, a single series by data.<split>_range
    key = {split: f"data.{split}_{'samples' if d.dims.sample else 'range'}" for split in ("train", "val")}
    bounds = channel_bounds(d.channels, d.bounds)
    with _config_errors("data.url"):
        store = open_store(url, d.storage_options or None)
    if d.forcings:
        with _config_errors("data.forcings"):
            check_times(store[d.dims.time].values, repr(redact(url)))
    with _config_errors(f"{key['train']} / data.channels / data.stats_path",
                        "data.stats_path" if d.stats_path else "data.url"):
        stats = (NormStats.load(d.stats_path, d.storage_options or None) if d.stats_path else
                 compute_stats(url, d.channels, d.dims, **split_of(cfg, "train"), progress=False,
                               storage_options=d.storage_options or None, bounds=bounds,
                               allow_nan=d.nan_policy != "raise"))
        channels = [str(s) for s in parse_channels(d.channels)]
        if stats.channels != channels:
            raise ConfigError(f"data.stats_path: statistics for channels {stats.channels}, data.channels are "
                              f"{channels}")
        check_stats(stats, bounds, f"{redact(url)!r} {key['train']}={getattr(d, key['train'][5:])}")
    world = cfg.parallel.num_workers // cfg.parallel.sequence_parallel  # data-parallel groups share the windows
    per_rank = {}
    for split in ("train", "val"):
        with _config_errors(key[split]):
            ds = window_dataset(cfg, url, stats, split, rank=0, world_size=world)
            ds.check_first(d.batch_size, bounds)
        per_rank[split] = ds.n_windows // world
        if per_rank[split] < d.batch_size:
            raise ConfigError(f"{key[split]}={getattr(d, key[split][5:])}: fewer than data.batch_size={d.batch_size} "
                              f"windows per worker for {world} data-parallel ranks "
                              "(parallel.num_workers / parallel.sequence_parallel)")
    steps = per_rank["train"] // d.batch_size
    if cfg.optim.steps_per_epoch:
        steps = min(steps, cfg.optim.steps_per_epoch)
    val_batches = min(cfg.checkpoint.val_batches, per_rank["val"] // d.batch_size)
    static = None
    if d.static:
        static_url = d.static_url or url
        with _config_errors("data.static", "data.static_url" if d.static_url else "data.url"):
            static = read_static(static_url, d.static, latitude=ds.latitudes, longitude=ds.longitudes, dims=d.dims,
                                 coarsen=d.coarsen,
                                 storage_options=None if is_local(static_url) else d.storage_options or None)
    return stats, ds.grid, steps, val_batches, static


def _check_durable(cfg: TrainConfig) -> None:
    """Under `ray job submit --working-dir` the driver runs in Ray's temporary copy of the working dir: a
    relative run.storage_path or the default MLflow store would land there, lost to --resume and the UI."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:  # set by Ray for the driver of a submitted job
        return
    where = "an absolute path (one machine) or s3:// / gs:// (a cluster)"
    if "://" not in cfg.run.storage_path and not os.path.isabs(cfg.run.storage_path):
        raise ConfigError(f"run.storage_path={cfg.run.storage_path!r} is relative: in a Ray job it would be inside "
                          f"the job's temporary copy of the working dir, where --resume cannot find it; set {where}")
    if cfg.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError("tracking.uri is not set: in a Ray job the default ./mlflow.db would be inside the job's "
                          "temporary copy of the working dir; set sqlite:////abs/path/mlflow.db or http://<server>")


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """What each Ray Train worker asks for: CPUs, GPUs when used, and parallel.worker_resources."""
    p = cfg.parallel
    return {"CPU": p.cpus_per_worker, **({"GPU": p.gpus_per_worker} if p.use_gpu else {}), **p.worker_resources}


def _check_resources(cfg: TrainConfig) -> None:
    p = cfg.parallel
    need = {k: p.num_workers * v for k, v in worker_resources(cfg).items()}
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
    if short and not p.allow_autoscale:
        wanted = ", ".join(f"{k}: need {n:g}, cluster has {h:g}" for k, (n, h) in short.items())
        raise ConfigError(f"parallel: the Ray cluster cannot fit {p.num_workers} workers ({wanted}); lower "
                          "parallel.num_workers / cpus_per_worker / gpus_per_worker / worker_resources, or set "
                          "parallel.allow_autoscale=true on an autoscaling cluster")


def _fit_beside_main_thread(trainer: TorchTrainer, head: HeadWatch) -> ray.train.Result:
    """`trainer.fit()` on a daemon thread. On the main thread Ray Train takes SIGINT itself, and its abort ends
    the process without a word about the run; here Ctrl-C stays a KeyboardInterrupt of ours (see `fit`). The main
    thread watches the Ray head meanwhile (`HeadLost`)."""
    outcome: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            outcome.put((trainer.fit(), None))
        except BaseException as err:  # noqa: BLE001 - handed to the main thread as it is
            outcome.put((None, err))

    threading.Thread(target=run, name="ray-train-fit", daemon=True).start()
    while True:
        try:
            result, error = outcome.get(timeout=head.probe_s)
            break
        except queue.Empty:
            head.check()
    if error is not None:
        head.confirm()  # a lost head shows first as a Ray error of the call to the controller, which lives there
        raise error
    return result


# Failures that repeat exactly on a retry from the last checkpoint: bad data, a diverging loss, a checkpoint that
# cannot be written (a full disk) or read (altered files).
NOT_RETRIED = (DataError, NonFiniteLossError, checkpoint.StorageError, checkpoint.CheckpointError)


class _StopOnDeterministicError(ray.train.UserCallback):
    """Ray restarts a failed worker group `parallel.max_failures` times, for faults that pass (a lost node). Bad
    data and a non-finite loss fail the same way every time: one of them from any worker ends the run at once,
    as a ControllerError, which Ray's failure policy does not retry."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for _, error in sorted(worker_exceptions.items()):
            if isinstance(error, NOT_RETRIED):
                raise ray.train.ControllerError(error)


def _worker_cause(err: ray.train.TrainingFailedError) -> BaseException:
    """The exception behind a failed run: the one `_StopOnDeterministicError` stopped it for, or the lowest rank's,
    unwrapped from Ray's task error; else `err`."""
    if isinstance(err, ray.train.ControllerError):
        return err.controller_failure
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        return err
    failure = failures[min(failures)]
    return getattr(failure, "cause", None) or failure


def _last_good(directory: str) -> str:
    last = checkpoint.latest(directory)
    return f"last good checkpoint: {last[0]} (step {last[1]['global_step']})" if last else "no checkpoint"


def _finish_within(uri: str, run_id: str, status: str, seconds: float) -> bool:
    """End the MLflow run if its store answers within `seconds` (MLflow's own retries take minutes)."""
    done = threading.Event()

    def finish() -> None:
        tracking.finish_run(uri, run_id, status)
        done.set()

    threading.Thread(target=finish, name="mlflow-finish", daemon=True).start()
    return done.wait(seconds)


def fit(cfg: TrainConfig, *, resume: str | None = None, callbacks: list[StepCallback] = ()) -> FitResult:
    """Train per `cfg`. `resume`: a run name under run.storage_path (or a run directory) to continue from its
    newest verified checkpoint; `cfg` must then keep the run's saved plan (`resume_config` builds such a
    config). `callbacks` run on every worker before each step (picklable)."""
    _check_durable(cfg)
    resume_from, position = None, {}
    if resume:  # the newest verified checkpoint, all of it data only: checked before Ray or MLflow is touched
        directory = run_dir(resume, cfg.run.storage_path)
        resume_from, position, saved, skipped = saved_plan(directory)
        for line in skipped:
            print(f"[minconv] --resume {resume}: {line}", flush=True)
        check_plan(saved, cfg, resume)
        check_unfinished(saved, position, cfg, resume)
        try:
            checkpoint.probe(resume_from)
        except checkpoint.CheckpointError as err:
            raise ConfigError(f"--resume {resume}: {err}") from None
        storage, name = directory.rsplit("/", 1)
    else:
        name = cfg.run.name or runs.default_name(cfg.model.arch)
        directory = run_dir(name, cfg.run.storage_path)
        storage = directory.rsplit("/", 1)[0]
        runs.check_free(directory, name)
    url = cfg.data.url or default_store()
    stats, grid, steps_per_epoch, val_batches, static = _check_data(cfg, url)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(log_to_driver=True)
    _check_resources(cfg)
    if not resume:
        runs.claim(directory, name)

    uri = tracking.resolve_uri(cfg.tracking.uri)
    run_id = position.get("mlflow_run_id") or tracking.open_run(uri, cfg.tracking.experiment, name, cfg.to_dict())
    print(f"[minconv] run {name}: {directory}; MLflow {uri} run {run_id}; {steps_per_epoch} steps/epoch "
          f"x {cfg.optim.epochs} epochs on {cfg.parallel.num_workers} workers, ZeRO-{cfg.parallel.zero_stage}",
          flush=True)
    p = cfg.parallel
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": cfg.to_dict(), "url": url, "stats": asdict(stats), "static": static,
            "steps_per_epoch": steps_per_epoch,
            "val_batches": val_batches, "mlflow_uri": uri, "mlflow_run_id": run_id, "resume_from": resume_from,
            "run_dir": directory, "callbacks": list(callbacks),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                               resources_per_worker=worker_resources(cfg),
                                               placement_strategy=p.placement.upper()),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures), callbacks=[_StopOnDeterministicError()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min"),
        ),
    )
    try:
        result = _fit_beside_main_thread(trainer, HeadWatch(ray.get_runtime_context().gcs_address))
    except KeyboardInterrupt as err:  # Ctrl-C: end the MLflow run, stop the Ray this call started, say how to go on
        tracking.finish_run(uri, run_id, "KILLED")
        if started_ray:
            ray.shutdown()
        raise Interrupted(f"run {name} interrupted; MLflow run {run_id} ended as KILLED; continue with: "
                          f"{resume_command(directory)}") from err
    except HeadLost as err:  # the MLflow server may have gone with the head: its run is ended if it answers
        ended = _finish_within(uri, run_id, "FAILED", seconds=10)
        raise HeadLost(f"run {name} stopped: {err}; MLflow run {run_id} "
                       f"{'ended as FAILED' if ended else 'could not be ended (no answer): the resume ends it'}; "
                       f"{_last_good(directory)}; on a new cluster, continue with: {resume_command(directory)}") from None
    except ray.train.TrainingFailedError as err:
        tracking.finish_run(uri, run_id, "FAILED")
        where = _last_good(directory)
        cause = _worker_cause(err)
        if isinstance(cause, DataError):
            raise TrainingError(f"run {name} stopped on bad data (not retried): {cause}; {where}; after fixing "
                                f"the data, continue with: {resume_command(directory)}") from err
        kind = NonFiniteLossError if isinstance(cause, NonFiniteLossError) else TrainingError
        raise kind(f"run {name} failed: {str(cause).strip().splitlines()[-1]}; {where}; "
                   f"continue with: {resume_command(directory)}") from err
    last = checkpoint.latest(directory)
    if last is None:
        raise TrainingError(f"run {name} finished without a verified checkpoint in {directory}")
    with ray.train.Checkpoint(last[0]).as_directory() as local:
        model = load_model_file(Path(local) / "model.pt")
    example = torch.cat([model.normalizer.denormalize(torch.zeros(1, cfg.data.sequence_length, model.in_channels, *grid)),
                         torch.zeros(1, cfg.data.sequence_length, len(model.forcings), *grid)], dim=2)
    version = tracking.log_model(uri, run_id, model, example, cfg.tracking.registered_model)
    tracking.finish_run(uri, run_id, "FINISHED")
    metrics = dict(result.metrics or {}) or {"global_step": last[1]["global_step"]}
    print(f"[minconv] done: checkpoint {last[0]}; model {cfg.tracking.registered_model or '(not registered)'}"
          f" version {version}; view with: mlflow ui --backend-store-uri {uri}", flush=True)
    return FitResult(name, directory, last[0], metrics, uri, run_id, version)
