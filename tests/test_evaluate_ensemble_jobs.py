"""Ensemble forecasts and their evaluation end to end on the tiny synthetic store: the layout, member noise as
documented (reproducible from the seed alone, whatever the batching), stacked models, batches bounded by
--batch-size, members of a model with forcings and static fields, NaN inputs refused and NaN scored as the
deterministic path does, a published WeatherBench2 ensemble scored beside ours, and the bad inputs (one line,
exit 2)."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from jobs import evaluate as evaluate_job
from jobs import forecast as forecast_job

from minconv_dist.data import DimNames, write_synthetic_era5
from minconv_dist.data.forcings import FORCINGS, compute_forcings, forcing_channels
from minconv_dist.data.static import read_static
from minconv_dist.errors import run_job
from minconv_dist.evaluate import as_fields, crps, load_model, open_channels
from minconv_dist.evaluate.ensemble import member_noise
from minconv_dist.evaluate.layout import from_weatherbench2
from minconv_dist.evaluate.metrics import align_truth
from minconv_dist.models import Network, build_model, save_model_file
from tests.conftest import TINY

MEAN, STD = 54107.863, 3349.0322
INIT = ["--coarsen", "2", "--init-start", "2015-01-03", "--init-end", "2015-01-06", "--init-every", "24h"]


def model_file(path, seed, arch="minconvgru", grid=(16, 32), channels=("z",)):
    torch.manual_seed(seed)
    model = build_model(arch, list(channels), 4, 2, padding="cylinder", norm="layer", grid=grid)
    model.normalizer.set_stats([MEAN] * len(channels), [STD] * len(channels))
    save_model_file(path, model)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return [model_file(folder / f"m{seed}.pt", seed) for seed in (0, 1)]


def forecast(store, out, *args):
    forecast_job.main(["--data", store, *INIT, "--out", str(out), *args])
    return xr.open_zarr(out)


def test_members_8_forecast_then_evaluate_beside_a_deterministic_one(tiny_store, models, tmp_path):
    ens = forecast(tiny_store, tmp_path / "ens.zarr", "--model", models[0], "--members", "8", "--perturbation-std",
                   "0.05", "--seed", "7", "--context", "6", "--steps", "6", "--batch-size", "5")
    g = ens["geopotential"]
    assert g.dims == ("time", "realization", "prediction_timedelta", "level", "latitude", "longitude")
    assert g.shape == (4, 8, 6, 1, 16, 32) and list(ens["realization"].values) == list(range(8))
    assert ens["realization"].attrs["standard_name"] == "realization" and g.attrs["units"] == "m**2 s**-2"
    assert (ens.attrs["members"], ens.attrs["perturbation"], ens.attrs["perturbation_std"], ens.attrs["seed"]) == (
        8, "context frames", 0.05, 7)
    spread = float(g.isel(prediction_timedelta=0).std("realization").mean())
    assert 0 < spread < 0.5 * STD  # the members differ, by a fraction of the field's std
    forecast(tiny_store, tmp_path / "det.zarr", "--model", models[0], "--context", "6", "--steps", "6")

    res = tmp_path / "res"
    skill = evaluate_job.main(["--forecast", str(tmp_path / "ens.zarr"), str(tmp_path / "det.zarr"), "--name",
                               "ens", "det", "--definition", "weatherbench2", "--rank-leads", "1", "6",
                               "--map-leads", "1", "--out", str(res)])
    assert list(skill["source"].values) == ["ens", "det", "persistence"]
    assert list(skill["members"].values) == [8, 1, 1]
    assert {"crps", "spread_skill_ratio", "ensemble_mean_rmse"} <= set(skill["metric"].values)
    # the job's numbers are the metric functions' on the stores
    from minconv_dist.evaluate import spread_skill_ratio
    fc = ens.sel(level=500, drop=True).rename(geopotential="z").load()
    truth = align_truth(fc, as_fields(open_channels(tiny_store, "z", coarsen=2)).load())
    np.testing.assert_allclose(skill["z"].sel(source="ens", metric="crps"), crps(fc, truth)["z"], rtol=1e-6)
    np.testing.assert_allclose(skill["z"].sel(source="ens", metric="spread_skill_ratio"),
                               spread_skill_ratio(fc, truth)["z"], rtol=1e-6)
    det = skill["z"].sel(source="det")
    assert (det.sel(metric="spread_skill_ratio") == 0).all()
    np.testing.assert_allclose(det.sel(metric="ensemble_mean_rmse"), det.sel(metric="weighted_rmse"))
    for name in ("ensemble_geopotential_500.png", "rank_geopotential_500.png", "rank_histogram.csv",
                 "maps_geopotential_500.png"):
        assert (res / name).exists(), name
    ranks = pd.read_csv(res / "rank_histogram.csv")
    assert set(ranks["source"]) == {"ens"} and sorted(set(ranks["lead_time_h"])) == [1.0, 6.0]
    assert sorted(set(ranks["rank"])) == list(range(9))
    np.testing.assert_allclose(ranks.groupby("lead_time_h")["frequency"].sum(), 1.0)


def test_member_noise_is_the_documented_draw_whatever_the_batching(tiny_store, models, tmp_path, monkeypatch):
    """With a persistence rollout, a member's forecast is its perturbed init frame: data + S std eps, eps the
    last context frame of `member_noise(seed, k, t)`. No rollout runs more than --batch-size pairs, and the
    members do not depend on it."""
    batches = []

    def persistence(self, context, steps, state=None, forcings=None):
        batches.append(context.shape[0])
        return context[:, -1:].expand(-1, steps, -1, -1, -1).clone(), state

    monkeypatch.setattr(Network, "rollout", persistence)
    args = ["--model", models[0], "--members", "4", "--perturbation-std", "0.5", "--seed", "3", "--context", "3",
            "--steps", "2"]
    a = forecast(tiny_store, tmp_path / "a.zarr", *args, "--batch-size", "3")["geopotential"].load()
    assert batches and max(batches) <= 3
    batches.clear()
    b = forecast(tiny_store, tmp_path / "b.zarr", *args, "--batch-size", "16")["geopotential"].load()
    assert max(batches) == 16  # 4 inits x 4 members in one rollout
    np.testing.assert_array_equal(a.values, b.values)  # persistence: no arithmetic that batching could reorder
    data = open_channels(tiny_store, "z", coarsen=2)
    for t in a["time"].values:
        frame = data.sel(time=t).values  # [C, H, W]
        for k in range(4):
            (eps,) = member_noise(3, k, t, [(3, 1, 16, 32)])
            expected = frame + 0.5 * STD * eps[-1]
            # float32 storage: within a few ulps of values ~5e4
            np.testing.assert_allclose(a.sel(time=t, realization=k).isel(prediction_timedelta=0).values, expected,
                                       rtol=1e-6)
    assert not np.allclose(a.isel(realization=0), a.isel(realization=1), rtol=1e-3)


def test_warm_state_members_and_stacked_models(tiny_store, models, tmp_path):
    """--warmup perturbs the hidden state before the init frame: with no noise a member is the deterministic
    warm forecast; with noise the members spread from the first lead and do not depend on the batching.
    Several models: member j is model j's forecast."""
    warm = ["--warmup", "all", "--steps", "4"]
    det = forecast(tiny_store, tmp_path / "det.zarr", "--model", models[0], *warm)["geopotential"].values
    one = forecast(tiny_store, tmp_path / "one.zarr", "--model", models[0], *warm, "--members", "1")
    # rtol per value: the member's first step is a one-frame scan from the carried state, the deterministic
    # forecast's the last frame of the pass: fp32 rounding apart (values ~5e4, ulp 0.004)
    np.testing.assert_allclose(one["geopotential"].isel(realization=0).values, det, rtol=1e-6)
    assert one.attrs["perturbation"] == "none"
    noisy = ["--model", models[0], *warm, "--members", "3", "--perturbation-std", "0.2"]
    a = forecast(tiny_store, tmp_path / "a.zarr", *noisy, "--batch-size", "2")
    b = forecast(tiny_store, tmp_path / "b.zarr", *noisy, "--batch-size", "9")["geopotential"].values
    np.testing.assert_allclose(a["geopotential"].values, b, rtol=1e-6)
    assert a.attrs["perturbation"] == "warm state"
    assert float(a["geopotential"].isel(prediction_timedelta=0).std("realization").min()) > 1.0  # m²/s², everywhere

    stacked = forecast(tiny_store, tmp_path / "s.zarr", "--model", *models, "--context", "6", "--steps", "3")
    assert stacked.sizes["realization"] == 2 and json.loads(stacked.attrs["model_uri"]) == models
    for j, uri in enumerate(models):
        alone = forecast(tiny_store, tmp_path / f"d{j}.zarr", "--model", uri, "--context", "6", "--steps", "3")
        np.testing.assert_allclose(stacked["geopotential"].isel(realization=j).values,
                                   alone["geopotential"].values, rtol=1e-6)


