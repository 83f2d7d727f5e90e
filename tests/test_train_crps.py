"""Training with an ensemble loss (`loss.kind: crps`, docs/training.md "The loss"): the almost-fair CRPS against
hand computations from its formula and WeatherBench2's fair CRPS, its gradient, the config's refusals, and steps
and validations of M members on an in-process DeepSpeed engine (gloo, world size 1). No Ray session."""
from __future__ import annotations

import subprocess
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import xarray as xr

from minconv_dist.evaluate import crps
from minconv_dist.train import ConfigError, load_config
from minconv_dist.train.losses import WeightedAFCRPS, afcrps, loss_weights, training_loss
from minconv_dist.train.loop import normalized_mse, train_step, validate
from tests.test_train_step import batches, engine_for, process_group  # noqa: F401 - the gloo group fixture

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]
POLES = [90.0, 45.0, 0.0, -45.0, -90.0]  # descending, with pole rows
# cell edges by hand: halfway between rows, and the poles; each pole row gets the half-cell up to +-67.5
UPPER, LOWER = np.array([90, 67.5, 22.5, -22.5, -67.5]), np.array([67.5, 22.5, -22.5, -67.5, -90])
AREA = np.sin(np.deg2rad(UPPER)) - np.sin(np.deg2rad(LOWER))
TWO = ["geopotential@500", "temperature@850"]
CRPS = ["loss.kind=crps", "loss.members=3", "data.input_noise=0.1"]


def config(*overrides: str):
    return load_config(overrides=["data.sequence_length=3", "data.teacher_steps=2", *CRPS, *overrides])


def hand_afcrps(x: np.ndarray, y: float, alpha: float) -> float:
    """The formula, term by term: mean_j |x_j - y| - (1 - eps) / (2 M (M - 1)) sum_{j,k} |x_j - x_k|."""
    M = len(x)
    eps = (1 - alpha) / M
    pairs = sum(abs(x[j] - x[k]) for j in range(M) for k in range(M))
    return sum(abs(x[j] - y) for j in range(M)) / M - (1 - eps) / (2 * M * (M - 1)) * pairs


def test_weighted_afcrps_equals_a_hand_computation_with_pole_rows():
    """M = 3 members, 2 windows, T = 3 (k = 2: leads 1 1 2, weighted 1 and 2), channels weighted 1 : 3, area
    weights of rows at the poles; the MSE logged beside it is the ensemble mean's."""
    M, B, T, C, H, W = 3, 2, 3, 2, 5, 4
    cfg = config(f"data.channels={TWO}", "loss.variable_weights={temperature: 3}", "loss.lead_weights=[1, 2]")
    weights = loss_weights(cfg, POLES, "the test grid")
    loss = training_loss(cfg, weights)
    assert isinstance(loss, WeightedAFCRPS) and (loss.members, loss.alpha) == (3, 0.95)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(M * B, T, C, H, W, generator=g), torch.randn(B, T, C, H, W, generator=g)
    got, mse = loss(pred, target, 2)
    p, y = pred.double().numpy().reshape(M, B, T, C, H, W), target.double().numpy()  # member-major
    lead, channel, area = np.array([1, 1, 2]) / (4 / 3), np.array([1, 3]) / 2, AREA / AREA.mean()

    def hand(alpha: float) -> float:
        return sum(lead[t] * channel[c] * area[i] * hand_afcrps(p[:, b, t, c, i, j], y[b, t, c, i, j], alpha)
                   for b, t, c, i, j in product(range(B), range(T), range(C), range(H), range(W))) / (B * T * C * H * W)

    assert got.item() == pytest.approx(hand(0.95), rel=1e-6)
    assert got.item() != pytest.approx(hand(1.0), rel=1e-6)  # the fair CRPS differs by more than the tolerance
    assert mse.item() == pytest.approx(((p.mean(axis=0) - y) ** 2).mean(), rel=1e-6)
    assert mse.item() != pytest.approx(((p[0] - y) ** 2).mean(), rel=1e-6)  # not member 0's


