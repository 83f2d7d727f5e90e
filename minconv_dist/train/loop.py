"""`worker_loop`: what every Ray Train worker runs. DeepSpeed owns the model; the loss is the paper's.

Loss: a window x holds T + 1 frames [B, T+1, C, H, W]. The model reads x[:, :T] with teacher_steps = k
(frames 0..k-1 teacher-forced, then T - k closed-loop steps) and its T outputs are compared with
x[:, 1:T+1] by mean squared error over all frames, channels and grid points (normalised units).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import deepspeed
import psutil
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F

from minconv_dist.data import DimNames, NormStats, WindowDataset
from minconv_dist.models import build_model
from minconv_dist.train import checkpoint
from minconv_dist.train.config import TrainConfig, config_from_dict
from minconv_dist.train.tracking import MetricLogger


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or inf; the run stops and its last good checkpoint is kept."""


def teacher_steps_at(cfg: TrainConfig, epoch: int) -> int:
    """k for this epoch. With a curriculum the closed loop T - k grows from 1 to its final length."""
    T, k = cfg.data.sequence_length, cfg.data.teacher_steps
    closed = T - k
    if cfg.optim.curriculum_epochs and closed > 1:
        closed = min(closed, 1 + (closed - 1) * epoch // cfg.optim.curriculum_epochs)
    return T - closed


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to `min_lr_ratio`, over optimizer steps."""
    warm, floor = cfg.optim.warmup_steps, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def deepspeed_config(cfg: TrainConfig, bf16: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
    }


def dims_of(cfg: TrainConfig) -> DimNames:
    d = cfg.data
    return DimNames(d.time_dim, d.level_dim, d.lat_dim, d.lon_dim, d.sample_dim)


def split_of(cfg: TrainConfig, split: str) -> dict[str, tuple | None]:
    """`time_range` and `sample_range` of the "train" or "val" split, as WindowDataset/compute_stats take them."""
    time_range, samples = getattr(cfg.data, f"{split}_range"), getattr(cfg.data, f"{split}_samples")
    return {"time_range": tuple(time_range) if time_range else None,
            "sample_range": tuple(samples) if samples else None}


def _dataset(cfg: TrainConfig, url: str, stats: NormStats, split: str, *, shuffle: bool,
             stride: int) -> WindowDataset:
    d = cfg.data
    return WindowDataset(
        url, d.channels, d.sequence_length + 1, stride=stride, **split_of(cfg, split), coarsen=d.coarsen,
        stats=stats, dims=dims_of(cfg), storage_options=d.storage_options or None, shuffle=shuffle,
        seed=cfg.run.seed, batch_size=d.batch_size,
    )


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().cpu().clone()
    dist.all_reduce(value)
    return value.item() / dist.get_world_size()


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Train per `loop_config` = {config, url, stats, steps_per_epoch, val_batches, mlflow_uri, mlflow_run_id,
    resume_from, hooks}; report a checkpoint at every validation and at the end."""
    cfg = config_from_dict(loop_config["config"])
    stats = NormStats(**loop_config["stats"])
    hooks = loop_config.get("hooks") or {}
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    bf16 = cfg.parallel.precision == "bf16" or (cfg.parallel.precision == "auto" and on_gpu)
    dtype = torch.bfloat16 if bf16 else torch.float32

    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    train_ds = _dataset(cfg, loop_config["url"], stats, "train", shuffle=True, stride=cfg.data.stride)
    val_ds = _dataset(cfg, loop_config["url"], stats, "val", shuffle=False,
                      stride=cfg.data.sequence_length + 1)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=cfg.data.batch_size, drop_last=True,
                                         num_workers=cfg.data.loader_workers)
    m = cfg.model
    model = build_model(m.arch, len(stats.channels), m.hidden_sizes, padding=m.padding, norm=m.norm,
                        grid=train_ds.grid, tanh_encoder=m.tanh_encoder, scan_method=m.scan_method,
                        chunk_size=m.chunk_size)
    steps_per_epoch = loop_config["steps_per_epoch"]
    total_opt_steps = max(1, cfg.optim.epochs * steps_per_epoch // cfg.optim.grad_accum)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_opt_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, bf16))

    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    resume = ray.train.get_checkpoint() or (
        ray.train.Checkpoint(loop_config["resume_from"]) if loop_config.get("resume_from") else None)
    if resume is not None:
        with resume.as_directory() as directory:
            saved = checkpoint.restore(engine, directory, rank=rank)
        position = {k: saved[k] for k in position}
        if rank == 0:
            print(f"[minconv] resumed at epoch {position['epoch']} step {position['global_step']}", flush=True)

    logger = MetricLogger(loop_config["mlflow_uri"], loop_config["mlflow_run_id"]) if rank == 0 else None
    stats_json = json.dumps(asdict(stats))
    T = cfg.data.sequence_length
    stop_at = cfg.run.stop_after_steps
    last_step = cfg.optim.epochs * steps_per_epoch

    def validate_and_report(train_loss: float, final: bool) -> None:
        """Validation loss + forecast plot, then a checkpoint every rank writes and reports (collective)."""
        engine.eval()
        val_ds.load_state_dict({**val_ds.state_dict(), "position": 0})
        k = cfg.data.teacher_steps
        total = torch.zeros(())
        with torch.no_grad():
            for i, x in enumerate(val_ds):
                if i == loop_config["val_batches"] * cfg.data.batch_size:
                    break
                x = x.unsqueeze(0).to(device)
                pred = engine(x[:, :T].to(dtype), teacher_steps=k).float()
                total += F.mse_loss(pred, x[:, 1:]).cpu()
                if i == 0 and logger is not None and cfg.tracking.plot:
                    denorm = stats.denormalize
                    logger.plot_forecast(denorm(x[0, 1:].cpu())[:, 0], denorm(pred[0].cpu())[:, 0],
                                         position["global_step"], stats.channels[0])
        val_loss = _mean_over_ranks(total / (loop_config["val_batches"] * cfg.data.batch_size))
        engine.train()
        metrics = {"epoch": position["epoch"], "step": position["global_step"], "train_loss": train_loss,
                   "val_loss": val_loss, "final": int(final)}
        local = Path(tempfile.mkdtemp(prefix="minconv-ckpt-"))
        try:
            checkpoint.save(engine, local, rank=rank, world_size=world,
                            position={**position, "mlflow_run_id": loop_config["mlflow_run_id"]},
                            stats_json=stats_json, config=cfg.to_dict())
            if logger is not None:
                logger.log({"val_loss": val_loss}, position["global_step"])
                print(f"[minconv] step {position['global_step']}/{last_step} val_loss {val_loss:.5f}", flush=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(local)))
        finally:
            shutil.rmtree(local, ignore_errors=True)

    train_loss = float("nan")
    while position["epoch"] < cfg.optim.epochs:
        epoch = position["epoch"]
        k = teacher_steps_at(cfg, epoch)
        train_ds.set_epoch(epoch)
        train_ds.load_state_dict({**train_ds.state_dict(), "epoch": epoch,
                                  "position": position["step_in_epoch"] * cfg.data.batch_size})
        batches = iter(loader)
        epoch_sum, epoch_n = 0.0, 0
        tick = time.perf_counter()
        for _ in range(position["step_in_epoch"], steps_per_epoch):
            x = next(batches).to(device)
            inputs = x[:, :T]
            if cfg.data.input_noise:
                inputs = inputs + cfg.data.input_noise * torch.randn_like(inputs)
            pred = engine(inputs.to(dtype), teacher_steps=k)
            loss = F.mse_loss(pred.float(), x[:, 1:])
            if hooks.get("nan_at_step") == position["global_step"] + 1:
                loss = loss * float("nan")
            train_loss = _mean_over_ranks(loss)
            if not math.isfinite(train_loss):
                raise NonFiniteLossError(
                    f"non-finite training loss ({train_loss}) at epoch {epoch}, step {position['global_step'] + 1}; "
                    "the run stops and keeps its last good checkpoint (lower optim.lr, or set optim.grad_clip)"
                )
            engine.backward(loss)
            engine.step()
            position["step_in_epoch"] += 1
            position["global_step"] += 1
            epoch_sum, epoch_n = epoch_sum + train_loss, epoch_n + 1
            step = position["global_step"]
            if step == hooks.get("kill_at_step") and rank == world - 1 and not os.path.exists(hooks["kill_marker"]):
                Path(hooks["kill_marker"]).touch()
                os._exit(1)  # test-only: a worker dies mid-epoch
            if logger is not None and step % cfg.tracking.log_every == 0:
                elapsed = (time.perf_counter() - tick) / cfg.tracking.log_every
                tick = time.perf_counter()
                rss = psutil.Process().memory_info().rss / 2**20
                metrics = {"train_loss": train_loss, "lr": engine.get_lr()[0], "time_per_step_s": elapsed,
                           "samples_per_s": cfg.data.batch_size * world / elapsed, "memory_rss_mb": rss,
                           "teacher_steps": k}
                if on_gpu:
                    metrics["gpu_memory_max_mb"] = torch.cuda.max_memory_allocated() / 2**20
                logger.log(metrics, step)
                print(f"[minconv] epoch {epoch} step {step}/{last_step} loss {train_loss:.5f} "
                      f"{metrics['samples_per_s']:.1f} samples/s", flush=True)
            if position["step_in_epoch"] == steps_per_epoch:
                position["epoch"], position["step_in_epoch"] = epoch + 1, 0
            if step == last_step or step == stop_at:
                validate_and_report(train_loss, final=True)
                return
            if step % cfg.checkpoint.val_every == 0:
                validate_and_report(train_loss, final=False)
        if logger is not None and epoch_n:
            logger.log({"epoch_train_loss": epoch_sum / epoch_n, "epoch": epoch}, position["global_step"])
