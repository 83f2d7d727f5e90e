"""`fit(config)`: check everything that can be checked on the driver, then run `worker_loop` on a Ray
Train `TorchTrainer`, and end the MLflow run: log + register the final model, set its status (`train/sync.py`).
"""
from __future__ import annotations

import os
import queue
import shlex
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import ray
import ray.train
from ray.train.torch import TorchTrainer

from minconv_dist.data import (DataError, NormStats, channel_bounds, check_stats, compute_stats, default_store,
                               open_store, parse_channels, store_dims)
from minconv_dist.data.forcings import check_times
from minconv_dist.data.grid import is_latitude
from minconv_dist.data.static import read_static
from minconv_dist.data.store import is_local, redact
from minconv_dist.train import checkpoint, runs, sync, tracking
from minconv_dist.train.config import ConfigError, TrainConfig
from minconv_dist.train.datasets import split_of, window_dataset
from minconv_dist.train.failures import StopOnDeterministicError
from minconv_dist.train.head import HeadLost, HeadWatch
from minconv_dist.train.loop import StepCallback, worker_loop
from minconv_dist.train.losses import LossWeights, loss_weights
from minconv_dist.train.meter import NonFiniteLossError
from minconv_dist.train.resume import check_plan, check_unfinished, run_dir, saved_plan
from minconv_dist.train.spool import Spool, spool_dir
from minconv_dist.worker_setup import ignore_sigint


class TrainingError(RuntimeError):
    """Training failed; the message says why and where the last good checkpoint is. (A non-finite loss is
    the `NonFiniteLossError` of the worker that saw it, with the same message shape.)"""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to continue."""


def resume_command(directory: str) -> str:
    """The command that continues the run in `directory` (the job that is running, or the ERA5 job), quoted
    for a POSIX shell."""
    job = sys.argv[0] if sys.argv[0].endswith(".py") and "pytest" not in sys.argv[0] else "jobs/train_era5.py"
    return shlex.join(["python", job, "--resume", directory])


@dataclass
class FitResult:
    run_name: str
    run_dir: str
    checkpoint: str  # the last verified checkpoint
    metrics: dict[str, Any]
    mlflow_uri: str
    mlflow_run_id: str
    model_version: str | None
    unsynced: str | None = None  # what MLflow does not have yet (it did not answer), for `sync.sync_command`


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


def _check_data(cfg: TrainConfig, url: str
                ) -> tuple[NormStats, tuple[int, int], int, int, np.ndarray | None, LossWeights]:
    """Open the store, compute (or load) the stats, size the epoch, read each split's first batch and the static
    fields, and weigh the loss on the run's grid, all checked (docs/data.md, "Checks"), so that bad data fail
    here, before any worker starts. Sets data.dims to the store's spelling of latitude/longitude (`store_dims`),
    which the workers then use."""
    d = cfg.data
    # a sample store is split by data.<split>_samples, a single series by data.<split>_range
    key = {split: f"data.{split}_{'samples' if d.dims.sample else 'range'}" for split in ("train", "val")}
    bounds = channel_bounds(d.channels, d.bounds)
    with _config_errors("data.url"):
        store = open_store(url, d.storage_options or None, reader=d.reader)
        d.dims = store_dims(store, d.dims)  # `lat` or `latitude`, as the store spells it; the workers use it
    if d.forcings:
        with _config_errors("data.forcings"):
            check_times(store[d.dims.time].values, repr(redact(url)))
    with _config_errors(f"{key['train']} / data.channels / data.stats_path",
                        "data.stats_path" if d.stats_path else "data.url"):
        stats = (NormStats.load(d.stats_path, d.storage_options or None) if d.stats_path else
                 compute_stats(url, d.channels, d.dims, **split_of(cfg, "train"), progress=False,
                               storage_options=d.storage_options or None, bounds=bounds,
                               allow_nan=d.nan_policy != "raise", reader=d.reader))
        channels = [str(s) for s in parse_channels(d.channels)]
        if stats.channels != channels:
            raise ConfigError(f"data.stats_path: statistics for channels {stats.channels}, data.channels are "
                              f"{channels}")
        check_stats(stats, bounds, f"{redact(url)!r} {key['train']}={getattr(d, key['train'][5:])}")
    if cfg.model.predict == "tendency" and stats.tendency_std is None:
        raise ConfigError(f"{'data.stats_path' if d.stats_path else key['train']}: model.predict=tendency needs "
                          "the std of each channel's step change (tendency_std), and these statistics have none "
                          "(written before it, or a split without two consecutive frames)")
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
                                 storage_options=None if is_local(static_url) else d.storage_options or None,
                                 reader=d.reader)
    latitude = ds.latitudes if d.dims.lat in store.coords and is_latitude(store[d.dims.lat]) else None
    try:
        weights = loss_weights(cfg, latitude, repr(redact(url)))
    except ValueError as err:  # names its loss.* key
        raise ConfigError(str(err)) from err
    return stats, ds.grid, steps, val_batches, static, weights


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


def _worker_cause(err: ray.train.TrainingFailedError) -> BaseException:
    """The exception behind a failed run: the one `StopOnDeterministicError` stopped it for, or the lowest rank's,
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
    stats, grid, steps_per_epoch, val_batches, static, weights = _check_data(cfg, url)

    started_ray = not ray.is_initialized()
    if started_ray:  # a Ray of its own (not one another user started here), unless RAY_ADDRESS names one; its
        # workers leave a terminal's Ctrl-C to this process, which ends the run first
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"), log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": ignore_sigint})
    _check_resources(cfg)
    if not resume:
        runs.claim(directory, name)

    uri = tracking.resolve_uri(cfg.tracking.uri)
    run_id = position.get("mlflow_run_id") or _open_run(cfg, uri, name, weights)
    run = _Run(name, directory, storage, Spool(spool_dir(directory), uri, run_id))
    try:
        return _train(cfg, run, resume_from, position, url, stats, static, weights, grid, steps_per_epoch,
                      val_batches, callbacks)
    except KeyboardInterrupt as err:  # at any moment from here: the run ends KILLED, never RUNNING
        raise _interrupted(cfg, run, started_ray) from err


