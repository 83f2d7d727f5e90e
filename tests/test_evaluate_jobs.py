"""Forecast and evaluation jobs end to end on the embedded synthetic store, and their bad-input errors."""
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from jobs import evaluate as evaluate_job
from jobs import forecast as forecast_job

from minconv_dist.data import NormStats, default_store
from minconv_dist.evaluate import check_inputs, load_model, open_channels
from minconv_dist.models import build_model, save_model_file, to_official_state_dict

STATS = NormStats(["z"], [54107.863], [3349.0322])
INIT = ["--init-start", "2016-03-01", "--init-end", "2016-03-04", "--init-every", "24h"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # the embedded store in a cache of this module's own, unset after
        mp.setenv("MINCONV_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield default_store()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("minconvgru", ["z"], 4, 2, padding="cylinder", norm="layer", grid=(16, 32))
    model.normalizer.set_stats(STATS.mean, STATS.std)
    path = tmp_path_factory.mktemp("model") / "model.pt"
    save_model_file(path, model)
    return path


def test_model_file_round_trip_and_official_import(ckpt, tmp_path):
    """The model file carries the statistics in its weights; an official checkpoint has none and takes them."""
    model = load_model(str(ckpt))
    assert model.normalizer.channels == ["z"]
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
    fc = xr.open_zarr(out, consolidated=False)
    assert fc["z"].dims == ("init_time", "lead_time", "latitude", "longitude")
    assert fc["z"].shape == (4, 8, 16, 32)
    assert pd.Timestamp(fc["init_time"].values[0]) == pd.Timestamp("2016-03-01")
    assert (fc["lead_time"].values == np.arange(1, 9) * np.timedelta64(1, "h")).all()
    assert fc.attrs["model_uri"] == str(ckpt) and fc.attrs["coarsen"] == 2 and "data_source" in fc.attrs
    assert 40000 < float(fc["z"].mean()) < 70000  # de-normalised to m²/s²

    res = tmp_path / "res"
    skill = evaluate_job.main(["--forecast", str(out), "--out", str(res), "--climatology-range", "2015-01-01",
                               "2015-12-31", "--definition", "weatherbench2", "--map-leads", "1", "8"])
    assert list(skill["source"].values) == ["model", "persistence", "climatology"]
    table = pd.read_csv(res / "metrics.csv")
    assert set(table["metric"]) == {"weighted_rmse", "rmse_sqrt_before_time_avg", "bias", "acc"}
    assert len(table) == 3 * 4 * 8
    for png in ("skill_z.png", "maps_z.png"):
        assert (res / png).read_bytes()[:4] == b"\x89PNG"
    # persistence is perfect at lead 0 only; at lead 1 h on a smooth field it is already close
    pers = skill["z"].sel(source="persistence", metric="weighted_rmse").values
    assert 0 < pers[0] < pers[-1]

    # a forecast store refuses to be overwritten silently
    with pytest.raises(FileExistsError):
        forecast_job.main(["--model", str(ckpt), "--out", str(out), "--coarsen", "2", *INIT])


def test_bad_inputs_fail_before_rollout(store, ckpt, tmp_path):
    model = load_model(str(ckpt))
    data = open_channels(store, "z", coarsen=2)
    inits = data["time"].values[100:102]
    two = build_model("minconvgru", ["z", "t"], 4, 1, norm="group")
    with pytest.raises(ValueError, match=r"takes channels \['z', 't'\], the data gives \['z'\]"):
        check_inputs(two, data, inits, 4, 4)
    with pytest.raises(ValueError, match="grid"):
        check_inputs(model, open_channels(store, "z"), inits, 4, 4)
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
    history = client.get_metric_history(run.info.run_id, "eval/model/weighted_rmse/z")
    logged = [m.value for m in sorted(history, key=lambda m: m.step)]
    expected = skill["z"].sel(source="model", metric="weighted_rmse").values
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3]
    np.testing.assert_allclose(logged, expected, rtol=1e-6)
    files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"metrics.csv", "skill_z.png", "maps_z.png"} <= files