def test_fair_afcrps_of_area_weighted_frames_is_weatherbench2s_crps():
    """alpha = 1, one channel, uniform leads: the loss is the evaluation's CRPS (WeatherBench2's fair estimator,
    area-weighted per init time, then averaged), with the window's frames as init times."""
    M, B, T, H, W = 4, 2, 3, 5, 4
    cfg = config("data.channels=[z]", f"loss.members={M}", "loss.alpha=1")
    weights = loss_weights(cfg, POLES, "x")
    loss = training_loss(cfg, weights)
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(M * B, T, 1, H, W, generator=g), torch.randn(B, T, 1, H, W, generator=g)
    got, _ = loss(pred, target, 2)
    coords = {"time": pd.date_range("2020", periods=B * T, freq="h"), "latitude": POLES}
    forecast = xr.DataArray(pred[:, :, 0].double().numpy().reshape(M, B * T, H, W),
                            dims=("realization", "time", "latitude", "longitude"), coords=coords)
    truth = xr.DataArray(target[:, :, 0].double().numpy().reshape(B * T, H, W),
                         dims=("time", "latitude", "longitude"), coords=coords)
    assert got.item() == pytest.approx(float(crps(forecast, truth)), rel=1e-6)
    almost, _ = WeightedAFCRPS(weights, T, M, 0.95)(pred, target, 2)  # alpha < 1 fails the same tolerance
    assert almost.item() != pytest.approx(float(crps(forecast, truth)), rel=1e-6)


def test_two_members_closed_forms_and_the_sorted_pair_sum():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 1000, generator=g), torch.randn(1000, generator=g)  # fp32, as afcrps computes
    a, b, t = (v.double() for v in (x[0], x[1], y))
    skill = ((a - t).abs() + (b - t).abs()) / 2
    torch.testing.assert_close(afcrps(x, y, 1.0).double(), skill - (a - b).abs() / 2, rtol=1e-6, atol=1e-6)
    # alpha -> 0: the standard ensemble CRPS, spread term 1 / (2 M²) = 1/8 of the pair sum 2 |x1 - x2|
    torch.testing.assert_close(afcrps(x, y, 0.0).double(), skill - (a - b).abs() / 4, rtol=1e-6, atol=1e-6)
    # the fair score of two members bracketing the truth is 0 however far apart they are; alpha < 1 is not
    bracket = torch.tensor([[-1.0, -10.0], [2.0, 10.0]])
    assert afcrps(bracket, torch.zeros(2), 1.0).tolist() == [0.0, 0.0]
    assert (afcrps(bracket, torch.zeros(2), 0.95) > 0).all() and afcrps(bracket, torch.zeros(2), 0.95).diff().item() > 0
    # M = 5 with ties: the sorted form of the pair sum against the pairs, one by one
    members = torch.randint(-3, 4, (5, 200), generator=g).double()
    target = torch.randn(200, generator=g, dtype=torch.float64)
    for alpha in (0.3, 0.95, 1.0):
        hand = torch.tensor([hand_afcrps(members[:, n].tolist(), target[n].item(), alpha) for n in range(200)],
                            dtype=torch.float64)
        torch.testing.assert_close(afcrps(members, target, alpha).double(), hand, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"^loss.members: got 1, expected >= 2"):
        afcrps(members[:1], target, 0.95)