@dataclass
class _Run:
    """The run being trained: where it lives, and, once training is over, the plan of its end (`sync.plan`)."""

    name: str
    directory: str
    storage: str
    spool: Spool
    ending: dict[str, Any] | None = None


def _open_run(cfg: TrainConfig, uri: str, name: str, weights: LossWeights) -> str:
    """Create the MLflow run, tagged with the loss's weighting, retrying with backoff for tracking.wait_s; a new
    run needs the server once."""
    t, tags = cfg.tracking, {"minconv.loss": weights.description}
    try:
        with tracking.http_limits(t.timeout_s):
            return tracking.with_backoff(lambda: tracking.open_run(uri, t.experiment, name, cfg.to_dict(), tags),
                                         t.wait_s)
    except Exception as err:  # noqa: BLE001 - a server that does not answer raises many kinds
        raise ConfigError(f"tracking.uri: MLflow at {redact(uri)} did not answer for tracking.wait_s={t.wait_s:g} s "
                          f"({tracking.one_line(err)}); a new run is created there before training starts: start "
                          "the server, or set tracking.uri / MLFLOW_TRACKING_URI") from err


def _train(cfg: TrainConfig, run: _Run, resume_from: str | None, position: dict[str, Any], url: str,
           stats: NormStats, static: np.ndarray | None, weights: LossWeights, grid: tuple[int, int],
           steps_per_epoch: int, val_batches: int, callbacks: list[StepCallback]) -> FitResult:
    """Train in the existing MLflow run, then end it: log and register the model, set the status (`sync`)."""
    name, directory, spool = run.name, run.directory, run.spool
    uri, run_id, t = spool.uri, spool.server_run_id, cfg.tracking
    if position:  # a resume: the run is RUNNING again; best effort, one bounded try: its end sets the status
        with tracking.http_limits(t.timeout_s), tracking.ctrl_c_held(), suppress(Exception):
            tracking.set_status(uri, run_id, "RUNNING")
    print(f"[minconv] run {name}: {directory}; MLflow {redact(uri)} run {run_id}; {steps_per_epoch} steps/epoch "
          f"x {cfg.optim.epochs} epochs on {cfg.parallel.num_workers} workers, ZeRO-{cfg.parallel.zero_stage}",
          flush=True)
    ema = f"; validated and exported: EMA of the weights, decay {cfg.optim.ema_decay}" if cfg.optim.ema_decay else ""
    mse = " of the ensemble mean" if cfg.loss.kind == "crps" else ""
    print(f"[minconv] train_loss / val_loss: {weights.description}{ema}; train_mse / val_mse: plain normalised "
          f"MSE{mse}", flush=True)
    p = cfg.parallel
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": cfg.to_dict(), "url": url, "stats": asdict(stats), "static": static,
            "loss_weights": asdict(weights), "steps_per_epoch": steps_per_epoch, "val_batches": val_batches,
            "mlflow_uri": uri, "mlflow_run_id": run_id, "resume_from": resume_from, "run_dir": directory,
            "callbacks": list(callbacks),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                               resources_per_worker=worker_resources(cfg),
                                               placement_strategy=p.placement.upper()),
        run_config=ray.train.RunConfig(
            name=name, storage_path=run.storage,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            callbacks=[StopOnDeterministicError()],
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min"),
        ),
    )
    try:
        result = _fit_beside_main_thread(trainer, HeadWatch(ray.get_runtime_context().gcs_address))
    except HeadLost as err:  # the MLflow server may have gone with the head: one bounded try to end its run
        unsynced = sync.finish_run(spool, sync.plan("FAILED"), timeout_s=t.timeout_s, wait_s=0)
        status = f"not updated ({unsynced}): the resume ends it" if unsynced else "ended as FAILED"
        raise HeadLost(f"run {name} stopped: {err}; MLflow run {run_id} {status}; {_last_good(directory)}; on a new "
                       f"cluster, continue with: {resume_command(directory)}") from None
    except ray.train.TrainingFailedError as err:
        unsynced = sync.finish_run(spool, sync.plan("FAILED"), timeout_s=t.timeout_s, wait_s=0)
        where = _last_good(directory)
        if unsynced:
            where += f"; MLflow did not answer, later: {sync.sync_command(directory)}"
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
    step = last[1]["global_step"]
    if not last[1].get("finished"):  # run.stop_after_steps: stopped, not finished; its resume registers the model
        run.ending = sync.plan("KILLED")
    else:
        run.ending = sync.plan("FINISHED", last[0], step, t.registered_model, (cfg.data.sequence_length, grid))
    unsynced = sync.finish_run(spool, run.ending, timeout_s=t.timeout_s, wait_s=t.wait_s)
    version = (run.ending.get("model") or {}).get("version")
    metrics = dict(result.metrics or {}) or {"global_step": step}
    view = f"view with: mlflow ui --backend-store-uri {shlex.quote(uri)}"
    if unsynced:
        view = (f"MLflow does not have {unsynced}; kept in {spool.directory}; when it answers: "
                f"{sync.sync_command(directory)}")
    if run.ending["status"] == "KILLED":
        print(f"[minconv] stopped at step {step} (run.stop_after_steps): checkpoint {last[0]}; MLflow run "
              f"{run_id} KILLED, nothing registered; continue with: {resume_command(directory)}; {view}", flush=True)
    else:
        print(f"[minconv] done: checkpoint {last[0]}; model {t.registered_model or '(not registered)'} version "
              f"{version}; {view}", flush=True)
    return FitResult(name, directory, last[0], metrics, uri, run_id, version, unsynced)


