"""`worker_loop`: what every Ray Train worker runs. DeepSpeed owns the model; the loss is the paper's, weighted.

Loss: a window x holds T + 1 raw frames [B, T+1, C, H, W]. The model reads x[:, :T] with teacher_steps = k
(frames 0..k-1 teacher-forced, then T - k closed-loop steps) and its T outputs are compared with
x[:, 1:T+1] by mean squared error over all frames, channels and grid points, in the units of the model's
normaliser, weighted per latitude row, channel and lead as `loss.*` says (`train/losses.py`; uniform weights:
the paper's plain MSE, which is logged beside it as train_mse / val_mse). With `loss.kind: crps` each window is
read by M members, each with its own input noise, and the loss is their almost-fair CRPS (train_mse / val_mse:
the MSE of the ensemble mean; validation draws its noise from a generator seeded afresh each time). With
`parallel.sequence_parallel` = S > 1 each rank holds one time block of the window and its share of that loss
(`train/time_parallel.py`). With `data.forcings` the loader gives each window's forcings [B, T+1, F, H, W] beside
it, and the model reads frame t (or, in the closed loop, its prediction of frame t) with the forcings of frame t.
With `optim.ema_decay`, validation and the checkpoints' model.pt use the EMA of the weights (`train/ema.py`).
With `data.stateful` each window starts from the state its stream's window before ended in (`train/carry.py`),
reset at each epoch's start and saved with every checkpoint; validation stays stateless.

A step queues its work on the device and returns: losses stay on the device (`LossMeter`), and the host
reads them only on log, validation and epoch-end steps, where the ranks reduce them in one collective.
"""
from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack, nullcontext
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import psutil
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import Tensor

from minconv_dist.data import NormStats
from minconv_dist.train import checkpoint, preemption
from minconv_dist.train.carry import Carry
from minconv_dist.train.config import TrainConfig, build_config
from minconv_dist.train.datasets import build_network, window_dataset
from minconv_dist.train.ema import WeightEMA
from minconv_dist.train.engine import build_engine
from minconv_dist.train.losses import PLAIN_MSE, LossWeights, WeightedMSE, training_loss
from minconv_dist.train.meter import LossMeter
from minconv_dist.train.metric_logger import MetricLogger
from minconv_dist.train.spool import Spool, spool_dir
from minconv_dist.train.time_parallel import TimeSplit, device_mesh


class StepCallback(Protocol):
    """Called by every rank before each training micro-step, with the 1-based global step about to run
    (tests use it to inject faults: a killed worker, diverged weights)."""

    def __call__(self, engine: Any, step: int, rank: int) -> None: ...


