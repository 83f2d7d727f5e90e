"""Models that predict tendencies (`model.predict: tendency`): the output is the frame read plus the decoded change
in units of the change's std; the closed loop carries its state in float32 under bf16; the statistics, the model
file and the config carry what such a model needs, and a run without it is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from minconv_dist.data import DimNames, NormStats, compute_stats, open_store
from minconv_dist.models import build_model, load_model_file, save_model_file
from minconv_dist.train.cli import main as train_main

WB2 = DimNames(lat="latitude", lon="longitude")
MEAN, STD, TENDENCY_STD = [54000.0, 280.0], [3300.0, 16.0], [66.0, 0.5]


def network(dtype: torch.dtype = torch.float64, bias: tuple[float, float] = (0.0, 0.0)):
    """A 2-channel tendency MinConvGRU whose decoder outputs `bias` everywhere (weights zeroed): its prediction of
    every frame is the frame read plus TENDENCY_STD * bias, a hand value."""
    torch.manual_seed(0)
    model = build_model("minconvgru", ["geopotential@500", "temperature@850"], 4, 2, grid=(6, 8),
                        padding="cylinder", predict="tendency")
    model.normalizer.set_stats(MEAN, STD).set_tendency_std(TENDENCY_STD)
    with torch.no_grad():
        model.decoder.weight.zero_()
        model.decoder.bias.copy_(torch.tensor(bias))
    return model.to(dtype)


def frames(T: int = 7) -> torch.Tensor:
    """[2, T, 2, 6, 8] in physical units, z500 around 54000 and t850 around 280."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, T, 2, 6, 8, generator=g, dtype=torch.float64)
    return x * torch.tensor(STD, dtype=torch.float64).view(1, 1, 2, 1, 1) + torch.tensor(MEAN).view(1, 1, 2, 1, 1)


def test_prediction_is_the_frame_read_plus_the_scaled_change():
    """Teacher-forced: y[t] = x[t] + tendency_std * d; closed loop: each step adds it again to its own
    prediction. A state-predicting network with the same weights predicts the (normalised) bias itself."""
    model, x = network(bias=(0.5, -2.0)), frames()
    step = torch.tensor([0.5 * 66.0, -2.0 * 0.5], dtype=torch.float64).view(1, 1, 2, 1, 1)
    y = model(x, teacher_steps=4)
    torch.testing.assert_close(y[:, :4], x[:, :4] + step, rtol=1e-12, atol=1e-9)
    closed = x[:, 3:4] + step * torch.arange(2, 5, dtype=torch.float64).view(1, 3, 1, 1, 1)
    torch.testing.assert_close(y[:, 4:], closed, rtol=1e-12, atol=1e-9)
    forecast, _ = model.rollout(x[:, :4], 3)
    torch.testing.assert_close(forecast, y[:, 3:6], rtol=1e-12, atol=1e-9)
    state_model = build_model("minconvgru", ["geopotential@500", "temperature@850"], 4, 2, grid=(6, 8),
                              padding="cylinder").double()
    state_model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "normalizer.tendency_std"})
    state_model.normalizer.set_stats(MEAN, STD)
    expected = torch.tensor([54000.0 + 0.5 * 3300.0, 280.0 - 2.0 * 16.0], dtype=torch.float64).view(1, 1, 2, 1, 1)
    torch.testing.assert_close(state_model(x), expected.expand_as(x), rtol=1e-12, atol=1e-9)


def test_the_closed_loop_state_stays_float32_under_bf16():
    """A bf16 tendency network that predicts no change returns its last context frame for 24 steps, to float32
    round-off (a few 1e-3 m²/s² of z500). Were the state carried in bf16, every step would round a normalised
    z500 to 1/128, up to 13 m²/s²."""
    model, x = network(torch.bfloat16), frames(4).float()
    forecast, _ = model.rollout(x, 24)
    assert forecast.dtype == torch.float32 and model.normalizer.tendency_std.dtype == torch.float32
    error = (forecast - x[:, -1:]).abs().amax(dim=(0, 1, 3, 4))
    assert error[0] < 0.02 and error[1] < 1e-4, error  # m²/s², K: float32 round-off of 54000 and 280
    rounded = (model.normalizer.normalize(x[:, -1:]).bfloat16().double() * 3300 + 54000)[:, :, 0]
    assert (rounded - x[:, -1:, 0]).abs().max() > 1.0  # what a bf16 state would have lost at the first step


