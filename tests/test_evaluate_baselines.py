"""Persistence and climatology baselines, and the skill table that puts them beside a model."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from minconv_dist.evaluate import climatology_at, climatology_forecast, evaluate_forecast, persistence

LATS, LONS = [-45.0, 0.0, 45.0], [0.0, 120.0, 240.0]


def truth(days=6) -> xr.Dataset:
    time = pd.date_range("2016-12-28", periods=days * 24, freq="h").values
    rng = np.random.default_rng(0)
    v = np.cumsum(rng.standard_normal((time.size, 3, 3)), axis=0)
    return xr.Dataset({"z": (("time", "latitude", "longitude"), v)},
                      coords={"time": time, "latitude": LATS, "longitude": LONS})


def test_persistence_holds_the_init_state():
    t = truth()
    init, lead = t["time"][[24, 48]], xr.DataArray(np.arange(1, 4) * np.timedelta64(1, "h"), dims="lead_time")
    p = persistence(t, xr.DataArray(init.values, dims="init_time"), lead)
    assert p["z"].dims == ("init_time", "lead_time", "latitude", "longitude")
    for k in range(3):
        np.testing.assert_array_equal(p["z"].isel(lead_time=k), t["z"].isel(time=[24, 48]))


def test_climatology_by_day_of_year_with_leap_day_fallback():
    clim = xr.Dataset({"z": (("dayofyear", "latitude", "longitude"), np.arange(365.0)[:, None, None] * np.ones((1, 3, 3)))},
                      coords={"dayofyear": np.arange(1, 366), "latitude": LATS, "longitude": LONS})
    valid = xr.DataArray(pd.to_datetime(["2016-01-02 06:00", "2016-12-31 12:00"]).values, dims="valid")
    got = climatology_at(clim, valid)["z"].isel(latitude=0, longitude=0).values
    np.testing.assert_array_equal(got, [1.0, 364.0])  # day 2 -> index 1; leap day 366 -> day 365
    with pytest.raises(ValueError, match="no dayofyear"):
        climatology_at(clim.isel(dayofyear=slice(0, 10)), valid)
    init = xr.DataArray(valid.values[:1], dims="init_time")
    f = climatology_forecast(clim, init, xr.DataArray([np.timedelta64(1, "D")], dims="lead_time"))
    assert f["z"].dims == ("init_time", "lead_time", "latitude", "longitude") and float(f["z"][0, 0, 0, 0]) == 2.0


def test_skill_table_has_model_and_baselines():
    t = truth()
    init_values = t["time"].values[[30, 50, 70]]
    init = xr.DataArray(init_values, dims="init_time", coords={"init_time": init_values})
    lead_values = np.arange(1, 6) * np.timedelta64(1, "h")
    lead = xr.DataArray(lead_values, dims="lead_time", coords={"lead_time": lead_values})
    perfect = xr.Dataset({"z": t["z"].sel(time=init + lead).drop_vars("time")}).transpose("init_time", "lead_time", ...)
    clim = t.groupby("time.dayofyear").mean()
    skill = evaluate_forecast(perfect, t, clim, "weatherbench2", name="perfect")
    assert list(skill["source"].values) == ["perfect", "persistence", "climatology"]
    assert skill["z"].dims == ("source", "metric", "lead_time")
    np.testing.assert_allclose(skill["z"].sel(source="perfect", metric="weighted_rmse"), 0.0, atol=1e-12)
    np.testing.assert_allclose(skill["z"].sel(source="perfect", metric="acc"), 1.0)
    assert (skill["z"].sel(source="persistence", metric="rmse_sqrt_before_time_avg") > 0).all()