def teacher_steps_at(cfg: TrainConfig, epoch: int) -> int:
    """k for this epoch. With a curriculum the closed loop T - k grows from 1 to its final length."""
    T, k = cfg.data.sequence_length, cfg.data.teacher_steps
    closed = T - k
    if cfg.optim.curriculum_epochs and closed > 1:
        closed = min(closed, 1 + (closed - 1) * epoch // cfg.optim.curriculum_epochs)
    return T - closed


def next_checkpoint(cfg: TrainConfig, done: int, last_step: int) -> int:
    """The step of the first checkpoint after step `done`: the next validation, the last step or the early stop."""
    stop = cfg.run.stop_after_steps
    return min((done // cfg.checkpoint.val_every + 1) * cfg.checkpoint.val_every, last_step,
               *([stop] if stop and stop > done else []))


def on_device(batch: Tensor | list[Tensor], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """A loader batch on `device`: the windows [B, T+1, C, H, W], and their forcings [B, T+1, F, H, W] (None
    when the run has none: the loader then yields the windows alone)."""
    x, forcings = (batch, None) if isinstance(batch, Tensor) else batch
    return x.to(device, non_blocking=True), None if forcings is None else forcings.to(device, non_blocking=True)


def normalized_mse(engine: Any, x: Tensor, teacher_steps: int, input_noise: float = 0.0,
                   time: TimeSplit | None = None, forcings: Tensor | None = None, loss: WeightedMSE | None = None,
                   generator: torch.Generator | None = None, carry: Carry | None = None
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The loss of x: [B, T+1, C, H, W] (raw): MSE of the T predictions against the next frames, both
    normalised by the model's own statistics, weighted by `loss` (None: plain); the plain MSE (detached); and the
    predictions [M·B, T, C, H, W]. With M = `loss.members` > 1 the inputs are repeated M times along B, member-major,
    before the noise, so each member gets its own. Input noise is in normalised units too, drawn from `generator`
    (None: torch's default, whose state the checkpoints keep). time: x is this rank's block
    `time.frames(teacher_steps)` of the window, and the losses its share. forcings: those of x's frames
    [B, T+1, F, H, W] (None without forcings). carry: the window starts from `carry.state`, which then becomes the
    state after its T input frames (stateful training)."""
    normalize, loss = engine.module.normalizer.normalize, loss or PLAIN_MSE
    inputs, members = x[:, :-1], loss.members
    if members > 1:
        inputs = inputs.repeat(members, *(1,) * (inputs.ndim - 1))
        forcings = None if forcings is None else forcings.repeat(members, *(1,) * (forcings.ndim - 1))
    if input_noise:
        noise = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype, device=inputs.device)
        inputs = inputs + input_noise * engine.module.normalizer.std.view(-1, 1, 1) * noise
    k, group, weight, first = teacher_steps, None, 1.0, 0
    if time is not None:
        first, stop = time.teacher_frames(teacher_steps)
        k, group, weight = stop - first, time.group, time.share(inputs.shape[1])
    forcings = None if forcings is None else forcings[:, :-1]
    if carry is None:
        pred = engine(inputs, teacher_steps=k, time_group=group, forcings=forcings)
    else:
        pred, carry.state = engine(inputs, teacher_steps=k, forcings=forcings, state=carry.state, return_carry=True)
    value, mse = loss(normalize(pred), normalize(x[:, 1:]), teacher_steps, first)
    return value * weight, mse * weight, pred


def train_step(engine: Any, x: Tensor, teacher_steps: int, input_noise: float, time: TimeSplit | None = None,
               forcings: Tensor | None = None, loss: WeightedMSE | None = None, ema: WeightEMA | None = None,
               carry: Carry | None = None) -> tuple[Tensor, Tensor]:
    """One forward, backward and optimizer step on x: [B, T+1, C, H, W] (or this rank's block of it, `time`)
    and its forcings, from and updating `carry` (stateful), then the `ema` update; returns the (weighted) loss and
    the plain MSE, on the device."""
    value, mse, _ = normalized_mse(engine, x, teacher_steps, input_noise, time, forcings, loss, carry=carry)
    engine.backward(value)
    engine.step()
    if ema is not None:
        ema.step()
    return value.detach(), mse


def validate(engine: Any, loader: torch.utils.data.DataLoader, batches: int, teacher_steps: int,
             device: torch.device, time: TimeSplit | None = None, loss: WeightedMSE | None = None,
             input_noise: float = 0.0, seed: int = 0) -> tuple[float, float, tuple[Tensor, Tensor]]:
    """Mean validation loss and plain MSE over `batches` batches of every rank (collective), and rank-local
    (truth, forecast) of the first window (its time block, `time`; member 0), [T, C, H, W] each in physical
    units, for a plot. input_noise: an ensemble's perturbations, drawn from a generator seeded with `seed` + rank
    at each call, so every validation sees the same members and training's random stream is left as it was."""
    engine.eval()
    total = torch.zeros(2, device=device)
    generator = torch.Generator(device=device).manual_seed(seed + dist.get_rank()) if input_noise else None
    with torch.no_grad():
        for i, batch in enumerate(islice(loader, batches)):
            x, forcings = on_device(batch, device)
            value, mse, pred = normalized_mse(engine, x, teacher_steps, input_noise, time, forcings, loss, generator)
            total += torch.stack([value, mse])
            if i == 0:
                first = (x[0, 1:], pred[0])
    dist.all_reduce(total)
    engine.train()
    val_loss, val_mse = (value / (batches * dist.get_world_size()) for value in total.tolist())
    return val_loss, val_mse, first


class Progress:
    """Rank 0's log lines and metrics: throughput over the steps since the last log (not reset by epochs)."""

    def __init__(self, logger: MetricLogger | None, samples_per_step: int, last_step: int, first_step: int):
        self.logger, self.samples_per_step, self.last_step = logger, samples_per_step, last_step
        self.tick, self.tick_step = time.perf_counter(), first_step

    def restart_clock(self, step: int) -> None:
        """After a validation: its time is not training time."""
        self.tick, self.tick_step = time.perf_counter(), step

    def log_step(self, step: int, epoch: int, loss: float, mse: float, lr: float, teacher_steps: int) -> None:
        now = time.perf_counter()
        seconds = (now - self.tick) / (step - self.tick_step)
        self.restart_clock(step)
        if self.logger is None:
            return
        metrics = {"train_loss": loss, "train_mse": mse, "lr": lr, "time_per_step_s": seconds,
                   "samples_per_s": self.samples_per_step / seconds, "teacher_steps": teacher_steps,
                   "memory_rss_mb": psutil.Process().memory_info().rss / 2**20}
        if torch.cuda.is_available():
            metrics["gpu_memory_max_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.logger.log(metrics, step)
        print(f"[minconv] epoch {epoch} step {step}/{self.last_step} loss {loss:.5f} "
              f"{metrics['samples_per_s']:.1f} samples/s", flush=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.logger is not None:
            self.logger.log(metrics, step)

    def log_validation(self, step: int, val_loss: float, val_mse: float) -> None:
        if self.logger is not None:
            self.logger.log({"val_loss": val_loss, "val_mse": val_mse}, step)
            print(f"[minconv] step {step}/{self.last_step} val_loss {val_loss:.5f}", flush=True)


def restore(engine: Any, meter: LossMeter, resume_from: str | None, run_dir: str, rank: int,
            device: torch.device, ema: WeightEMA | None, carry: Carry | None) -> dict[str, int]:
    """The position to continue from: the newest verified checkpoint of the run (Ray's after a worker restart unless
    Ray is behind or its does not verify; `--resume`'s), else the start. Rank 0 chooses (`checkpoint.usable`) and
    every rank restores that one, its EMA of the weights and its carry included."""
    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    given = ray.train.get_checkpoint()
    candidate = f"{run_dir}/{PurePosixPath(given.path).name}" if given else resume_from
    chosen = [checkpoint.usable(candidate, run_dir) if rank == 0 else None]
    dist.broadcast_object_list(chosen, src=0, device=device)
    if chosen[0] is None:
        return position
    with ray.train.Checkpoint(chosen[0]).as_directory() as directory:
        saved = checkpoint.restore(engine, directory, rank=rank, label=PurePosixPath(chosen[0]).name, ema=ema,
                                   carry=carry)
    if rank == 0:  # the epoch's loss sum so far is global: one rank carries it
        meter.load(saved.get("epoch_loss_total", 0.0), saved.get("epoch_loss_count", 0.0))
        print(f"[minconv] resumed at epoch {saved['epoch']} step {saved['global_step']}", flush=True)
    return {k: saved[k] for k in position}


def worker_loop(loop_config: dict[str, Any]) -> None:
    """Train per `loop_config` = {config, url, stats, static, loss_weights, steps_per_epoch, val_batches,
    mlflow_uri, mlflow_run_id, resume_from, run_dir, callbacks}; report a checkpoint at every validation and at
    the end."""
    with ExitStack() as closing:  # rank 0's logger is closed (its queue written out) also when training fails
        _train(loop_config, closing)


def metric_logger(cfg: TrainConfig, loop_config: dict[str, Any]) -> MetricLogger:
    """Rank 0's logger into the run; it spools beside the run directory while the server does not answer."""
    uri, run_id = loop_config["mlflow_uri"], loop_config["mlflow_run_id"]
    return MetricLogger(uri, run_id, Spool(spool_dir(loop_config["run_dir"]), uri, run_id),
                        timeout_s=cfg.tracking.timeout_s, retry_every_s=cfg.tracking.retry_every_s)


def _train(loop_config: dict[str, Any], closing: ExitStack) -> None:
    cfg, stats = build_config(loop_config["config"]), NormStats(**loop_config["stats"])
    callbacks: list[StepCallback] = loop_config.get("callbacks") or []
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    d, S = cfg.data, cfg.parallel.sequence_parallel
    mesh = device_mesh(world, S, device.type)  # windows are sharded over "data"; "time" splits each window
    time = TimeSplit.of(mesh, d.sequence_length) if S > 1 else None
    train_ds, val_ds = (window_dataset(cfg, loop_config["url"], stats, split, rank=mesh.get_local_rank("data"),
                                       world_size=world // S,
                                       frames=None if time is None else time.frames(d.teacher_steps))
                        for split in ("train", "val"))
    # each loader draws its iterators' base seed from a generator of its own, not from torch's default one: the
    # input noise's stream then holds the noise alone, and a resume (whose extra validation and mid-epoch iterator
    # would otherwise draw from it) continues it exactly. The windows' order has its own seeds (data/windows.py).
    train_loader, val_loader = (
        torch.utils.data.DataLoader(ds, batch_size=d.batch_size, drop_last=True, pin_memory=device.type == "cuda",
                                    num_workers=d.loader_workers if ds is train_ds else 0,
                                    generator=torch.Generator().manual_seed(cfg.run.seed))
        for ds in (train_ds, val_ds))
    torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
    steps_per_epoch = loop_config["steps_per_epoch"]
    last_step = cfg.optim.epochs * steps_per_epoch
    engine = build_engine(cfg, build_network(cfg, stats, train_ds.grid, loop_config.get("static")), last_step,
                          device)
    loss = training_loss(cfg, LossWeights(**loop_config["loss_weights"]), device)
    val_noise = d.input_noise if loss.members > 1 else 0.0  # an ensemble is validated as one
    ema = WeightEMA(engine, cfg.optim.ema_decay) if cfg.optim.ema_decay else None
    carry = Carry() if d.stateful else None
    meter, mse_meter = LossMeter(device), LossMeter(device)  # the loss as trained, and the plain MSE beside it
    position = restore(engine, meter, loop_config.get("resume_from"), loop_config["run_dir"], rank, device, ema,
                       carry)
    logger = closing.enter_context(metric_logger(cfg, loop_config)) if rank == 0 else None
    progress = Progress(logger, d.batch_size * world // S, last_step, position["global_step"])
    guard = preemption.Guard(cfg.checkpoint.preemption_grace_s, rank, position["global_step"])
    while position["epoch"] < cfg.optim.epochs:
        epoch, k = position["epoch"], teacher_steps_at(cfg, position["epoch"])
        train_ds.set_epoch(epoch)
        train_ds.load_state_dict({**train_ds.state_dict(), "epoch": epoch,
                                  "position": position["step_in_epoch"] * d.batch_size})
        for batch in islice(train_loader, steps_per_epoch - position["step_in_epoch"]):
            step = position["global_step"] + 1
            for callback in callbacks:
                callback(engine, step, rank)
            guard.check(step - 1, next_checkpoint(cfg, step - 1, last_step))  # after SIGTERM: stay, or leave
            x, forcings = on_device(batch, device)
            if carry is not None and position["step_in_epoch"] == 0:
                carry.reset()  # each epoch's first batch starts every stream's stretch (WindowDataset.streams)
            value, mse = train_step(engine, x, k, d.input_noise, time, forcings, loss, ema, carry)
            meter.update(value, step)
            mse_meter.update(mse, step)
            position["step_in_epoch"], position["global_step"] = position["step_in_epoch"] + 1, step
            if step % cfg.tracking.log_every == 0:  # collective; raises on a non-finite loss
                progress.log_step(step, epoch, meter.summary()["last"], mse_meter.summary()["last"],
                                  engine.get_lr()[0], k)
            if position["step_in_epoch"] == steps_per_epoch:
                progress.log({"epoch_train_loss": meter.summary()["epoch_mean"], "epoch": epoch}, step)
                meter.start_epoch()
                position["epoch"], position["step_in_epoch"] = epoch + 1, 0
            final = step in (last_step, cfg.run.stop_after_steps)
            if final or step % cfg.checkpoint.val_every == 0:
                guard.begin_checkpoint()
                summary = meter.summary()  # never checkpoint weights that a non-finite loss has touched
                # every validation reads the same first windows, in a resumed or restarted run too (an
                # in-process dataset otherwise goes on from where the last validation's islice stopped)
                val_ds.load_state_dict({**val_ds.state_dict(), "position": 0})
                with ema.applied() if ema is not None else nullcontext():  # validate the EMA weights
                    val_loss, val_mse, (truth, forecast) = validate(engine, val_loader, loop_config["val_batches"],
                                                                    d.teacher_steps, device, time, loss,
                                                                    val_noise, cfg.run.seed)
                progress.log_validation(step, val_loss, val_mse)
                if logger is not None and cfg.tracking.plot:
                    logger.plot_forecast(truth[:, 0].cpu(), forecast[:, 0].cpu(), step, stats.channels[0])
                saved = {**position, "finished": bool(step == last_step), "epoch_loss_total": summary["epoch_total"],
                         "epoch_loss_count": summary["epoch_count"], "mlflow_run_id": loop_config["mlflow_run_id"]}
                if logger is not None:  # a worker restarted from this checkpoint must find the steps before it
                    logger.flush()
                report(engine, rank, world, saved, cfg, ema, {
                    "epoch": position["epoch"], "step": step, "train_loss": summary["last"],
                    "train_mse": mse_meter.summary()["last"], "val_loss": val_loss, "val_mse": val_mse,
                    "final": int(final)}, loop_config["run_dir"], carry)
                progress.restart_clock(step)
                guard.checkpointed(step)  # after SIGTERM: leave now that the checkpoint is written
            if final:
                return


def report(engine: Any, rank: int, world: int, position: dict[str, Any], cfg: TrainConfig, ema: WeightEMA | None,
           metrics: dict[str, float], run_dir: str, carry: Carry | None = None) -> None:
    """Write this rank's part of a checkpoint into a fresh local folder and report it to Ray (collective). A write
    or upload that fails (a full disk) is a `StorageError`, which ends the run without Ray's retries."""
    try:
        with tempfile.TemporaryDirectory(prefix="minconv-ckpt-", ignore_cleanup_errors=True) as local:
            checkpoint.save(engine, Path(local), rank=rank, world_size=world, position=position, config=cfg.to_dict(),
                            ema=ema, carry=carry)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(local))
    except OSError as err:
        raise checkpoint.write_failure(err, run_dir, position["global_step"]) from err
