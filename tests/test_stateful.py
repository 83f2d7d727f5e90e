"""Stateful truncated training (`data.stateful`): the streams' order over ranks and loader workers, the carry (used,
without gradient, the state after the true frames), ZeRO 0-3 in one process, exact resume and restart under Ray,
and the configurations it refuses.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minconv_dist.data import NormStats, WindowDataset, open_store, write_synthetic_era5
from minconv_dist.models import build_model, check_weights, load_model_file
from minconv_dist.train import ConfigError, fit, load_config
from minconv_dist.train.carry import Carry
from minconv_dist.train.datasets import window_dataset
from minconv_dist.train.engine import build_engine
from minconv_dist.train.loop import train_step
from minconv_dist.train.safe_files import torch_load
from tests.test_train_step import process_group  # noqa: F401 - a fixture (its teardown forgets DeepSpeed's world)

pytestmark = pytest.mark.timeout(600)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the callback below reaches the Ray workers

T = 5  # frames a window predicts; the dataset's windows hold T + 1


def stateful_windows(store: str, rank: int = 0, world_size: int = 2, streams: int = 2, **kwargs) -> WindowDataset:
    return WindowDataset(store, "z", T + 1, stride=T, rank=rank, world_size=world_size, batch_size=streams, seed=3,
                         stateful=True, **kwargs)


def batches_of(ds: WindowDataset, workers: int) -> list[torch.Tensor]:
    """The batches [B, T + 1, C, H, W] in the order a DataLoader of `workers` delivers them."""
    return list(DataLoader(ds, batch_size=ds.batch_size, num_workers=workers))


def first_frames(batches: list[torch.Tensor], lookup: dict[bytes, int]) -> np.ndarray:
    """[steps, B]: the store time index of each window's first frame."""
    return np.array([[lookup[w[0, 0].numpy().tobytes()] for w in b] for b in batches])


@pytest.fixture(scope="module")
def lookup(tiny_store) -> dict[bytes, int]:
    return {f.tobytes(): i for i, f in enumerate(open_store(tiny_store).z.values)}


# ---- the order ----