def test_the_gradient_reaches_every_member_as_the_pairwise_formula_gives_it():
    """Through the sort: autograd of `WeightedAFCRPS` equals autograd of the pairwise sum (no sort), for each
    member; every member's gradient is nonzero."""
    M, B, T = 3, 2, 3
    cfg = config("data.channels=[z]", "loss.lead_weights=[1, 3]")
    loss = training_loss(cfg, loss_weights(cfg, POLES, "x"))
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(M * B, T, 1, 5, 4, generator=g, requires_grad=True)
    target = torch.randn(B, T, 1, 5, 4, generator=g)
    loss(pred, target, 2)[0].backward()
    x = pred.detach().clone().requires_grad_()
    members, eps = x.unflatten(0, (M, B)), 0.05 / M
    pairs = (members.unsqueeze(0) - members.unsqueeze(1)).abs().sum(dim=(0, 1))
    pointwise = (members - target).abs().mean(dim=0) - (1 - eps) / (2 * M * (M - 1)) * pairs
    loss.weighted_mean(pointwise, 2).backward()
    torch.testing.assert_close(pred.grad, x.grad, rtol=1e-5, atol=1e-9)
    per_member = pred.grad.unflatten(0, (M, B)).abs().flatten(1).sum(dim=1)
    assert (per_member > 0).all(), per_member
    with pytest.raises(AssertionError):  # the members' gradients in another order fail the same tolerance
        torch.testing.assert_close(pred.grad.roll(B, dims=0), x.grad, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("overrides, match", [
    (["loss.kind=crps", "data.input_noise=0.1"], r"^loss.members: got None, expected an int >= 2 with "
                                                 r"loss.kind='crps' \(the ensemble's size\)$"),
    (["loss.kind=crps", "loss.members=1", "data.input_noise=0.1"], r"^loss.members: got 1, expected >= 2$"),
    (["loss.kind=crps", "loss.members=4"], r"^data.input_noise: got 0.0, expected > 0 with loss.kind='crps': "),
    (["loss.kind=ensemble"], r"^loss.kind: got 'ensemble', expected one of \['mse', 'crps'\]$"),
    (["loss.members=4"], r"^loss.members: got 4, expected null with loss.kind='mse' "),
    (["loss.kind=crps", "loss.members=4", "data.input_noise=0.1", "loss.alpha=0"], r"^loss.alpha: got 0.0, "
                                                                                   r"expected > 0$"),
    (["loss.kind=crps", "loss.members=4", "data.input_noise=0.1", "loss.alpha=1.5"], r"^loss.alpha: got 1.5, "
                                                                                     r"expected <= 1$"),
])
def test_bad_ensemble_settings_are_refused_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(overrides=overrides)
    assert "\n" not in str(err.value)


def test_the_job_refuses_one_member_in_one_line():
    out = subprocess.run([sys.executable, "jobs/train_era5.py", "--set", "loss.kind=crps", "--set", "loss.members=1",
                          "--set", "data.input_noise=0.1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr == "error: loss.members: got 1, expected >= 2\n", out.stderr


def crps_engine(stage: int):
    """The test engine (minconvgru, z, 8 x 8 grid) with a 3-member AFCRPS loss on 8 latitude rows, T = 6, k = 4."""
    overrides = ["data.sequence_length=6", "data.teacher_steps=4", "data.channels=[z]", *CRPS]
    engine = engine_for(stage, "fp32", 1e-2, *overrides)
    cfg = load_config(overrides=overrides)
    weights = loss_weights(cfg, np.linspace(78.75, -78.75, 8), "x")
    return engine, training_loss(cfg, weights, engine.device), weights


@pytest.mark.parametrize("stage", [0, 3])
def test_a_crps_training_step_on_the_engine(stage, process_group):  # noqa: F811
    engine, loss, weights = crps_engine(stage)
    assert weights.description == ("almost-fair CRPS (AFCRPS) of 3 members (input noise 0.1), alpha 0.95: area "
                                   "(cell-area weights of 8 latitude rows); channels uniform; uniform leads")
    x = batches(1)[0].to(engine.device)
    with torch.no_grad():  # M members of each window: distinct (own noise), from torch's default generator
        torch.manual_seed(5)
        value, mse, pred = normalized_mse(engine, x, 4, 0.1, loss=loss)
        torch.manual_seed(5)
        again = normalized_mse(engine, x, 4, 0.1, loss=loss)
        torch.manual_seed(6)
        other = normalized_mse(engine, x, 4, 0.1, loss=loss)
    assert pred.shape == (3 * 2, 6, 1, 8, 8)
    assert all(not torch.equal(pred[0], pred[2 * m]) for m in (1, 2))
    assert torch.equal(value, again[0]) and torch.equal(pred, again[2]) and not torch.equal(pred, other[2])
    normalize = engine.module.normalizer.normalize
    members = normalize(pred).unflatten(0, (3, 2))
    torch.testing.assert_close(mse, F.mse_loss(members.mean(dim=0), normalize(x[:, 1:])), rtol=1e-6, atol=0)
    before = [p.detach().clone() for p in engine.module.parameters()]
    losses = [train_step(engine, b.to(engine.device), 4, 0.1, loss=loss) for b in batches(3)]
    assert all(torch.isfinite(v) and torch.isfinite(m) for v, m in losses)
    if stage == 0:  # ZeRO-3 partitions the module's parameters
        assert any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))


def test_validation_draws_the_same_members_each_time_and_leaves_trainings_random_stream(process_group):  # noqa: F811
    engine, loss, _ = crps_engine(0)
    state = torch.get_rng_state()
    first = validate(engine, batches(2), 2, 4, engine.device, loss=loss, input_noise=0.1, seed=0)
    second = validate(engine, batches(2), 2, 4, engine.device, loss=loss, input_noise=0.1, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert first[:2] == second[:2]
    degenerate = validate(engine, batches(2), 2, 4, engine.device, loss=loss)  # identical members: the weighted MAE
    assert first[0] != pytest.approx(degenerate[0], rel=1e-3)
