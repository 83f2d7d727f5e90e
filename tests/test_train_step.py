"""The worker loop's pieces on one in-process DeepSpeed engine (gloo, world size 1): that its steps are plain
torch's, where collectives get their tensors, that a step never syncs with the host, and that the exported weights
are the fp32 masters.
"""
from __future__ import annotations

import copy
import glob

import pytest
import torch
import torch.distributed as dist
from deepspeed.comm import comm as ds_comm

from minconv_dist.models import build_model
from minconv_dist.models.network import residual_norm
from minconv_dist.train import load_config
from minconv_dist.train.checkpoint import master_weights
from minconv_dist.train.engine import build_engine, lr_lambda
from minconv_dist.train.loop import normalized_mse, train_step, validate
from minconv_dist.train.local_ray import free_port
from minconv_dist.train.meter import LossMeter, NonFiniteLossError

pytestmark = pytest.mark.timeout(300)
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "reduce", "all_to_all_single")


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A one-rank gloo group for this module only (DeepSpeed needs one), torn down afterwards through DeepSpeed,
    which then also forgets the clone of the world it cached: left behind, that clone made the next module's
    engines fail with "Group ... is not registered" (test_checkpoint_files, then this module, in one session)."""
    assert not dist.is_initialized()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        store = tmp_path_factory.mktemp("pg") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        yield
        if ds_comm.cdb is not None:  # DeepSpeed's comm was set up by an engine
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()


@pytest.fixture
def collective_devices(monkeypatch):
    """Every tensor any code (ours or DeepSpeed's) hands to a torch.distributed collective, by device."""
    seen: list[torch.device] = []

    def spy(name):
        real = getattr(dist, name)

        def wrapper(*args, **kwargs):
            for arg in (*args, *kwargs.values()):
                for t in arg if isinstance(arg, (list, tuple)) else [arg]:
                    if isinstance(t, torch.Tensor):
                        seen.append(t.device)
            return real(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, spy(name))
    return seen


def engine_for(stage: int, precision: str, lr: float = 1e-2, *overrides: str):
    cfg = load_config(overrides=["data.batch_size=2", f"parallel.zero_stage={stage}",
                                 f"parallel.precision={precision}", f"optim.lr={lr}", "optim.warmup_steps=0",
                                 "optim.grad_clip=0", *overrides])
    return build_engine(cfg, tiny_model(), total_steps=10, device=torch.device("cpu"))


def tiny_model() -> torch.nn.Module:
    """A 2-layer MinConvGRU on an 8x8 grid, its weights from seed 0."""
    torch.manual_seed(0)
    model = build_model("minconvgru", ["z"], 4, 2, padding="circular", grid=(8, 8))
    model.normalizer.set_stats([0.5], [2.0])
    return model


def batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 7, 1, 8, 8, generator=g) for _ in range(n)]