TWO = ["geopotential@500", "temperature@850"]  # the multi-variable store's default channels
STATIC = ["land_sea_mask", "geopotential_at_surface"]
HOUR = np.timedelta64(1, "h")


@pytest.fixture(scope="module")
def forcing_model(tiny_wb2_store, tmp_path_factory):
    """A model of TWO that reads every forcing and both static fields of the tiny multi-variable store, its
    encoder scaled up so that they weigh (as tests/test_forcings.py does)."""
    data = open_channels(tiny_wb2_store, TWO, coarsen=2)
    torch.manual_seed(0)
    model = build_model("minconvgru", TWO, 4, 2, padding="cylinder", norm="layer", grid=(16, 32),
                        forcings=forcing_channels(list(FORCINGS)), static=STATIC)
    model.normalizer.set_stats(data.mean(("time", "lat", "lon")).values, data.std(("time", "lat", "lon")).values)
    model.static.set_fields(torch.from_numpy(read_static(
        tiny_wb2_store, STATIC, latitude=data["lat"].values, longitude=data["lon"].values,
        dims=DimNames(lat="latitude", lon="longitude"), coarsen=2)))
    with torch.no_grad():
        model.encoder[0].weight.mul_(3)
    path = tmp_path_factory.mktemp("forcing_model") / "model.pt"
    save_model_file(path, model)
    return str(path)


