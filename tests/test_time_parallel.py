"""Time parallelism (parallel.sequence_parallel) is exact: S gloo ranks that split each window in time, through
the worker loop's own pieces (device_mesh, TimeSplit, build_network, build_engine: DeepSpeed, normalized_mse),
give the gradients and, after one optimizer step, the weights of one process training the chunked model on the
whole windows; ConvLSTM and ConvGRU refuse a split.
"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from minconv_dist.data import NormStats
from minconv_dist.models import build_model
from minconv_dist.train import ConfigError, load_config
from minconv_dist.train.datasets import build_network
from minconv_dist.train.engine import build_engine
from minconv_dist.train.local_ray import free_port
from minconv_dist.train.loop import normalized_mse
from minconv_dist.train.time_parallel import TimeSplit, device_mesh
from tests.spawned import leave

T, K, B, GRID = 7, 5, 2, (8, 8)  # 5 teacher-forced frames (split 2 / 3 over 2 ranks), then 2 closed-loop steps
STATS = NormStats(["u", "v"], [0.5, -1.0], [2.0, 0.5])
MIN_CELLS = ("minconvgru", "minconvlstm", "minconvexplstm")


FORCINGS = ["toa_insolation", "longitude"]  # 3 forcing channels
STATIC = np.linspace(0.0, 3e4, GRID[0] * GRID[1], dtype=np.float32).reshape(1, *GRID)  # an orography


def windows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n raw windows [n, T + 1, 2, H, W] and forcings for them [n, T + 1, 3, H, W], the same in every process."""
    g = torch.Generator().manual_seed(7)
    return (torch.tensor(STATS.mean).view(2, 1, 1) + 2 * torch.randn(n, T + 1, 2, *GRID, generator=g),
            torch.randn(n, T + 1, 3, *GRID, generator=g))


def config(arch: str, world: int, S: int, stage: int, chunk: int | None, k: int = K, inputs: bool = False):
    return load_config(overrides=[*([f"data.forcings={FORCINGS}", "data.static=[orography]"] if inputs else []),
        f"model.arch={arch}", "model.hidden_size=4", "model.layers=2", "model.padding=circular",
        f"model.chunk_size={'null' if chunk is None else chunk}", f"data.sequence_length={T}",
        f"data.teacher_steps={k}", f"data.batch_size={B}", f"parallel.num_workers={world}",
        f"parallel.sequence_parallel={S}", f"parallel.zero_stage={stage}", "parallel.precision=fp32",
        "optim.lr=1e-2", "optim.warmup_steps=0", "optim.grad_clip=0.05", "optim.weight_decay=0.01"])


def reference_step(model: torch.nn.Module, x: torch.Tensor, cfg, forcings: torch.Tensor | None
                   ) -> dict[str, torch.Tensor]:
    """One process, whole windows x [D B, T + 1, ...]: the loss, its gradients, clipping and AdamW as the engine
    is configured (warm-up 0: the first step's learning rate is optim.lr). Returns the gradients."""
    normalize = model.normalizer.normalize
    pred = model(x[:, :-1], teacher_steps=cfg.data.teacher_steps, forcings=None if forcings is None else forcings[:, :-1])
    F.mse_loss(normalize(pred), normalize(x[:, 1:])).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
    o = cfg.optim
    torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay).step()
    return grads