class Bare(torch.nn.Module):
    """What `normalized_mse` needs of an engine, around a plain module: calling it, and `.module`."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_one_rank_engine_steps_as_plain_torch(stage, process_group):
    """In a world of one rank the engine takes the steps of a plain loop: AdamW, the same warm-up schedule,
    clipping by the global norm. Three steps' updates agree to 1e-4 of their size (fp32;
    reduction order); a 1% larger learning rate in the plain loop is about 100 times further off."""
    cfg = load_config(overrides=["data.batch_size=2", f"parallel.zero_stage={stage}", "parallel.precision=fp32",
                                 "optim.lr=1e-2", "optim.warmup_steps=2", "optim.grad_clip=0.05"])
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    plain = Bare(copy.deepcopy(model))
    o = cfg.optim
    optimizer = torch.optim.AdamW(plain.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, 10))
    engine = build_engine(cfg, model, total_steps=10, device=torch.device("cpu"))
    norms = []
    for x in batches(3):
        train_step(engine, x, 4, 0.0)
        loss, _, _ = normalized_mse(plain, x, 4)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(plain.parameters(), o.grad_clip)))
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    assert min(norms) > o.grad_clip  # every step was clipped
    got = {n: p.detach() for n, p in engine.module.named_parameters()}
    for n, p in plain.module.named_parameters():
        update = (p.detach() - start[n]).abs().max()
        assert update > 0, n
        torch.testing.assert_close(got[n] - start[n], p.detach() - start[n], rtol=0, atol=1e-4 * float(update))


@pytest.mark.parametrize("stage", [0, 3])
def test_every_collective_gets_tensors_on_the_model_device(stage, process_group, collective_devices):
    """What broke the first GPU run: a loss moved to the CPU before an NCCL all_reduce."""
    engine = engine_for(stage, "fp32")
    meter = LossMeter(engine.device)
    for step, x in enumerate(batches(3), 1):
        meter.update(train_step(engine, x.to(engine.device), 4, 0.0)[0], step)
    meter.summary()
    validate(engine, batches(2), 2, 4, engine.device)
    master_weights(engine)
    assert collective_devices, "no collective was called: the spy is not wired"
    assert set(collective_devices) == {engine.device}


class Stop(Exception):
    pass


def test_meter_stays_on_its_device_and_never_syncs(monkeypatch):
    """On the meta device any host read (`.item()`, `bool()`) raises: `update` must make none, and `summary`
    must hand meta tensors, not CPU copies, to its collective."""
    meter = LossMeter(torch.device("meta"))
    for step in range(1, 4):
        meter.update(torch.empty((), device="meta"), step)
    seen = []

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Stop

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Stop):
        meter.summary()
    assert seen == [torch.device("meta")]


def test_meter_names_the_first_non_finite_step_and_averages_the_epoch():
    meter = LossMeter(torch.device("cpu"))
    for step, value in enumerate([1.0, 3.0], 1):
        meter.update(torch.tensor(value), step)
    assert meter.summary() == {"last": 3.0, "epoch_mean": 2.0, "epoch_total": 4.0, "epoch_count": 2.0}
    meter.update(torch.tensor(float("nan")), 3)
    meter.update(torch.tensor(float("inf")), 4)
    with pytest.raises(NonFiniteLossError, match="non-finite training loss at step 3"):
        meter.summary()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_exported_weights_are_the_fp32_masters(stage, process_group, tmp_path):
    """bf16 training keeps bf16 copies in the module and fp32 masters in the optimizer: the model file must
    get the masters (for ZeRO 1-3 checked against DeepSpeed's own offline consolidation of the checkpoint)."""
    engine = engine_for(stage, "bf16", lr=3e-3)
    for x in batches(3):
        train_step(engine, x.to(engine.device), 4, 0.0)
    exported = master_weights(engine)
    names = [n for n, _ in engine.module.named_parameters()]
    assert set(names) <= set(exported) and all(exported[n].dtype == torch.float32 for n in names)
    # the masters are not bf16 numbers: a bf16-rounded copy would be
    assert any(not torch.equal(exported[n], exported[n].bfloat16().float()) for n in names)
    if stage == 0:  # the module's bf16 weights are the masters rounded (no ZeRO checkpoint to consolidate)
        for n, p in engine.module.named_parameters():
            assert torch.equal(exported[n].bfloat16(), p.detach().cpu()), n
        return
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine.save_checkpoint(str(tmp_path), tag="t")
    assert glob.glob(f"{tmp_path}/t/*optim_states.pt")
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path), tag="t")
    for n in names:
        assert torch.equal(exported[n], reference[n].float()), n


def test_fused_residual_norm_trains_as_the_eager_network(process_group):
    """model.fuse_norm: the network built for training compiles its residual add + post-norm; three steps on a
    DeepSpeed engine give the losses and weights of the eager network (fp32, up to reduction order)."""
    from minconv_dist.data import NormStats
    from minconv_dist.train.datasets import build_network

    runs = {}
    for fuse in (False, True):
        cfg = load_config(overrides=["data.batch_size=2", "parallel.precision=fp32", "optim.warmup_steps=0",
                                     "model.hidden_size=4", "model.layers=2", f"model.fuse_norm={str(fuse).lower()}"])
        torch.manual_seed(0)
        model = build_network(cfg, NormStats(["z"], [0.5], [2.0]), (8, 8))
        assert (model.residual_norm is not residual_norm) == fuse
        engine = build_engine(cfg, model, total_steps=10, device=torch.device("cpu"))
        losses = [train_step(engine, x, 4, 0.0)[0].item() for x in batches(3)]
        runs[fuse] = losses, {k: v.clone() for k, v in engine.module.state_dict().items()}
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(runs[True][1], runs[False][1], rtol=1e-4, atol=1e-6)
