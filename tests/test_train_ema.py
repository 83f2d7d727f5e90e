"""The EMA of the weights (`train/ema.py`) on 2 spawned gloo ranks through the worker loop's own pieces
(build_engine: DeepSpeed, train_step, master_weights): at every ZeRO stage and precision it is the EMA of the fp32
masters (a hand loop over what `master_weights` exports after each optimizer step), the exported weights are it,
validation computes with it, and the raw weights come back bit for bit afterwards."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from minconv_dist.models import build_model
from minconv_dist.train.checkpoint import master_weights
from minconv_dist.train.ema import WeightEMA
from minconv_dist.train.local_ray import free_port
from minconv_dist.train.loop import train_step, validate
from tests.spawned import leave
from tests.test_train_step import batches, engine_for

DECAY = 0.8
MICRO_STEPS = 4


def module_weights(engine) -> list[torch.Tensor]:
    """The module's own (bf16 or fp32) weights, whole (gathered under ZeRO-3; collective then)."""
    from deepspeed.runtime.zero import GatheredParameters

    params = list(engine.module.parameters())
    with GatheredParameters(params):
        return [p.detach().clone() for p in params]


def masters_of(engine, ema: WeightEMA | None = None) -> dict[str, torch.Tensor] | None:
    """A copy of what `master_weights` exports (on the CPU it returns the live tensors); collective."""
    weights = master_weights(engine, ema)
    return None if weights is None else {name: w.clone() for name, w in weights.items()}


def ema_of(snapshots: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    """The EMA by hand, in float64, of the masters after each optimizer step (snapshots[0]: the initial ones)."""
    average = {name: w.double() for name, w in snapshots[0].items()}
    for masters in snapshots[1:]:
        average = {name: decay * a + (1 - decay) * masters[name].double() for name, a in average.items()}
    return average


def check_case(rank: int, stage: int, precision: str, grad_accum: int) -> None:
    case = f"ZeRO-{stage} {precision} grad_accum {grad_accum} rank {rank}"
    engine = engine_for(stage, precision, 3e-3, f"optim.grad_accum={grad_accum}")
    names = [n for n, _ in engine.module.named_parameters()]
    ema = WeightEMA(engine, DECAY)
    snapshots = [masters_of(engine)]  # collective under ZeRO; a dict on rank 0 only
    for x in batches(MICRO_STEPS):
        before = engine.global_steps
        train_step(engine, x.to(engine.device), 4, 0.0, ema=ema)
        if engine.global_steps != before:
            snapshots.append(masters_of(engine))
    assert engine.global_steps == ema.steps == MICRO_STEPS // grad_accum, case
    exported, raw = masters_of(engine, ema), masters_of(engine)
    if rank == 0:
        hand, other = ema_of(snapshots, DECAY), ema_of(snapshots, DECAY + 0.01)
        for name in names:
            scale = hand[name].abs().max().item()  # fp32 rounding of a few updates: ~1e-7 of the weight's scale
            torch.testing.assert_close(exported[name].double(), hand[name], rtol=0, atol=1e-6 * scale,
                                       msg=f"{case} {name}")
        # the tolerance tells decays apart, and the EMA is not the raw weights
        assert any(not torch.allclose(exported[n].double(), other[n], rtol=0, atol=1e-6 * hand[n].abs().max().item())
                   for n in names), case
        assert any((exported[n] - raw[n]).abs().max() > 1e-3 * raw[n].abs().max() for n in names), case
        assert set(exported) == set(raw) and all(torch.equal(exported[k], raw[k]) for k in raw if k not in names)
    own, dtype = module_weights(engine), next(engine.module.parameters()).dtype
    with ema.applied():
        inside = module_weights(engine)
        val_ema = validate(engine, batches(2), 2, 4, engine.device)[0]
    assert all(torch.equal(a, b) for a, b in zip(module_weights(engine), own)), f"{case}: raw weights not restored"
    val_raw = validate(engine, batches(2), 2, 4, engine.device)[0]
    masters = masters_of(engine)
    if rank == 0:
        assert all(torch.equal(masters[n], raw[n]) for n in names), f"{case}: masters touched"
        for name, w in zip(names, inside):
            assert torch.equal(w, exported[name].to(dtype).view_as(w)), f"{case} {name}: validation's weights"
        assert val_ema != val_raw, case
        if precision == "fp32":  # validation's loss is the one of a plain network holding the exported EMA
            network = build_model("minconvgru", ["z"], 4, 2, padding="circular", grid=(8, 8))
            network.load_state_dict(exported)
            normalize = network.normalizer.normalize
            with torch.no_grad():
                plain = sum(F.mse_loss(normalize(network(x[:, :-1], teacher_steps=4)), normalize(x[:, 1:])).item()
                            for x in batches(2)) / 2
            assert val_ema == pytest.approx(plain, rel=1e-5), case
    parts = torch.tensor(sum(t.numel() for t in ema.state_dict().values()))
    dist.all_reduce(parts)  # what the ranks' checkpoints hold together
    whole = sum(w.numel() for w in own)
    if stage == 0:
        assert parts.item() == 2 * whole, case  # whole on each rank
    else:  # each parameter once; ZeRO-3 pads a parameter to a multiple of the world size
        assert whole <= parts.item() <= whole + (stage == 3) * len(own), case


def _worker(rank: int, world: int, port: int, cases: list[tuple[int, str, int]]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for case in cases:
            check_case(rank, *case)
    finally:
        dist.destroy_process_group()
    leave()


@pytest.mark.timeout(600)
def test_ema_of_the_fp32_masters_at_zero_0():
    """Whole on every rank: the module's fp32 weights (fp32, bf16-mixed), or the bf16 optimizer's fp32 copies; with
    gradient accumulation the EMA moves once per optimizer step."""
    mp.spawn(_worker, args=(2, free_port(), [(0, "fp32", 2), (0, "bf16", 1), (0, "bf16-mixed", 1)]), nprocs=2,
             join=True)


@pytest.mark.timeout(600)
def test_ema_of_the_sharded_fp32_masters_at_zero_1_to_3():
    """Each rank keeps the EMA of its shard; export and validation assemble it."""
    cases = [(1, "bf16", 1), (2, "fp32", 1), (2, "bf16-mixed", 1), (3, "bf16", 1), (3, "bf16-mixed", 1)]
    mp.spawn(_worker, args=(2, free_port(), cases), nprocs=2, join=True)