def test_gradients_reach_every_weight_through_the_change():
    model, x = network(bias=(0.1, 0.1)), frames()
    with torch.no_grad():
        model.decoder.weight.normal_(0, 0.1)
    loss = (model.normalizer.normalize(model(x, teacher_steps=4)[:, :-1]) - model.normalizer.normalize(x[:, 1:])).square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_tendency_std_equals_numpy_within_each_series(tiny_wb2_store, tiny_sample_store):
    """The std of x(t+1) - x(t) over the training period; in a sample store the changes stay inside each sample
    (its frames are 100 s + t: changes of exactly 1 within a sample, std 0, so no statistics; the jumps between
    samples, which are no step of any trajectory, would give std > 0)."""
    stats = compute_stats(tiny_wb2_store, "geopotential@500, temperature@850", WB2,
                          time_range=("2015-01-02", "2015-01-05"), progress=False)
    ds = open_store(tiny_wb2_store).sel(time=slice("2015-01-02", "2015-01-05"))
    arrays = [ds.geopotential.sel(level=500).values, ds.temperature.sel(level=850).values]
    expected = [np.diff(a.astype(np.float64), axis=0).std() for a in arrays]
    np.testing.assert_allclose(stats.tendency_std, expected, rtol=1e-8)
    assert 0 < stats.tendency_std[0] < 0.1 * stats.std[0]  # an hour's change is a small part of the field's spread
    ns = DimNames(lat="y", lon="x", sample="sample")
    assert compute_stats(tiny_sample_store, "vorticity", ns, sample_range=(0, 7), progress=False).tendency_std is None
    with pytest.raises(ValueError, match="tendency_std needs one finite value > 0 per channel"):
        NormStats(["z"], [0.0], [1.0], tendency_std=[0.0])


def test_model_file_round_trips_predict_and_tendency_std(tmp_path):
    model = network(torch.float32, bias=(0.3, 0.3))
    save_model_file(tmp_path / "m.pt", model)
    loaded = load_model_file(tmp_path / "m.pt")
    assert loaded.spec["predict"] == "tendency" and loaded.predict == "tendency"
    assert torch.equal(loaded.normalizer.tendency_std, model.normalizer.tendency_std)
    x = frames().float()
    torch.testing.assert_close(loaded.rollout(x, 5)[0], model.eval().rollout(x, 5)[0], rtol=0, atol=0)
    plain = build_model("minconvgru", ["z"], 4, 1, norm="group")
    old = {"format": "minconv_dist.model/3", "spec": {k: v for k, v in plain.spec.items() if k != "predict"},
           "state_dict": plain.state_dict()}
    torch.save(old, tmp_path / "old.pt")
    assert load_model_file(tmp_path / "old.pt").predict == "state"
    with pytest.raises(ValueError, match="unknown predict 'delta'"):
        build_model("minconvgru", ["z"], 4, 1, norm="group", predict="delta")


def test_statistics_without_tendency_std_are_refused_naming_the_key(tiny_wb2_store, tmp_path, capsys):
    """A stats file written before tendency_std, with model.predict=tendency: one line naming data.stats_path,
    exit 2, before any Ray starts; a bad value of model.predict names its key."""
    stats = tmp_path / "stats.json"
    NormStats(["geopotential@500"], [54000.0], [3300.0]).save(str(stats))
    base = [f"--url={tiny_wb2_store}", "--set", "data.dims={lat: latitude, lon: longitude}",
            "--channels=[geopotential@500]", "--set", "data.train_range=[2015-01-01, 2015-01-07]",
            "--set", "data.val_range=[2015-01-08, 2015-01-10]", "--sequence-length=4", "--teacher-steps=3",
            "--set", "data.stride=4", "--set", f"run.storage_path={tmp_path}/runs",
            "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    cases = [(["--set", f"data.stats_path={stats}", "--set", "model.predict=tendency"],
              "data.stats_path: model.predict=tendency needs the std of each channel's step change"),
             (["--set", "model.predict=delta"], "model.predict: got 'delta'")]
    for extra, message in cases:
        assert train_main("train", argv=base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()