def _interrupted(cfg: TrainConfig, run: _Run, started_ray: bool) -> Interrupted:
    """Ctrl-C: mark the run KILLED (one bounded try), stop the Ray this call started, say how to go on. Ray's
    workers ignore the terminal's SIGINT (`worker_setup.ignore_sigint`): nothing fails under this cleanup, and a
    second Ctrl-C does not cut it short."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    try:
        killed = sync.finish_run(run.spool, sync.plan("KILLED"), timeout_s=cfg.tracking.timeout_s, wait_s=0)
        if run.ending is not None:  # training was over: the sync command ends the run as planned
            run.spool.save_target(run.ending)
        if started_ray:
            ray.shutdown()
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
    status = f"MLflow run {run.spool.server_run_id} ended as KILLED"
    if killed:
        status = f"MLflow run {run.spool.server_run_id} not updated, {killed}; {sync.sync_command(run.directory)} " \
                 "updates it"
    if run.ending is not None:
        return Interrupted(f"run {run.name} interrupted while ending; {status}; finish with: "
                           f"{sync.sync_command(run.directory)}")
    if checkpoint.latest(run.directory) is None:
        return Interrupted(f"run {run.name} interrupted before its first checkpoint; {status}; nothing to resume: "
                           "start a new run")
    return Interrupted(f"run {run.name} interrupted; {status}; continue with: {resume_command(run.directory)}")