def _worker(rank: int, world: int, S: int, port: int, cases: list[tuple[str, int, int | None, int, bool]]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from deepspeed.utils import safe_get_full_grad

        mesh = device_mesh(world, S, "cpu")
        time = TimeSplit.of(mesh, T)
        assert dist.get_process_group_ranks(time.group) == list(range(rank - time.index, rank - time.index + S))
        D, d = world // S, mesh.get_local_rank("data")
        x, f = windows(D * B)
        for arch, stage, chunk, k, inputs in cases:
            cfg = config(arch, world, S, stage, chunk, k, inputs)
            first, stop = time.frames(k)
            mine = x[d * B:(d + 1) * B, first:stop]  # what this rank's WindowDataset(frames=...) yields
            forcings = f[d * B:(d + 1) * B, first:stop] if inputs else None
            torch.manual_seed(0)
            model = build_network(cfg, STATS, GRID, STATIC if inputs else None)
            reference = copy.deepcopy(model)
            engine = build_engine(cfg, model, total_steps=10, device=torch.device("cpu"))
            loss, _, _ = normalized_mse(engine, mine, k, time=time, forcings=forcings)
            engine.backward(loss)
            grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
            engine.step()
            expected = reference_step(reference, x, cfg, f if inputs else None)
            case = f"{arch} ZeRO-{stage} chunk {chunk} k {k} forcings and static {inputs} rank {rank}"
            for name, p in reference.named_parameters():
                torch.testing.assert_close(grads[name], expected[name], rtol=1e-4, atol=1e-7, msg=f"{case} {name}")
                # AdamW's first step moves a weight by lr g / (|g| + 1e-8): for a gradient element near 1e-6,
                # fp32 rounding of g shows at lr x 1e-3 (the step itself moves every weight by about lr = 1e-2)
                torch.testing.assert_close(engine.module.state_dict()[name], p.detach(), rtol=1e-5, atol=2e-5,
                                           msg=f"{case} {name} after the step")
        for arch in ("convlstm", "convgru"):  # the model refuses too, before any collective
            with pytest.raises(ValueError, match="Cell reads h_"):
                build_model(arch, STATS.channels, 4, 2, grid=GRID)(mine[:, :-1], time_group=time.group)
    finally:
        dist.destroy_process_group()
    leave()


@pytest.mark.timeout(300)
def test_two_time_ranks_equal_one_process():
    """S = 2, D = 1: the three Min cells, chunked inside each rank (chunks of 2 frames) and whole; ZeRO-0,
    ZeRO-2 and ZeRO-3 (which shard over both time ranks; without a closed loop, see the config check); and a
    model reading forcings (each rank its frames', the closed loop the last rank's) and a static field."""
    cases = [(arch, 0, 2, K, False) for arch in MIN_CELLS] + [
        ("minconvgru", 0, None, K, False), ("minconvlstm", 2, 2, K, False), ("minconvexplstm", 3, 2, T, False),
        ("minconvgru", 2, 2, K, True)]
    mp.spawn(_worker, args=(2, 2, free_port(), cases), nprocs=2, join=True)


@pytest.mark.timeout(300)
def test_two_data_ranks_of_two_time_ranks_equal_one_process():
    """S = 2, D = 2: the gradient averaged over data and time ranks is the one of the global batch."""
    mp.spawn(_worker, args=(4, 2, free_port(), [("minconvgru", 1, 2, K, False)]), nprocs=4, join=True)


@pytest.mark.parametrize("arch", ["convlstm", "convgru"])
def test_sequential_cells_refuse_a_time_split(arch):
    with pytest.raises(ConfigError, match=rf"parallel.sequence_parallel: got 2, expected 1 for model.arch='{arch}'"):
        config(arch, 2, 2, 0, None)


def test_zero3_refuses_a_closed_loop_on_one_time_rank():
    with pytest.raises(ConfigError, match="parallel.zero_stage: got 3, expected 0, 1 or 2 with parallel.sequence_para"):
        config("minconvgru", 2, 2, 3, None)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_job_with_two_time_ranks_trains_as_one_worker(tiny_store, tmp_path):
    """The whole job (driver checks, Ray Train, the worker loop with its mesh and time-block windows, DeepSpeed,
    validation, checkpoints) with sequence_parallel=2 on 2 CPU workers logs the losses and ends with the weights
    of the same job on 1 worker; the loss is area- and lead-weighted, each rank weighing its own predictions."""
    import mlflow
    import ray

    from minconv_dist.models import check_weights, load_model_file
    from minconv_dist.train import fit

    def job(name: str, *overrides: str):
        cfg = load_config(overrides=[
            f"data.url={tiny_store}", "data.channels=[z]", "data.train_range=[2015-01-01, 2015-01-07]",
            "data.val_range=[2015-01-08, 2015-01-10]", "data.sequence_length=6", "data.teacher_steps=4",
            "data.stride=6", "data.batch_size=2", "model.hidden_size=4", "model.layers=2", "model.chunk_size=1",
            "optim.epochs=1", "optim.steps_per_epoch=3", "optim.warmup_steps=1", "optim.lr=5e-3",
            "checkpoint.val_every=3", "checkpoint.val_batches=1", "tracking.log_every=1", "tracking.plot=false",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "tracking.registered_model=", f"run.name={name}",
            f"run.storage_path={tmp_path}/runs", "parallel.max_failures=0", "loss.lead_weights=[1, 2, 3]", *overrides])
        result = fit(cfg)
        history = mlflow.tracking.MlflowClient(result.mlflow_uri).get_metric_history(result.mlflow_run_id,
                                                                                       "train_loss")
        losses = [m.value for m in sorted(history, key=lambda m: m.step)]
        return losses, result.metrics["val_loss"], load_model_file(f"{result.checkpoint}/model.pt")

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a stale address file
    try:
        split = job("split", "parallel.num_workers=2", "parallel.sequence_parallel=2")
        whole = job("whole", "parallel.num_workers=1")
    finally:
        ray.shutdown()
    assert len(split[0]) == 3
    torch.testing.assert_close(torch.tensor(split[0]), torch.tensor(whole[0]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(split[1], whole[1], rtol=1e-5, atol=1e-7)
    # AdamW's first steps divide by |gradient|: where a gradient nearly cancels, fp32 rounding of the two orders of
    # summation moves a weight by up to ~2e-5. The norms' biases start at 0 and three steps of lr 5e-3 take them
    # to ~1e-2 (their whole scale), so that is 1.4e-3 of a bias's own scale (measured); a wrong time block would
    # differ by the size of the steps, O(1) of it. Buffers are copied: exact.
    check_weights(split[2], whole[2], rel_tol=1e-2)