@pytest.mark.parametrize("warmup", [None, "all"])
def test_members_of_a_model_with_forcings_read_those_of_their_valid_times(tiny_wb2_store, forcing_model, tmp_path,
                                                                          warmup):
    """A member without noise is the deterministic forecast (whose forcings tests/test_forcings.py checks against
    each valid time's), on both channels, for --context and --warmup; the forcings weigh: with them an hour
    late the forecast moves by far more than the tolerance; with noise the members spread."""
    state = ["--context", "6"] if warmup is None else ["--warmup", warmup]
    run = ["--model", forcing_model, *state, "--steps", "4"]
    det = forecast(tiny_wb2_store, tmp_path / "det.zarr", *run)
    one = forecast(tiny_wb2_store, tmp_path / "one.zarr", *run, "--members", "1")
    for var in ("geopotential", "temperature"):  # fp32 rounding apart (see test_warm_state_members...)
        np.testing.assert_allclose(one[var].isel(realization=0).values, det[var].values, rtol=1e-6)
    if warmup is None:
        model, data = load_model(forcing_model), open_channels(tiny_wb2_store, TWO, coarsen=2)
        i = int(np.searchsorted(data["time"].values, det["time"].values[0]))
        valid = data["time"].values[i - 5] + HOUR * np.arange(6 + 4 - 1)  # the context, then the closed loop's
        late = compute_forcings(model.forcings, valid + HOUR, data["lat"].values, data["lon"].values)
        with torch.no_grad():
            y = model.rollout(torch.from_numpy(data.isel(time=slice(i - 5, i + 1)).values)[None], 4,
                              forcings=torch.from_numpy(late)[None])[0]
        moved = np.abs(det["geopotential"].isel(time=0).sel(level=500).values - y[0, :, 0].numpy()).max()
        assert moved > 1e-3 * STD, moved  # 1e-6 of ~5e4 is the tolerance above
    noisy = forecast(tiny_wb2_store, tmp_path / "noisy.zarr", *run, "--members", "2", "--perturbation-std", "0.1")
    assert float(noisy["temperature"].sel(level=850).isel(prediction_timedelta=0).std("realization").min()) > 0


@pytest.fixture(scope="module")
def nan_store(tmp_path_factory):
    """The tiny multi-variable store with one NaN in geopotential at 500 hPa at 2015-01-04T00, the 2nd init time
    of INIT (and in the context of no other)."""
    import zarr

    path = str(tmp_path_factory.mktemp("nan") / "nan.zarr")
    write_synthetic_era5(path, **TINY, layout="weatherbench2")
    zarr.open_array(os.path.join(path, "geopotential"), mode="r+")[72, 0, 5, 7] = np.nan  # 72 h after the start
    return path


