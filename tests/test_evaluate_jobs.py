"""Forecast and evaluation jobs end to end on the embedded synthetic store, and their bad-input errors."""
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from jobs import evaluate as evaluate_job
from jobs import forecast as forecast_job

from minconv_dist.data import NormStats, default_store
from minconv_dist.errors import run_job
from minconv_dist.evaluate import DEFINITIONS, check_inputs, load_model, open_channels
from minconv_dist.models import build_model, save_model_file, to_official_state_dict

Z = "geopotential@500"  # a channel of the embedded store (docs/data.md)
STATS = NormStats([Z], [54073.8], [3259.7])
INIT = ["--init-start", "2016-03-01", "--init-end", "2016-03-04", "--init-every", "24h"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the embedded store in a cache of this module's own, unset after
        mp.setenv("MINCONV_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield default_store()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("minconvgru", [Z], 4, 2, padding="cylinder", norm="layer", grid=(16, 32))
    model.normalizer.set_stats(STATS.mean, STATS.std)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, model)
    return path


def test_model_file_round_trip_and_official_import(ckpt, tmp_path):
    """The model file carries the statistics in its weights; an official checkpoint has none and takes them."""
    model = load_model(str(ckpt))
    assert model.normalizer.channels == [Z]
    torch.testing.assert_close(model.normalizer.mean, torch.tensor(STATS.mean))
    torch.testing.assert_close(model.normalizer.std, torch.tensor(STATS.std))
    x = 54000 + 3000 * torch.randn(2, 5, 1, 16, 32)  # physical units
    official = tmp_path / "official.pt"
    torch.save({"model_state_dict": to_official_state_dict(model), "epoch": 3}, official)
    stats = tmp_path / "stats.json"
    STATS.save(str(stats))
    imported = load_model(f"official:{official}", arch="minconvgru", padding="cylinder", stats=NormStats.load(str(stats)))
    torch.testing.assert_close(imported(x, teacher_steps=3), model(x, teacher_steps=3))
    with pytest.raises(ValueError, match="arch and stats"):
        load_model(f"official:{official}", arch="minconvgru")
    with pytest.raises(ValueError, match="its own normalisation statistics"):
        load_model(str(ckpt), stats=STATS)
    with pytest.raises(ValueError, match="official"):
        load_model(str(official))
    with pytest.raises(FileNotFoundError, match="models:/"):
        load_model(str(tmp_path / "missing.pt"))


def test_forecast_then_evaluate(store, ckpt, tmp_path):
    out = tmp_path / "fc.zarr"
    forecast_job.main(["--model", str(ckpt), "--out", str(out), "--coarsen", "2", "--context", "6", "--steps", "8",
                       "--batch-size", "3", *INIT])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # renamed into place, nothing left over
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consolidated, nothing to rename or guess
        fc = xr.open_zarr(out)
    # WeatherBench2's layout: geopotential@500 is geopotential on level 500
    assert list(fc.data_vars) == ["geopotential"] and list(fc["level"].values) == [500]
    assert fc["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert fc["geopotential"].shape == (4, 8, 1, 16, 32)
    assert pd.Timestamp(fc["time"].values[0]) == pd.Timestamp("2016-03-01")
    assert (fc["prediction_timedelta"].values == np.arange(1, 9) * np.timedelta64(1, "h")).all()
    assert fc["geopotential"].attrs["units"] == "m**2 s**-2" and fc["geopotential"].attrs["long_name"] == "Geopotential"
    assert fc["latitude"].attrs["units"] == "degrees_north" and fc["longitude"].attrs["units"] == "degrees_east"
    assert fc["level"].attrs["units"] == "hPa" and "long_name" in fc["time"].attrs
    assert "long_name" in fc["prediction_timedelta"].attrs
    assert fc.attrs["model_uri"] == str(ckpt) and fc.attrs["coarsen"] == 2 and "data_source" in fc.attrs
    assert 40000 < float(fc["geopotential"].mean()) < 70000  # de-normalised to m²/s²

    res = tmp_path / "res"
    skill = evaluate_job.main(["--forecast", str(out), "--out", str(res), "--climatology-range", "2015-01-01",
                               "2015-12-31", "--definition", "weatherbench2", "--map-leads", "1", "8"])
    assert list(skill["source"].values) == ["model", "persistence", "climatology"]
    table = pd.read_csv(res / "metrics.csv")
    assert set(table["metric"]) == {"weighted_rmse", "rmse_sqrt_before_time_avg", "bias", "acc", "nan_fraction",
                                    "truth_nan_fraction"}
    assert len(table) == 3 * 6 * 8 and set(table["variable"]) == {"geopotential"} and set(table["level"]) == {500}
    for png in ("skill_geopotential_500.png", "maps_geopotential_500.png"):
        assert (res / png).read_bytes()[:4] == b"\x89PNG"
    # persistence is perfect at lead 0 only; at lead 1 h on a smooth field it is already close
    pers = skill[Z].sel(source="persistence", metric="weighted_rmse").values
    assert 0 < pers[0] < pers[-1]

    # a forecast store refuses to be overwritten silently
    with pytest.raises(FileExistsError):
        forecast_job.main(["--model", str(ckpt), "--out", str(out), "--coarsen", "2", *INIT])


def test_bad_inputs_fail_before_rollout(store, ckpt, tmp_path):
    model = load_model(str(ckpt))
    data = open_channels(store, Z, coarsen=2)
    inits = data["time"].values[100:102]
    two = build_model("minconvgru", ["z", "t"], 4, 1, norm="group")
    with pytest.raises(ValueError, match=r"takes channels \['z', 't'\], the data gives \['geopotential@500'\]"):
        check_inputs(two, data, inits, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        check_inputs(model, open_channels(store, Z), inits, 4, 4)
    with pytest.raises(ValueError, match="context"):
        check_inputs(model, data, data["time"].values[:1], 4, 4)
    with pytest.raises(ValueError, match="not in the data"):
        check_inputs(model, data, np.array(["1990-01-01"], dtype="datetime64[ns]"), 4, 4)
    with pytest.raises(KeyError, match="not in store"):
        open_channels(store, "t2m")


def test_evaluate_rejects_misaligned_stores(store, ckpt, tmp_path):
    out = tmp_path / "late.zarr"
    forecast_job.main(["--model", str(ckpt), "--out", str(out), "--coarsen", "2", "--context", "4", "--steps", "6",
                       "--init-start", "2016-12-31 20:00", "--init-every", "1h"])
    with pytest.raises(ValueError, match="valid times"):  # leads run past the truth's end
        evaluate_job.main(["--forecast", str(out), "--out", str(tmp_path / "r")])
    with pytest.raises(ValueError, match="grids differ"):  # truth left at 32x64
        evaluate_job.main(["--forecast", str(out), "--coarsen", "1", "--out", str(tmp_path / "r")])


def test_evaluate_logs_to_an_mlflow_run(store, ckpt, tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = mlflow.create_experiment("eval", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment) as run:
        pass
    out = tmp_path / "fc.zarr"
    forecast_job.main(["--model", str(ckpt), "--out", str(out), "--coarsen", "2", "--context", "6", "--steps", "3",
                       "--init-start", "2016-03-01", "--init-end", "2016-03-02", "--init-every", "24h"])
    skill = evaluate_job.main(["--forecast", str(out), "--out", str(tmp_path / "res"), "--climatology-range",
                               "2015-01-01", "2015-12-31", "--mlflow-run-id", run.info.run_id, "--map-leads", "1"])
    client = mlflow.tracking.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "eval/model/weighted_rmse/geopotential_500")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    expected = skill[Z].sel(source="model", metric="weighted_rmse").values
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)
    files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"metrics.csv", "skill_geopotential_500.png", "maps_geopotential_500.png"} <= files


def test_user_errors_are_one_line_and_exit_2(store, ckpt, tmp_path, monkeypatch, capsys):
    """A model that is not there, an unknown MLflow run (refused before any output is written) and mismatched
    --name labels: each one line on stderr naming the problem, exit code 2, no traceback; --debug raises."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    forecast = tmp_path / "fc.zarr"
    assert run_job(forecast_job.main, ["--model", str(tmp_path / "absent.pt"), "--out", str(forecast)]) == 2
    assert run_job(forecast_job.main, ["--model", str(ckpt), "--out", str(forecast), "--coarsen", "2",
                                       "--context", "4", "--steps", "2", *INIT]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    cases = [(["--mlflow-run-id", "0123456789abcdef"], "--mlflow-run-id 0123456789abcdef: no such run at tracking"),
             (["--name", "a", "b"], "--name: 2 names for 1 forecasts")]
    for extra, message in cases:
        assert run_job(evaluate_job.main, ["--forecast", str(forecast), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    with pytest.raises(ValueError, match="no such run"):
        run_job(evaluate_job.main, ["--forecast", str(forecast), "--out", str(out), "--debug",
                                    "--mlflow-run-id", "0123456789abcdef"])


def published_baseline(store, path, noise=20.0):
    """A forecast written by hand as WeatherBench2 publishes them: init times every 12 h, leads 0..8 h every 2 h,
    dims (time, prediction_timedelta, level, longitude, latitude) with latitude descending, geopotential on
    levels 500 and 850 (z850 = 0.3 z500), temperature beside it (zeros); z500 = truth + noise."""
    truth = open_channels(store, Z, coarsen=2).sel(channel=Z).load()
    init = pd.date_range("2016-02-29 12:00", "2016-03-05", freq="12h").values
    lead = np.arange(0, 9, 2) * np.timedelta64(1, "h")
    z = truth.sel(time=(init[:, None] + lead).ravel()).values.reshape(init.size, lead.size, 16, 32)
    z = z + noise * np.random.default_rng(0).standard_normal(z.shape)
    geo = np.stack([z, 0.3 * z], axis=2)[..., ::-1, :].transpose(0, 1, 2, 4, 3)  # levels; lat descending; lon, lat
    dims = ("time", "prediction_timedelta", "level", "longitude", "latitude")
    ds = xr.Dataset({"geopotential": (dims, geo.astype(np.float32)), "temperature": (dims, np.zeros_like(geo))},
                    coords={"time": init, "prediction_timedelta": lead, "level": np.array([500, 850], np.int32),
                            "latitude": truth["lat"].values[::-1], "longitude": truth["lon"].values})
    ds.to_zarr(path, consolidated=True, zarr_format=2)
    return path


def test_a_published_weatherbench2_forecast_is_scored_beside_ours(store, ckpt, tmp_path):
    ours = tmp_path / "ours.zarr"
    forecast_job.main(["--model", str(ckpt), "--out", str(ours), "--coarsen", "2", "--context", "6", "--steps", "8",
                       *INIT])
    hres = published_baseline(store, tmp_path / "hres.zarr")
    res = tmp_path / "res"
    skill = evaluate_job.main(["--forecast", str(ours), str(hres), "--out", str(res), "--definition", "weatherbench2",
                               "--climatology-range", "2015-01-01", "2015-12-31", "--map-leads", "1"])
    assert list(skill["source"].values) == ["model", "hres", "persistence", "climatology"]
    assert list(skill.data_vars) == [Z]  # the channels both forecasts hold, under the truth's names
    hours = skill["prediction_timedelta"].values / np.timedelta64(1, "h")
    np.testing.assert_array_equal(hours, np.arange(0, 9))  # every lead of either forecast
    rmse = skill[Z].sel(metric="weighted_rmse")
    hres_rmse = rmse.sel(source="hres").values
    assert np.isnan(hres_rmse[1::2]).all() and np.allclose(hres_rmse[::2], 20.0, rtol=0.05)  # its noise
    assert np.isnan(rmse.sel(source="model").values[0]) and np.isfinite(rmse.sel(source="model").values[1:]).all()
    assert float(rmse.sel(source="persistence")[0]) == 0.0
    table = pd.read_csv(res / "metrics.csv")
    assert set(table["source"]) == {"model", "hres", "persistence", "climatology"}
    assert set(zip(table["variable"], table["level"])) == {("geopotential", 500)}

    # the published forecast alone: the truth defaults to the embedded store, scored on all its init times
    alone = evaluate_job.main(["--forecast", str(hres), "--name", "hres", "--coarsen", "2", "--out",
                               str(tmp_path / "alone")])
    assert list(alone["source"].values) == ["hres", "persistence"]
    np.testing.assert_allclose(alone[Z].sel(source="hres", metric="weighted_rmse"), 20.0, rtol=0.05)


def test_warmup_pass_forecasts_equal_rollouts_over_the_record(store, ckpt, tmp_path):
    """--warmup all: each init's forecast == a rollout warmed up on every frame from the record's start;
    --warmup N for one init == --context N; ConvLSTM/ConvGRU are refused."""
    model = load_model(str(ckpt))
    data = open_channels(store, Z, coarsen=2)
    out = tmp_path / "warm.zarr"
    forecast_job.main(["--model", str(ckpt), "--out", str(out), "--coarsen", "2", "--warmup", "all", "--steps", "3",
                       "--warmup-chunk", "1000", "--batch-size", "3", *INIT])
    fc = xr.open_zarr(out)["geopotential"].sel(level=500)
    assert fc.sizes["time"] == 4
    for k in (0, 3):
        end = int(np.searchsorted(data["time"].values, fc["time"].values[k]))
        with torch.no_grad():
            expected, _ = model.rollout(torch.from_numpy(data.isel(time=slice(0, end + 1)).values[None]), 3)
        np.testing.assert_allclose(fc.isel(time=k).values, expected[0, :, 0].numpy(), rtol=1e-5)

    one = ["--model", str(ckpt), "--coarsen", "2", "--steps", "4", "--init-start", "2016-03-01", "--init-end",
           "2016-03-01"]
    forecast_job.main([*one, "--out", str(tmp_path / "w.zarr"), "--warmup", "12"])
    forecast_job.main([*one, "--out", str(tmp_path / "c.zarr"), "--context", "12"])
    np.testing.assert_allclose(xr.open_zarr(tmp_path / "w.zarr")["geopotential"].values,
                               xr.open_zarr(tmp_path / "c.zarr")["geopotential"].values, rtol=1e-6)

    lstm = build_model("convlstm", [Z], 2, 1, padding="cylinder", norm="layer", grid=(16, 32))
    save_model_file(tmp_path / "lstm.pt", lstm)
    with pytest.raises(ValueError, match="ConvLSTMCell.*use --context"):
        forecast_job.main(["--model", str(tmp_path / "lstm.pt"), "--coarsen", "2", "--warmup", "all", *INIT,
                           "--out", str(tmp_path / "x.zarr")])
    with pytest.raises(SystemExit):
        forecast_job.main([*one, "--out", str(tmp_path / "y.zarr"), "--warmup", "0"])


def test_forecast_and_evaluation_outputs_at_fsspec_urls(store, ckpt, tmp_path, monkeypatch, s3_options, s3_bucket):
    """--out s3://... writes to S3 (not a local folder named 's3:'), with its own storage options; the
    evaluation's outputs go to S3 or memory://; existing outputs are replaced only with --overwrite."""
    from minconv_dist.data import open_store
    from minconv_dist.evaluate.run import open_outputs

    monkeypatch.chdir(tmp_path)
    so = json.dumps(s3_options)
    fc_url = f"s3://{s3_bucket}/runs/fc.zarr"
    args = ["--model", str(ckpt), "--coarsen", "2", "--context", "4", "--steps", "3", *INIT, "--out", fc_url,
            "--out-storage-options", so]
    forecast_job.main(args)
    assert os.listdir(tmp_path) == []  # nothing local
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fc = xr.open_zarr(fc_url, storage_options=s3_options)  # plain xarray: consolidated WB2 layout
    assert fc["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert fc.attrs["minconv_complete"] is True and "storage_options" not in fc.attrs["config"]
    assert "testing" not in json.dumps(fc.attrs)  # the credentials stay out of the store
    with pytest.raises(FileExistsError, match="--overwrite"):
        forecast_job.main(args)
    forecast_job.main([*args, "--overwrite"])

    for out, out_so in ((f"s3://{s3_bucket}/eval", s3_options), ("memory://evaluations/first", None)):
        cli = ["--forecast", fc_url, "--forecast-storage-options", so, "--out", out, "--map-leads", "1"]
        skill = evaluate_job.main(cli + (["--out-storage-options", json.dumps(out_so)] if out_so else []))
        written, table = open_outputs(out, out_so)
        xr.testing.assert_allclose(written["geopotential"].sel(level=500, drop=True), skill[Z])
        assert len(table) == 2 * 5 * 3  # model and persistence, 3 metrics and 2 NaN fractions, 3 leads
    assert open_store(f"s3://{s3_bucket}/eval/skill.zarr", s3_options)["geopotential"].dims == (
        "source", "metric", "prediction_timedelta", "level")


def test_interrupted_outputs_are_refused_or_absent(store, ckpt, tmp_path, monkeypatch):
    """A forecast writer that dies leaves nothing locally and a store readers refuse in memory://; an evaluation
    folder without its completeness marker is refused and replaced only with --overwrite."""
    from minconv_dist.evaluate import forecast as forecast_module
    from minconv_dist.evaluate.outputs import MARKER, filesystem
    from minconv_dist.evaluate.run import open_outputs

    def crash(*_args, **_kwargs):
        raise RuntimeError("node lost")

    monkeypatch.setattr(forecast_module, "_write_batch", crash)
    args = ["--model", str(ckpt), "--coarsen", "2", "--context", "4", "--steps", "2", *INIT]
    for out in (str(tmp_path / "fc.zarr"), "memory://crash/fc.zarr"):
        with pytest.raises(RuntimeError, match="node lost"):
            forecast_job.main([*args, "--out", out])
    assert os.listdir(tmp_path) == []  # the local store was written aside and removed
    with pytest.raises(ValueError, match="incomplete.*--overwrite"):
        evaluate_job.main(["--forecast", "memory://crash/fc.zarr", "--out", str(tmp_path / "res")])
    monkeypatch.undo()

    forecast_job.main([*args, "--out", "memory://crash/fc.zarr", "--overwrite"])
    out = "memory://crash/res"
    evaluate_job.main(["--forecast", "memory://crash/fc.zarr", "--out", out])
    fs, root = filesystem(out)
    fs.rm(f"{root}/{MARKER}")  # as if the run had died before its last write
    with pytest.raises(ValueError, match="partial output"):
        open_outputs(out)
    with pytest.raises(FileExistsError):
        evaluate_job.main(["--forecast", "memory://crash/fc.zarr", "--out", out])
    evaluate_job.main(["--forecast", "memory://crash/fc.zarr", "--out", out, "--overwrite"])
    assert len(open_outputs(out)[1]) == 2 * 5 * 2  # model and persistence, 3 metrics and 2 NaN fractions, 2 leads


def test_levels_of_a_wb2_truth_store_become_one_variable_and_a_plot_each(tiny_wb2_store, tmp_path, capsys):
    """A model on two levels of geopotential and 2m temperature of a WB2-layout store: one `geopotential`
    with levels 500 and 850 in the forecast, a skill plot per variable and level, a short printed summary. The
    evaluation reads the store's dim names from the forecast store, not from --dims again."""
    channels = ["geopotential@500", "geopotential@850", "2m_temperature"]
    torch.manual_seed(0)
    model = build_model("minconvgru", channels, 3, 1, padding="cylinder", norm="layer", grid=(16, 32))
    model.normalizer.set_stats([54000.0, 14000.0, 281.0], [3300.0, 900.0, 18.0])
    save_model_file(tmp_path / "m.pt", model)
    dims = json.dumps({"lat": "latitude", "lon": "longitude"})
    out, res = tmp_path / "fc.zarr", tmp_path / "res"
    forecast_job.main(["--model", str(tmp_path / "m.pt"), "--data", tiny_wb2_store, "--dims", dims, "--coarsen", "2",
                       "--context", "4", "--steps", "6", "--init-start", "2015-01-03", "--init-end", "2015-01-04",
                       "--init-every", "12h", "--out", str(out)])
    fc = xr.open_zarr(out)
    assert sorted(fc.data_vars) == ["2m_temperature", "geopotential"] and list(fc["level"].values) == [500, 850]
    assert fc["2m_temperature"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    assert fc["2m_temperature"].attrs["units"] == "K"
    capsys.readouterr()
    skill = evaluate_job.main(["--forecast", str(out), "--out", str(res), "--map-leads", "1"])  # the dims it records
    assert list(skill.data_vars) == channels
    for name in ("geopotential_500", "geopotential_850", "2m_temperature"):
        assert (res / f"skill_{name}.png").exists() and (res / f"maps_{name}.png").exists()
    printed = capsys.readouterr().out
    assert "geopotential@850" in printed and "weighted_rmse 6h" in printed and "rmse_sqrt" not in printed
    assert len(printed.splitlines()) < 12  # the summary, not the 3 x 2 x 4 x 6 rows of metrics.csv


@pytest.fixture(scope="module")
def nan_stores(tmp_path_factory):
    """(clean, with NaN): 2016-02-25 .. 2016-03-08 hourly; the second has a NaN at 2016-03-02T00 (the 2nd init
    time of INIT) and one at 2016-03-02T22 (in the 6-frame context of the 3rd, 2016-03-03T00)."""
    import zarr

    from minconv_dist.data import write_synthetic_era5

    root = tmp_path_factory.mktemp("nan")
    clean, bad = str(root / "clean.zarr"), str(root / "nan.zarr")
    for path in (clean, bad):  # the embedded store's layout: geopotential at level 500 is channel Z
        write_synthetic_era5(path, start="2016-02-25", end="2016-03-08", freq="1h", layout="weatherbench2")
    z = zarr.open_array(os.path.join(bad, "geopotential"), mode="r+")  # (time, level 500/850, lat, lon)
    start = np.datetime64("2016-02-25T00")
    for t in ("2016-03-02T00", "2016-03-02T22"):
        z[int((np.datetime64(t) - start) / np.timedelta64(1, "h")), 0, 5, 7] = np.nan
    return clean, bad


NAN_INITS = f"2 of 4 init times read NaN (channel {Z}: 2016-03-02T00:00:00, 2016-03-03T00:00:00)"


def test_forecast_refuses_inputs_with_nan_unless_allowed(nan_stores, ckpt, tmp_path, capsys, caplog):
    """Refused in one line naming the init times and the channel, before anything is written; --allow-nan
    writes them (NaN), says so in one line and lists them in the store's attrs; a warm-up pass carries a NaN
    to every later init time."""
    _, bad = nan_stores
    out = tmp_path / "fc.zarr"
    args = ["--model", str(ckpt), "--data", bad, "--coarsen", "2", "--context", "6", "--steps", "3", *INIT]
    capsys.readouterr()
    assert run_job(forecast_job.main, [*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {NAN_INITS}: their forecasts would be NaN; choose other init times or pass "
                          "--allow-nan") and len(err.splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.iterdir())

    with caplog.at_level("WARNING"):
        forecast_job.main([*args, "--out", str(out), "--allow-nan"])
    assert [r.getMessage() for r in caplog.records] == [
        f"writing NaN forecasts: {NAN_INITS}; listed in the store's nan_inputs attr"]
    fc = xr.open_zarr(out)
    assert json.loads(fc.attrs["nan_inputs"]) == {Z: ["2016-03-02T00:00:00", "2016-03-03T00:00:00"]}
    finite = np.isfinite(fc["geopotential"].values).reshape(4, -1)
    assert finite[[0, 3]].all() and not finite[[1, 2]].any()  # a NaN pixel spreads over the whole forecast

    warm = ["--model", str(ckpt), "--data", bad, "--coarsen", "2", "--warmup", "48", "--steps", "3", *INIT]
    with pytest.raises(ValueError, match=r"^3 of 4 init times read NaN \(channel geopotential@500: "
                                         r"2016-03-02T00:00:00, 2016-03-03T00:00:00, 2016-03-04T00:00:00\)"):
        forecast_job.main([*warm, "--out", str(tmp_path / "warm.zarr")])


def test_evaluation_reports_nan_and_never_lets_it_change_a_score(nan_stores, ckpt, tmp_path, capsys):
    """A forecast with 2 of 4 init times all NaN (written with --allow-nan), scored against a clean truth: the
    NaN fraction per lead is in metrics.csv and the summary, the model's scores are NaN under both definitions
    (WeatherBench v1's skipna would have scored the other two and said nothing), and --drop-nan-inits scores
    exactly what a forecast of the two clean init times scores, saying how many it left out."""
    clean, bad = nan_stores
    fc = tmp_path / "fc.zarr"
    run = ["--model", str(ckpt), "--coarsen", "2", "--context", "6", "--steps", "3"]
    forecast_job.main([*run, "--data", bad, *INIT, "--out", str(fc), "--allow-nan"])
    score = ["--forecast", str(fc), "--truth", clean]
    for definition in DEFINITIONS:
        capsys.readouterr()
        skill = evaluate_job.main([*score, "--definition", definition, "--out", str(tmp_path / definition)])
        model = skill[Z].sel(source="model")
        scores = [m for m in ("weighted_rmse", "bias", "acc") if m in skill["metric"]]  # WB2's ACC: a climatology
        assert len(scores) >= 2 and np.isnan(model.sel(metric=scores)).all(), definition
        assert np.isfinite(skill[Z].sel(source="persistence", metric="weighted_rmse")).all()
        np.testing.assert_array_equal(model.sel(metric="nan_fraction"), 0.5)  # 2 of 4 init times, every lead
        np.testing.assert_array_equal(skill[Z].sel(metric="truth_nan_fraction"), 0.0)
        table = pd.read_csv(tmp_path / definition / "metrics.csv")
        rows = table[(table["metric"] == "nan_fraction") & (table["source"] == "model")]
        assert list(rows["value"]) == [0.5, 0.5, 0.5] and list(rows["lead_time_h"]) == [1.0, 2.0, 3.0]
        printed = capsys.readouterr().out
        assert "NaN % 1h" in printed and "a score that meets a NaN is NaN" in printed, printed

    skill = evaluate_job.main([*score, "--drop-nan-inits", "--out", str(tmp_path / "dropped")])
    assert "left 2 init times that hold NaN out of every score" in capsys.readouterr().out
    two = tmp_path / "two.zarr"
    forecast_job.main([*run, "--data", bad, "--init-start", "2016-03-01", "--init-end", "2016-03-04",
                       "--init-every", "72h", "--out", str(two)])
    expected = evaluate_job.main(["--forecast", str(two), "--truth", clean, "--out", str(tmp_path / "two")])
    scores = ["weighted_rmse", "bias", "acc"]
    np.testing.assert_allclose(skill[Z].sel(metric=scores), expected[Z].sel(metric=scores), rtol=1e-6)
    assert skill.attrs["nan_inits_dropped"] == 2 and expected.attrs["nan_inits_dropped"] == 0


def test_an_output_endpoint_that_refuses_fails_at_once_in_one_line(store, ckpt, capsys):
    """One line naming --out (was a botocore traceback), before the model or the data are read."""
    from minconv_dist.train.local_ray import free_port

    options = json.dumps({"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": "s"})
    capsys.readouterr()
    assert run_job(forecast_job.main, ["--model", str(ckpt), "--coarsen", "2", "--context", "4", "--steps", "2",
                                       *INIT, "--out", "s3://bucket/fc.zarr", "--out-storage-options", options]) == 2
    err = capsys.readouterr().err
    assert err == ("error: cannot reach output 's3://bucket/fc.zarr': EndpointConnectionError (--debug shows the "
                   "traceback)\n"), err


def test_an_output_endpoint_that_never_answers_fails_in_bounded_time(silent_endpoint, store, ckpt):
    """The forecast job asks the --out endpoint once, with store.REACH_TIMEOUT_S as the deadline (set to 3 s
    here; 60 s by default), and ends in one line, exit code 2, instead of waiting out botocore's and s3fs's
    retries (425 s before). In a fresh interpreter, whose exit would show any coroutine left behind."""
    import subprocess
    import sys

    options = {"endpoint_url": silent_endpoint, "key": "k", "secret": "s"}
    code = ("import sys, time\n"
            "import minconv_dist.data.store as store\n"
            "from jobs.forecast import main\n"
            "from minconv_dist.errors import run_job\n"
            "store.REACH_TIMEOUT_S = 3\n"
            "start = time.monotonic()\n"
            f"rc = run_job(main, ['--model', {str(ckpt)!r}, '--data', {store!r}, '--coarsen', '2', *{INIT!r}, "
            f"'--out', 's3://bucket/fc.zarr', '--out-storage-options', {json.dumps(options)!r}])\n"
            "print(time.monotonic() - start)\n"
            "sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 2, out
    assert out.stderr == ("error: cannot reach output 's3://bucket/fc.zarr': no answer in time (FSTimeoutError) "
                          "(--debug shows the traceback)\n"), out
    assert 3 <= float(out.stdout) < 15
