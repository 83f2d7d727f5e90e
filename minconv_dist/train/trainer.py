"""`fit(config)`: check everything that can be checked on the driver, then run `worker_loop` on a Ray
Train `TorchTrainer`, and log + register the final model in MLflow.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from minconv_dist.data import NormStats, compute_stats, default_store, open_store
from minconv_dist.data.store import redact
from minconv_dist.models import load_model_file
from minconv_dist.train import checkpoint, tracking
from minconv_dist.train.config import ConfigError, TrainConfig
from minconv_dist.train.datasets import split_of, window_dataset
from minconv_dist.train.loop import StepCallback, worker_loop
from minconv_dist.train.meter import NonFiniteLossError


class TrainingError(RuntimeError):
    """Training failed; the message says why and where the last good checkpoint is."""


@dataclass
class FitResult:
    run_name: str
    run_dir: str
    checkpoint: str  # the last complete checkpoint
    metrics: dict[str, Any]
    mlflow_uri: str
    mlflow_run_id: str
    model_version: str | None


def _check_data(cfg: TrainConfig, url: str) -> tuple[NormStats, tuple[int, int], int, int]:
    """Open the store, compute (or load) stats, and size the epoch; fails before any worker starts."""
    d = cfg.data
    try:
        open_store(url, d.storage_options or None)
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"data.url: cannot open zarr store {redact(url)!r}: {err}") from err
    # a sample store is split by data.<split>_samples, a single series by data.<split>_range
    key = {split: f"data.{split}_{'samples' if d.dims.sample else 'range'}" for split in ("train", "val")}
    try:
        stats = (NormStats.load(d.stats_path, d.storage_options or None) if d.stats_path else
                 compute_stats(url, d.channels, d.dims, **split_of(cfg, "train"),
                               storage_options=d.storage_options or None, progress=False))
    except KeyError as err:
        raise ConfigError(f"data.channels: {err} in {redact(url)!r}") from err
    except ValueError as err:
        raise ConfigError(f"{key['train']} / data.channels / data.stats_path: {err}") from err
    world = cfg.parallel.num_workers
    per_rank = {}
    for split in ("train", "val"):
        try:
            ds = window_dataset(cfg, url, stats, split, rank=0, world_size=world)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"{key[split]}: {err}") from err
        per_rank[split] = ds.n_windows // world
        if per_rank[split] < d.batch_size:
            raise ConfigError(f"{key[split]}={getattr(d, key[split][5:])}: fewer than data.batch_size={d.batch_size} "
                              f"windows per worker for {world} workers")
    steps = per_rank["train"] // d.batch_size
    if cfg.optim.steps_per_epoch:
        steps = min(steps, cfg.optim.steps_per_epoch)
    val_batches = min(cfg.checkpoint.val_batches, per_rank["val"] // d.batch_size)
    return stats, ds.grid, steps, val_batches


def _check_resources(cfg: TrainConfig) -> None:
    p = cfg.parallel
    need = {"CPU": p.num_workers * p.cpus_per_worker}
    if p.use_gpu:
        need["GPU"] = p.num_workers * p.gpus_per_worker
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0)) for k, v in need.items() if v > have.get(k, 0)}
    if short and not p.allow_autoscale:
        wanted = ", ".join(f"{k}: need {n:g}, cluster has {h:g}" for k, (n, h) in short.items())
        raise ConfigError(f"parallel: the Ray cluster cannot fit {p.num_workers} workers ({wanted}); lower "
                          "parallel.num_workers / cpus_per_worker / gpus_per_worker, or set "
                          "parallel.allow_autoscale=true on an autoscaling cluster")


def _worker_cause(err: ray.train.TrainingFailedError) -> BaseException:
    """The exception a worker raised (the lowest rank's), unwrapped from Ray's task error; else `err`."""
    failures = getattr(err, "worker_failures", None) or {}
    if not failures:
        return err
    failure = failures[min(failures)]
    return getattr(failure, "cause", None) or failure


def _run_dir(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}"


def fit(cfg: TrainConfig, *, resume: str | None = None, callbacks: list[StepCallback] = ()) -> FitResult:
    """Train per `cfg`. `resume`: a run name under run.storage_path (or a run directory) to continue from its
    latest complete checkpoint. `callbacks` run on every worker after each step (picklable)."""
    storage = cfg.run.storage_path if "://" in cfg.run.storage_path else str(Path(cfg.run.storage_path).resolve())
    resume_from, position = None, {}
    if resume:
        run_dir = resume if ("/" in resume) else _run_dir(storage, resume)
        found = checkpoint.latest(run_dir)
        if found is None:
            raise ConfigError(f"--resume {resume!r}: no complete checkpoint under {run_dir}")
        resume_from, position = found
        storage, name = run_dir.rstrip("/").rsplit("/", 1)
    else:
        name = cfg.run.name or f"{cfg.model.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_dir = _run_dir(storage, name)
        if checkpoint.latest(run_dir) is not None:
            raise ConfigError(f"run.name: run {name!r} already has checkpoints in {run_dir}; "
                              f"continue it with --resume {name} or choose another run.name")
    url = cfg.data.url or default_store()
    stats, grid, steps_per_epoch, val_batches = _check_data(cfg, url)

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    _check_resources(cfg)

    uri = tracking.resolve_uri(cfg.tracking.uri)
    run_id = position.get("mlflow_run_id") or tracking.open_run(uri, cfg.tracking.experiment, name, cfg.to_dict())
    print(f"[minconv] run {name}: {run_dir}; MLflow {uri} run {run_id}; {steps_per_epoch} steps/epoch "
          f"x {cfg.optim.epochs} epochs on {cfg.parallel.num_workers} workers, ZeRO-{cfg.parallel.zero_stage}",
          flush=True)
    p = cfg.parallel
    resources = {"CPU": p.cpus_per_worker, **({"GPU": p.gpus_per_worker} if p.use_gpu else {})}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "config": cfg.to_dict(), "url": url, "stats": asdict(stats), "steps_per_epoch": steps_per_epoch,
            "val_batches": val_batches, "mlflow_uri": uri, "mlflow_run_id": run_id, "resume_from": resume_from,
            "callbacks": list(callbacks),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=p.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.checkpoint.keep, checkpoint_score_attribute="val_loss",
                checkpoint_score_order="min"),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:
        tracking.finish_run(uri, run_id, "FAILED")
        last = checkpoint.latest(run_dir)
        where = f"last good checkpoint: {last[0]} (step {last[1]['global_step']})" if last else "no checkpoint"
        cause = _worker_cause(err)
        kind = NonFiniteLossError if isinstance(cause, NonFiniteLossError) else TrainingError
        raise kind(f"run {name} failed: {str(cause).strip().splitlines()[-1]}; {where}; "
                   f"continue with --resume {run_dir}") from err
    last = checkpoint.latest(run_dir)
    if last is None:
        raise TrainingError(f"run {name} finished without a complete checkpoint in {run_dir}")
    with ray.train.Checkpoint(last[0]).as_directory() as directory:
        model = load_model_file(Path(directory) / "model.pt")
    example = model.normalizer.denormalize(torch.zeros(1, cfg.data.sequence_length, model.in_channels, *grid))
    version = tracking.log_model(uri, run_id, model, example, cfg.tracking.registered_model)
    tracking.finish_run(uri, run_id, "FINISHED")
    metrics = dict(result.metrics or {}) or {"global_step": last[1]["global_step"]}
    print(f"[minconv] done: checkpoint {last[0]}; model {cfg.tracking.registered_model or '(not registered)'}"
          f" version {version}; view with: mlflow ui --backend-store-uri {uri}", flush=True)
    return FitResult(name, run_dir, last[0], metrics, uri, run_id, version)