def test_ensembles_refuse_nan_inputs_and_their_nan_is_scored_as_the_deterministic_path_scores_it(
        nan_store, forcing_model, tmp_path, capsys):
    """As a deterministic forecast: refused in one line naming the init time and channel, written with
    --allow-nan (every member NaN, listed in nan_inputs); evaluated, the NaN fraction counts every member, the
    probabilistic scores and rank histograms are NaN, and --drop-nan-inits scores (rank histograms too) the other
    init times alone."""
    run = ["--model", forcing_model, "--context", "6", "--steps", "3", "--members", "2", "--perturbation-std", "0.1"]
    fc = tmp_path / "fc.zarr"
    capsys.readouterr()
    assert run_job(forecast_job.main, ["--data", nan_store, *INIT, *run, "--out", str(fc)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 4 init times read NaN (channel geopotential@500: 2015-01-04T00:00:00): "
                          "their forecasts would be NaN") and len(err.splitlines()) == 1, err
    assert not fc.exists()
    ens = forecast(nan_store, fc, *run, "--allow-nan")
    assert json.loads(ens.attrs["nan_inputs"]) == {"geopotential@500": ["2015-01-04T00:00:00"]}
    finite = np.isfinite(ens["temperature"].sel(level=850).values).reshape(4, -1)  # both members, every value
    assert finite[[0, 2, 3]].all() and not finite[1].any()

    score = ["--forecast", str(fc), "--definition", "weatherbench2", "--rank-leads", "3", "--map-leads", "1"]
    skill = evaluate_job.main([*score, "--out", str(tmp_path / "all")])
    model = skill["temperature@850"].sel(source="model")
    np.testing.assert_array_equal(model.sel(metric="nan_fraction"), 0.25)
    assert np.isnan(model.sel(metric=["crps", "spread_skill_ratio", "ensemble_mean_rmse"])).all()
    ranks = pd.read_csv(tmp_path / "all" / "rank_histogram.csv")
    assert len(ranks) == 2 * 3 and ranks["frequency"].isna().all()  # channels x ranks: NaN, listed
    dropped = evaluate_job.main([*score, "--drop-nan-inits", "--out", str(tmp_path / "dropped")])
    assert dropped.attrs["nan_inits_dropped"] == 1
    assert dropped.attrs["nan_inits_dropped_times"] == ["2015-01-04T00:00:00"]
    clean = from_weatherbench2(ens, TWO).isel(time=[0, 2, 3]).load()
    expected = crps(clean, align_truth(clean, as_fields(open_channels(nan_store, TWO, coarsen=2)).load()))
    for channel in TWO:
        got = dropped[channel].sel(source="model", metric="crps")
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, expected[channel], rtol=1e-6)
    ranks = pd.read_csv(tmp_path / "dropped" / "rank_histogram.csv")
    np.testing.assert_allclose(ranks.groupby(["channel", "lead_time_h"])["frequency"].sum(), 1.0)
    assert len(ranks) == 2 * 3  # channels x ranks, none NaN


def published_ensemble(tiny_store, path, members=5, noise=30.0):
    """An ensemble written as WeatherBench2 publishes IFS ENS: dim `number` (1..n), dims (time, number,
    prediction_timedelta, level, longitude, latitude), latitude descending; z500 = truth + noise."""
    truth = open_channels(tiny_store, "z", coarsen=2).sel(channel="z").load()
    init = pd.date_range("2015-01-03", "2015-01-06", freq="12h").values
    lead = np.arange(0, 7, 2) * np.timedelta64(1, "h")
    z = truth.sel(time=(init[:, None] + lead).ravel()).values.reshape(init.size, 1, lead.size, 16, 32)
    z = z + noise * np.random.default_rng(0).standard_normal((init.size, members, lead.size, 16, 32))
    geo = z[:, :, :, None, ::-1, :].transpose(0, 1, 2, 3, 5, 4)  # level; latitude descending; lon, lat
    ds = xr.Dataset({"geopotential": (("time", "number", "prediction_timedelta", "level", "longitude", "latitude"),
                                      geo.astype(np.float32))},
                    coords={"time": init, "number": np.arange(1, members + 1), "prediction_timedelta": lead,
                            "level": [500], "latitude": truth["lat"].values[::-1], "longitude": truth["lon"].values})
    ds.to_zarr(path, consolidated=True, zarr_format=2)
    return z, truth