@pytest.mark.parametrize("workers", [0, 1, 2])
def test_each_stream_walks_its_own_stretch_in_time_order(tiny_store, lookup, workers):
    """2 ranks x 2 streams: batch n's element j is the window after batch n-1's (its first frame is the other's
    last), each stream a contiguous stretch of L windows, the 4 stretches disjoint and together one contiguous run
    of the series that leaves out only the N - 4L spare windows; the same with 0, 1 or 2 loader workers."""
    n = (240 - (T + 1)) // T + 1  # the tiny store's 240 hourly frames
    per_stream, offsets = n // 4, set()
    for epoch in range(4):
        stretches = []
        for rank in range(2):
            ds = stateful_windows(tiny_store, rank)
            ds.set_epoch(epoch)
            got = batches_of(ds, workers)
            assert [len(b) for b in got] == [2] * per_stream, "every batch holds one window of each stream"
            starts = first_frames(got, lookup)
            assert starts.shape == (per_stream, 2) and len(ds) == starts.size
            assert (np.diff(starts, axis=0) == T).all(), f"rank {rank}: a stream skipped or reordered a window"
            for before, after in zip(got, got[1:]):  # the frame a window predicts last is the next one's first
                assert torch.equal(before[:, -1], after[:, 0])
            stretches += list(starts.T)
        firsts = sorted(s[0] for s in stretches)
        assert [s[0] for s in stretches] == firsts, "streams in (rank, stream) order walk the series in order"
        covered = np.concatenate(stretches)
        assert len(set(covered.tolist())) == covered.size == 4 * per_stream  # disjoint
        assert (np.diff(np.sort(covered)) == T).all()  # contiguous: no window between two stretches is left out
        offsets.add(firsts[0] // T)
    assert offsets <= set(range(n - 4 * per_stream + 1)) and len(offsets) > 1, offsets  # seeded, varies by epoch


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_exactly_the_next_batches(tiny_store, workers):
    ds = stateful_windows(tiny_store, rank=1)
    ds.set_epoch(2)
    whole = batches_of(ds, workers)
    resumed = stateful_windows(tiny_store, rank=1)
    resumed.load_state_dict({**ds.state_dict(), "epoch": 2, "position": 3 * ds.batch_size})  # after 3 steps
    resumed.set_epoch(2)
    rest = batches_of(resumed, workers)
    assert len(rest) == len(whole) - 3 and all(torch.equal(a, b) for a, b in zip(rest, whole[3:]))


def test_validation_windows_stay_stateless(tiny_store):

    cfg = load_config(overrides=[f"data.url={tiny_store}", "data.channels=[z]", "data.train_range=null",
                                 "data.val_range=null", "data.sequence_length=5", "data.teacher_steps=4", "data.stride=5",
                                 "data.batch_size=2", "data.stateful=true"])
    stats = NormStats(channels=["z"], mean=[0.0], std=[1.0])
    train, val = (window_dataset(cfg, tiny_store, stats, split, rank=0, world_size=1) for split in ("train", "val"))
    assert train.stateful and not val.stateful and not val.shuffle


# ---- the carry ----

def tiny_model(arch: str = "minconvgru") -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(arch, ["z"], 4, 2, padding="circular", grid=(8, 8))
    model.normalizer.set_stats([0.5], [2.0])
    return model


def windows(n: int, frames: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, frames, 1, 8, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch", ["minconvgru", "minconvlstm", "convlstm"])
@pytest.mark.parametrize("k", [4, 6])
def test_the_carry_is_used_and_no_gradient_flows_through_it(arch, k):
    """The loss of window 2 started from window 1's carry: its gradient with respect to window 1's inputs is exactly
    zero, while the same state kept in the graph (the probe's control) gives a non-zero one; and the carry changes
    the predictions, so it is not ignored."""
    model = tiny_model(arch)
    previous, (current, target) = windows(1)[0].requires_grad_(), windows(2)
    _, carry = model(previous, teacher_steps=k, return_carry=True)
    loss = lambda state: ((model(current, teacher_steps=k, state=state) - target) ** 2).mean()  # noqa: E731
    with_carry = loss(carry)
    (grad,) = torch.autograd.grad(with_carry, previous, allow_unused=True, materialize_grads=True)
    assert torch.equal(grad, torch.zeros_like(previous))
    _, attached = model.warm_states(previous, [], None)  # the same state, its graph kept
    (leak,) = torch.autograd.grad(loss(attached), previous)
    assert leak.abs().max() > 1e-3 * leak.numel() ** -0.5 * with_carry.detach(), "the probe sees no gradient"
    with torch.no_grad():  # untrained weights forget fast: the carry moves the predictions by 3-18% of their spread
        used, fresh = model(current, teacher_steps=k, state=carry), model(current, teacher_steps=k)
    assert (used - fresh).pow(2).mean().sqrt() > 1e-2 * fresh.std(), "the carry does not change the predictions"


@pytest.mark.parametrize("arch", ["minconvgru", "convlstm"])
def test_the_carry_is_the_state_after_the_true_frames(arch):
    """With k < T the closed loop reads predictions of frames k..T-1; the carry is the state after the frames
    themselves, read teacher-forced from the window's starting state: bit-equal to `warm_states` over them; and two
    windows chained by the carry read teacher-forced predict what one window of both does."""
    model = tiny_model(arch)
    first, second = windows(2)
    with torch.no_grad():
        start = model.warm_states(windows(3)[2], [])[1]
        _, carry = model(first, teacher_steps=3, state=start, return_carry=True)
        _, expected = model.warm_states(first, [2], start)
        for got, want in zip(carry, expected):
            for a, b in zip(*(s if isinstance(s, tuple) else (s,) for s in (got, want))):
                assert torch.equal(a, b)
        _, carry = model(first, return_carry=True)
        chained = model(second, state=carry)
        whole = model(torch.cat([first, second], dim=1))[:, 6:]
    torch.testing.assert_close(chained, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


# ---- training steps, ZeRO 0-3 in one process ----

def test_train_steps_carry_the_state_under_every_zero_stage(process_group):
    """Three stateful steps per ZeRO stage (the engine hands the carry through, detached): the same losses and carry
    as ZeRO-0, up to the order of ZeRO's gradient reductions."""
    results = {}
    for stage in range(4):
        cfg = load_config(overrides=["data.batch_size=2", f"parallel.zero_stage={stage}", "parallel.precision=fp32",
                                     "optim.lr=1e-2", "optim.warmup_steps=0", "optim.grad_clip=0"])
        engine = build_engine(cfg, tiny_model(), total_steps=10, device=torch.device("cpu"))
        carry, losses = Carry(), []
        for x in windows(3, frames=7):
            losses.append(train_step(engine, x, 4, 0.0, carry=carry)[0].item())
            assert all(not s.requires_grad for s in carry.state)
        results[stage] = losses, carry.state
    losses0, state0 = results[0]
    for losses, state in results.values():
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(losses0), rtol=1e-4, atol=0)
        for a, b in zip(state, state0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


# ---- training under Ray: exact resume and restart ----

class KillLastWorker:
    """Ends the last rank's process just before global step `step`, once (a marker file remembers)."""

    def __init__(self, step: int, marker: Path):
        self.step, self.marker = step, marker

    def __call__(self, engine, step: int, rank: int) -> None:
        if step == self.step and rank == engine.world_size - 1 and not self.marker.exists():
            self.marker.touch()
            os._exit(1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("store") / "era5.zarr")
    write_synthetic_era5(path, start="2015-01-01", end="2015-02-10", nlat=16, nlon=32)
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("train")


def stateful_run(store: str, workdir: Path, name: str, *overrides: str):
    """2 workers x 2 streams, 2 loader workers each, 3 steps per epoch, 2 epochs, a checkpoint every 2 steps (so
    step 2 is mid-epoch: its carry is what step 3 starts from), a closed loop (k < T) and an EMA."""
    return load_config(overrides=[
        f"data.url={store}", "data.channels=[z]", "data.train_range=[2015-01-01, 2015-01-31]",
        "data.val_range=[2015-02-01, 2015-02-09]", "data.coarsen=2", "data.sequence_length=6", "data.teacher_steps=4",
        "data.stride=6", "data.batch_size=2", "data.loader_workers=2", "data.stateful=true",
        "model.hidden_size=4", "model.layers=2", "optim.epochs=2", "optim.steps_per_epoch=3", "optim.lr=5e-3",
        "optim.warmup_steps=1", "checkpoint.val_every=2", "checkpoint.val_batches=1", "tracking.log_every=1",
        "tracking.plot=false", f"tracking.uri=sqlite:///{workdir}/mlflow.db", "tracking.registered_model=",
        f"run.name={name}", f"run.storage_path={workdir}/runs", "parallel.max_failures=1", "optim.ema_decay=0.5",
        *overrides])


def saved_carry(result, rank: int) -> list:
    return torch_load(f"{result.checkpoint}/carry_rank{rank}.pt", "carry")["state"]


def assert_same_run(result, reference) -> None:
    """Bit-equal exported (EMA) and raw weights, and each rank's carry."""
    check_weights(load_model_file(f"{result.checkpoint}/model.pt"), load_model_file(f"{reference.checkpoint}/model.pt"))
    raw = [torch_load(f"{r.checkpoint}/ds/mp_rank_00_model_states.pt", "module")["module"] for r in (result, reference)]
    for key, value in raw[1].items():
        assert torch.equal(raw[0][key], value), f"raw {key}"
    for rank in range(2):
        got, expected = saved_carry(result, rank), saved_carry(reference, rank)
        assert expected and all(torch.equal(a, b) for a, b in zip(got, expected)), f"carry of rank {rank}"


@pytest.fixture(scope="module")
def reference(store, workdir, ray_session):
    return fit(stateful_run(store, workdir, "whole"))


@pytest.mark.slow
def test_resume_continues_the_streams_exactly(store, workdir, reference):
    """Stopped after step 2 (mid-epoch), then --resume: the weights, their EMA and each rank's carry are those of
    the uninterrupted run."""
    fit(stateful_run(store, workdir, "stopped", "run.stop_after_steps=2"))
    resumed = fit(stateful_run(store, workdir, "ignored"), resume="stopped")
    assert_same_run(resumed, reference)


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_recovers_the_streams_exactly(store, workdir, reference, tmp_path):
    marker = tmp_path / "killed"
    result = fit(stateful_run(store, workdir, "killed"), callbacks=[KillLastWorker(3, marker)])
    assert marker.exists(), "the hook did not kill a worker"
    assert_same_run(result, reference)


# ---- refused ----

@pytest.mark.parametrize("override, key", [
    (["data.stride=5"], "data.stride"),
    (["data.nan_policy=skip"], "data.nan_policy"),
    (["data.dims.sample=sample", "data.train_samples=[0, 4]", "data.val_samples=[4, 6]"], "data.dims.sample"),
    (["parallel.sequence_parallel=2"], "parallel.sequence_parallel"),
    (["loss.kind=crps", "loss.members=2", "data.input_noise=0.1"], "loss.kind"),
])
def test_what_cannot_work_is_refused_in_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["data.stateful=true", "data.sequence_length=6", "data.teacher_steps=4",
                               "data.stride=6", *override])
    message = str(err.value)
    assert message.startswith(f"{key}: ") and "data.stateful=true" in message and "\n" not in message
    load_config(overrides=["data.sequence_length=6", "data.teacher_steps=4", "data.stride=6", *override])  # allowed
