"""The weighted training loss (`train/losses.py`, docs/training.md "The loss"): area weights against a hand
computation and the evaluation's own area mean, variable / level / lead weights through the gradient, a time
split's shares, the run's latitudes, and the checks that refuse bad weights naming the key. No Ray session."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from minconv_dist.data.grid import cell_area_weights
from minconv_dist.evaluate import mse_per_time, open_channels
from minconv_dist.train import ConfigError, fit, load_config
from minconv_dist.train.losses import WeightedMSE, lead_of_predictions, loss_weights
from minconv_dist.train.trainer import _check_data

ROOT = Path(__file__).resolve().parents[1]
POLES = [90.0, 45.0, 0.0, -45.0, -90.0]  # descending, with pole rows
# cell edges by hand: halfway between rows, and the poles; each pole row gets the half-cell up to +-67.5
UPPER, LOWER = np.array([90, 67.5, 22.5, -22.5, -67.5]), np.array([67.5, 22.5, -22.5, -67.5, -90])
POLES_AREA = np.sin(np.deg2rad(UPPER)) - np.sin(np.deg2rad(LOWER))
TWO = ["geopotential@500", "temperature@850"]


def config(*overrides: str):
    return load_config(overrides=["data.sequence_length=3", "data.teacher_steps=2", *overrides])


def pair(shape, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def grad_of(loss: WeightedMSE, pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    pred = pred.clone().requires_grad_()
    loss(pred, target, k)[0].backward()
    return pred.grad


def test_area_weighted_loss_equals_a_hand_computation_with_pole_rows():
    weights = loss_weights(config(), POLES, "the test grid")
    np.testing.assert_allclose(weights.rows, POLES_AREA / POLES_AREA.mean(), rtol=1e-12)
    assert weights.rows[0] > 0 and weights.description.startswith("weighted normalised MSE: area")
    pred, target = pair((2, 3, 1, 5, 4))
    got, mse = WeightedMSE(weights, 3)(pred, target, 2)
    p, t = pred.double().numpy(), target.double().numpy()
    hand = sum(POLES_AREA[i] / POLES_AREA.mean() * (p[b, s, 0, i, j] - t[b, s, 0, i, j]) ** 2
               for b in range(2) for s in range(3) for i in range(5) for j in range(4)) / (2 * 3 * 5 * 4)
    assert got.item() == pytest.approx(hand, rel=1e-6)
    assert mse.item() == pytest.approx(((p - t) ** 2).mean(), rel=1e-6)  # the plain MSE, logged beside it
    # the evaluation's area mean (WeatherBench2) of the same squared errors, frame by frame, gives the same loss
    errors = xr.DataArray((p - t)[:, :, 0].reshape(6, 5, 4), dims=("time", "latitude", "longitude"),
                          coords={"time": pd.date_range("2020", periods=6, freq="h"), "latitude": POLES})
    assert got.item() == pytest.approx(float(mse_per_time(errors, 0 * errors).mean()), rel=1e-6)
    # cos(latitude) weights (WeatherBench v1: zero at the poles) differ by more than the tolerance
    cos = np.cos(np.deg2rad(POLES)) / np.cos(np.deg2rad(POLES)).mean()
    cos_loss = sum(cos[i] * ((p[:, :, 0, i] - t[:, :, 0, i]) ** 2).sum() for i in range(5)) / (2 * 3 * 5 * 4)
    assert got.item() != pytest.approx(cos_loss, rel=1e-6)


def test_doubling_a_variables_weight_doubles_its_share_of_the_gradient():
    pred, target = pair((2, 3, 2, 4, 4))
    plain = grad_of(WeightedMSE(loss_weights(config(f"data.channels={TWO}"), None, "x"), 3), pred, target, 2)
    weights = loss_weights(config(f"data.channels={TWO}", "loss.variable_weights={temperature: 2}"), None, "x")
    np.testing.assert_allclose(weights.channels, [2 / 3, 4 / 3])  # [1, 2] over their mean 1.5
    grad = grad_of(WeightedMSE(weights, 3), pred, target, 2)
    torch.testing.assert_close(grad[:, :, 1] / grad[:, :, 0], 2 * plain[:, :, 1] / plain[:, :, 0], rtol=1e-5, atol=0)
    for c, w in enumerate(weights.channels):
        torch.testing.assert_close(grad[:, :, c], w * plain[:, :, c], rtol=1e-5, atol=0)
    with pytest.raises(AssertionError):  # the weights the other way round fail the same tolerance
        torch.testing.assert_close(grad[:, :, 0], weights.channels[1] * plain[:, :, 0], rtol=1e-5, atol=0)


def test_proportional_level_weights_are_level_over_the_mean_trained_level():
    pred, target = pair((2, 3, 2, 4, 4), seed=1)
    plain = grad_of(WeightedMSE(loss_weights(config(f"data.channels={TWO}"), None, "x"), 3), pred, target, 2)
    weights = loss_weights(config(f"data.channels={TWO}", "loss.level_weights=proportional"), None, "x")
    np.testing.assert_allclose(weights.channels, [500 / 675, 850 / 675])
    grad = grad_of(WeightedMSE(weights, 3), pred, target, 2)
    torch.testing.assert_close(grad[:, :, 0], 500 / 675 * plain[:, :, 0], rtol=1e-5, atol=0)
    torch.testing.assert_close(grad[:, :, 1], 850 / 675 * plain[:, :, 1], rtol=1e-5, atol=0)
    explicit = loss_weights(config(f"data.channels={TWO}", "loss.level_weights={850: 3}"), None, "x")
    np.testing.assert_allclose(explicit.channels, [0.5, 1.5])  # [1, 3] over their mean 2; levels not named: 1


def test_lead_weights_follow_the_closed_loop_and_a_time_split_adds_up_to_the_window():
    """T = 7, k = 5: leads 1 1 1 1 1 2 3. Split as 2 time ranks split it (teacher frames [0, 2) and [2, 5) plus
    the closed loop), each rank's loss x its share S n / T, averaged over the ranks, is the window's loss."""
    T, k = 7, 5
    assert lead_of_predictions(T, k).tolist() == [1, 1, 1, 1, 1, 2, 3]
    cfg = config(f"data.sequence_length={T}", f"data.teacher_steps={k}", "loss.lead_weights=[1, 2, 4]",
                 "loss.variable_weights={z: 1}")
    loss = WeightedMSE(loss_weights(cfg, [45.0, 15.0, -15.0, -45.0], "x"), T)
    raw = np.array([1, 1, 1, 1, 1, 2, 4.0])
    torch.testing.assert_close(loss.lead(k), torch.tensor(raw / raw.mean(), dtype=torch.float32))
    pred, target = pair((2, T, 1, 4, 3), seed=2)
    whole, _ = loss(pred, target, k)
    shares = [loss(pred[:, a:b], target[:, a:b], k, first=a)[0] * 2 * (b - a) / T for a, b in ((0, 2), (2, T))]
    torch.testing.assert_close(sum(shares) / 2, whole, rtol=1e-6, atol=0)
    grad = grad_of(loss, pred, target, k)  # the last closed-loop step weighs 4x a teacher-forced prediction
    plain = grad_of(WeightedMSE(None, T), pred, target, k)
    torch.testing.assert_close(grad[:, -1] / grad[:, 0], 4 * plain[:, -1] / plain[:, 0], rtol=1e-5, atol=0)
    assert loss.lead(6).tolist() == pytest.approx((np.array([1, 1, 1, 1, 1, 1, 2]) / (8 / 7)).tolist())  # curriculum


def test_uniform_weights_are_the_plain_mse_bit_for_bit():
    pred, target = pair((2, 3, 1, 4, 4), seed=3)
    weights = loss_weights(config(), None, "x")
    assert weights.uniform and weights.description == "plain normalised MSE"
    value, mse = WeightedMSE(weights, 3)(pred, target, 2)
    assert torch.equal(value, torch.nn.functional.mse_loss(pred, target)) and torch.equal(mse, value)


def test_the_runs_latitudes_reach_the_loss_on_its_coarsened_grid(tiny_store, tiny_wb2_store):
    """Descending (WeatherBench2) and ascending (WeatherBench) latitude, coarsened as the windows and forecasts are
    (a Navier–Stokes grid has none: see the area-weighting refusal below)."""
    small = ["data.sequence_length=4", "data.teacher_steps=3", "data.stride=4", "data.batch_size=2",
             "parallel.num_workers=1", "data.train_range=[2015-01-01, 2015-01-07]",
             "data.val_range=[2015-01-08, 2015-01-10]"]
    wb2 = load_config(overrides=[*small, f"data.url={tiny_wb2_store}", f"data.channels={TWO}",
                                 "data.dims={lat: latitude, lon: longitude}", "loss.level_weights=proportional"])
    _, grid, _, _, _, weights = _check_data(wb2, tiny_wb2_store)
    lat = open_channels(tiny_wb2_store, TWO, dims=wb2.data.dims, coarsen=2)["lat"].values
    assert grid == (16, 32) and lat.size == 16 and lat[0] > lat[-1]
    np.testing.assert_allclose(weights.rows, cell_area_weights(lat), rtol=1e-12)
    assert weights.rows[0] < weights.rows[7]  # the first row is the northernmost, the smallest
    wb1 = load_config(overrides=[*small, f"data.url={tiny_store}", "data.coarsen=4"])
    rows = _check_data(wb1, tiny_store)[-1].rows
    lat = open_channels(tiny_store, "z", coarsen=4)["lat"].values
    assert len(rows) == 8 and lat[0] < lat[-1]
    np.testing.assert_allclose(rows, cell_area_weights(lat), rtol=1e-12)


@pytest.mark.parametrize("override, match", [
    ("loss.variable_weights={temperature: 1}", r"^loss.variable_weights: temperature is not a trained channel; "
                                               r"channels are \['z'\]$"),
    ("loss.variable_weights={z: -1}", r"^loss.variable_weights.z: got -1.0, expected >= 0$"),
    ("loss.variable_weights={z: 0}", r"^loss.variable_weights / loss.level_weights: every channel of \['z'\] weighs 0"),
    ("loss.level_weights=proportional", r"^loss.level_weights: got 'proportional', but no channel is on a pressure "
                                        r"level \(variable@level\); channels are \['z'\]$"),
    ("loss.level_weights=pressure", r"^loss.level_weights: got 'pressure', expected one of \['uniform', "
                                    r"'proportional'\]; or expected a mapping"),
    ("loss.lead_weights=[1, 2]", r"^loss.lead_weights: got \[1.0, 2.0\], expected 5 weights, one per lead"),
    ("loss.lead_weights=[0, 0, 0, 0, 0]", r"^loss.lead_weights: .* expected at least one weight > 0$"),
    ("optim.ema_decay=1", r"^optim.ema_decay: got 1.0, expected < 1$"),
    ("optim.ema_decay=-0.5", r"^optim.ema_decay: got -0.5, expected >= 0$"),
])
def test_bad_weights_are_refused_naming_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=[override])


def test_level_weights_name_only_trained_levels():
    with pytest.raises(ConfigError, match=r"^loss.level_weights: level 700 is not a trained level; the channels' "
                                          r"levels are 500, 850$"):
        load_config(overrides=[f"data.channels={TWO}", "loss.level_weights={700: 2}"])
    with pytest.raises(ConfigError, match=r"^loss.lead_weights: .* a lead-1 weight > 0 with optim.curriculum_epochs"):
        load_config(overrides=["loss.lead_weights=[0, 1, 1, 1, 1]", "optim.curriculum_epochs=2"])


def test_area_weighting_on_a_grid_without_latitude_is_refused_before_ray(tiny_sample_store, tmp_path):
    cfg = load_config(overrides=[
        f"data.url={tiny_sample_store}", "data.channels=[vorticity]", "data.dims={sample: sample, lat: y, lon: x}",
        "data.train_range=null", "data.val_range=null", "data.train_samples=[0, 8]", "data.val_samples=[8, 10]",
        "data.coarsen=1", "data.sequence_length=4", "data.teacher_steps=3", "data.batch_size=1", "data.bounds=[null]",
        "loss.area_weighted=true", f"run.storage_path={tmp_path}/runs"])
    with pytest.raises(ConfigError, match=r"^loss.area_weighted: true, but the grid of '.*tiny_ns.zarr' has no "
                                          r"latitude coordinate \(data.dims.lat\)"):
        fit(cfg)
    assert not (tmp_path / "runs").exists()
    cfg.loss.area_weighted = None  # the default: uniform there
    assert _check_data(cfg, tiny_sample_store)[-1].description == "plain normalised MSE"


def test_the_job_refuses_a_weight_for_an_untrained_channel_in_one_line():
    out = subprocess.run([sys.executable, "jobs/train_era5.py", "--set", "loss.variable_weights={temperature: 2}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr == ("error: loss.variable_weights: temperature is not a trained "
                                                  "channel; channels are ['z']\n"), out.stderr