def test_a_published_weatherbench2_ensemble_is_scored_by_hand_computed_values(tiny_store, tmp_path):
    z, truth = published_ensemble(tiny_store, tmp_path / "ens.zarr")
    skill = evaluate_job.main(["--forecast", str(tmp_path / "ens.zarr"), "--name", "ifs_ens", "--coarsen", "2",
                               "--truth", tiny_store, "--definition", "weatherbench2", "--out", str(tmp_path / "r")])
    assert list(skill["members"].values) == [5, 1]
    init = pd.date_range("2015-01-03", "2015-01-06", freq="12h").values
    lead = np.arange(0, 7, 2) * np.timedelta64(1, "h")
    y = truth.sel(time=(init[:, None] + lead).ravel()).values.reshape(init.size, lead.size, 16, 32)
    lat = np.deg2rad(truth["lat"].values)  # ascending, no pole rows: edges halfway, and +-90
    edges = np.concatenate([[-np.pi / 2], (lat[:-1] + lat[1:]) / 2, [np.pi / 2]])
    w = np.diff(np.sin(edges))[:, None]
    mean = lambda f: (f * w).sum((-2, -1)) / (w.sum() * 32)  # noqa: E731
    n = z.shape[1]
    skill_term = np.mean([abs(z[:, k] - y) for k in range(n)], axis=0)
    spread_term = sum(abs(z[:, i] - z[:, j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    expected = (mean(skill_term) - 0.5 * mean(spread_term)).mean(0)
    got = skill["z"].sel(source="ifs_ens")
    np.testing.assert_allclose(got.sel(metric="crps").dropna("prediction_timedelta"), expected, rtol=1e-5)
    rmse = np.sqrt(mean((z.mean(1) - y) ** 2).mean(0))
    np.testing.assert_allclose(got.sel(metric="ensemble_mean_rmse").dropna("prediction_timedelta"), rmse, rtol=1e-5)
    np.testing.assert_allclose(got.sel(metric="ensemble_mean_rmse").dropna("prediction_timedelta"),
                               30 / np.sqrt(n), rtol=0.1)  # members = truth + N(0, 30²): its mean's error


def test_bad_ensemble_inputs_are_one_line_and_exit_2(tiny_store, models, tmp_path, capsys):
    other_grid = model_file(tmp_path / "g.pt", 0, grid=(8, 16))
    convlstm = model_file(tmp_path / "c.pt", 0, arch="convlstm")
    truth = xr.open_zarr(tiny_store).expand_dims(realization=2).chunk().drop_encoding()  # an ensemble "truth"
    truth.to_zarr(tmp_path / "ens_truth.zarr", zarr_format=2, consolidated=True)
    run = ["--data", tiny_store, *INIT, "--context", "4", "--steps", "2"]
    ens = tmp_path / "ens.zarr"
    cases = [
        (forecast_job, [*run, "--model", models[0], "--members", "0"], "--members 0: an ensemble needs at least 1"),
        (forecast_job, [*run, "--model", *models, "--members", "3"], "--members must be a multiple of 2"),
        (forecast_job, [*run, "--model", models[0], other_grid, "--members", "2"], f"--model {other_grid} has grid"),
        (forecast_job, [*run, "--model", models[0], "--members", "4"], "4 identical members per model"),
        (forecast_job, [*run, "--model", models[0], "--perturbation-std", "0.1"], "give --members N"),
        (forecast_job, [*run, "--model", convlstm, "--members", "2", "--perturbation-std", "0.1", "--warmup", "3"],
         "use --context instead"),
        (evaluate_job, ["--forecast", str(ens), "--truth", str(tmp_path / "ens_truth.zarr"), "--out",
                        str(tmp_path / "r")], "the truth store is an ensemble (2 members along 'realization')"),
    ]
    assert run_job(forecast_job.main, [*run, "--model", models[0], "--members", "2", "--perturbation-std", "0.1",
                                       "--out", str(ens)]) == 0
    for job, argv, message in cases:
        capsys.readouterr()
        out = [] if job is evaluate_job else ["--out", str(tmp_path / "x.zarr")]
        assert run_job(job.main, [*argv, *out]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.zarr").exists() and not (tmp_path / "r").exists()
