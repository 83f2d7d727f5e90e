"""Persistence and climatology baselines, the climatologies against hand-computed values, and the skill
table that puts them beside a model."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from minconv_dist.data import dayofyear_climatology, open_store, weatherbench2_climatology
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
    init, lead = t["time"][[24, 48]], xr.DataArray(np.arange(1, 4) * np.timedelta64(1, "h"), dims="prediction_timedelta")
    p = persistence(t, xr.DataArray(init.values, dims="time"), lead)
    assert p["z"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    for k in range(3):
        np.testing.assert_array_equal(p["z"].isel(prediction_timedelta=k), t["z"].isel(time=[24, 48]))


def test_climatology_by_day_of_year_with_leap_day_fallback():
    clim = xr.Dataset({"z": (("dayofyear", "latitude", "longitude"), np.arange(365.0)[:, None, None] * np.ones((1, 3, 3)))},
                      coords={"dayofyear": np.arange(1, 366), "latitude": LATS, "longitude": LONS})
    valid = xr.DataArray(pd.to_datetime(["2016-01-02 06:00", "2016-12-31 12:00"]).values, dims="valid")
    got = climatology_at(clim, valid)["z"].isel(latitude=0, longitude=0).values
    np.testing.assert_array_equal(got, [1.0, 364.0])  # day 2 -> index 1; leap day 366 -> day 365
    with pytest.raises(ValueError, match="no dayofyear"):
        climatology_at(clim.isel(dayofyear=slice(0, 10)), valid)
    init = xr.DataArray(valid.values[:1], dims="time")
    f = climatology_forecast(clim, init, xr.DataArray([np.timedelta64(1, "D")], dims="prediction_timedelta"))
    assert f["z"].dims == ("time", "prediction_timedelta", "latitude", "longitude") and float(f["z"][0, 0, 0, 0]) == 2.0


def test_climatology_at_picks_day_and_hour():
    days, hours = np.arange(1, 367), np.array([0, 6, 12, 18])
    value = 100.0 * days[:, None] + hours[None, :]  # day 2, hour 6 -> 206
    clim = xr.Dataset({"z": (("dayofyear", "hour", "latitude", "longitude"), value[..., None, None] * np.ones((1, 1, 3, 3)))},
                      coords={"dayofyear": days, "hour": hours, "latitude": LATS, "longitude": LONS})
    valid = xr.DataArray(pd.to_datetime(["2016-01-02 06:00", "2015-03-01 12:00", "2016-12-31 18:00"]).values, dims="valid")
    np.testing.assert_array_equal(climatology_at(clim, valid)["z"][:, 0, 0], [206.0, 6012.0, 36618.0])
    no_leap_day = clim.isel(dayofyear=slice(0, 365))
    assert float(climatology_at(no_leap_day, valid)["z"][2, 0, 0]) == 36518.0  # day 366 -> 365
    init = xr.DataArray(pd.to_datetime(["2016-12-31 06:00"]).values, dims="time")
    lead = xr.DataArray(np.array([6, 12, 18]) * np.timedelta64(1, "h"), dims="prediction_timedelta")
    f = climatology_forecast(clim, init, lead)
    assert f["z"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
    np.testing.assert_array_equal(f["z"][0, :, 0, 0], [36612.0, 36618.0, 100.0])  # the last is 2017-01-01 00:00
    with pytest.raises(ValueError, match="no hour"):
        climatology_at(clim, xr.DataArray(pd.to_datetime(["2016-01-02 03:00"]).values, dims="valid"))


def series(start: str, end: str, value) -> xr.Dataset:
    """A 6-hourly store-like Dataset on a 2x3 grid whose value at every point is `value(times)`."""
    time = pd.date_range(start, end, freq="6h")
    v = np.asarray(value(time), float)[:, None, None] * np.ones((1, 2, 3))
    return xr.Dataset({"z": (("time", "lat", "lon"), v)}, coords={"time": time, "lat": [-45.0, 45.0], "lon": LONS}).chunk()


def wb2_clim(ds: xr.Dataset) -> xr.DataArray:
    clim = weatherbench2_climatology(ds, "z", time_range=None, progress=False)
    assert clim.dims == ("dayofyear", "hour", "channel", "lat", "lon")
    return clim.sel(channel="z").isel(lat=1, lon=2)


# WeatherBench2's 61-day window by hand: weight 1 - |k|/30 at a distance of k days (0 from 30 on); the
# weights sum to 61 - 2 * (1 + ... + 30) / 30 = 30, so a one-day impulse of 1 spreads as (1 - |k|/30) / 30.
def spread(distance: np.ndarray) -> np.ndarray:
    return np.maximum(0.0, 1 - distance / 30) / 30


def test_weatherbench2_climatology_smooths_over_61_days_per_hour():
    clim = wb2_clim(series("2015-01-01", "2015-12-31 18:00", lambda t: (t.day_of_year == 100) + 10.0 * t.hour))
    np.testing.assert_array_equal(clim["hour"], [0, 6, 12, 18])
    np.testing.assert_array_equal(clim["dayofyear"], np.arange(1, 366))  # 2015 has no day 366
    expected = spread(np.abs(np.arange(1, 366) - 100))[:, None] + 10.0 * np.array([0, 6, 12, 18])
    np.testing.assert_allclose(clim, expected, atol=1e-12)
    assert float(clim.sel(dayofyear=110, hour=6)) == pytest.approx(60 + (2 / 3) / 30)


@pytest.mark.parametrize("year, n_days", [("2015", 365), ("2016", 366)])
def test_weatherbench2_climatology_wraps_around_the_year(year, n_days):
    clim = wb2_clim(series(f"{year}-01-01", f"{year}-12-31 18:00", lambda t: (t.day_of_year == 1) * 1.0))
    days = np.arange(1, n_days + 1)
    np.testing.assert_allclose(clim.sel(hour=12), spread(np.minimum(days - 1, n_days + 1 - days)), atol=1e-12)
    assert float(clim.sel(dayofyear=n_days, hour=0)) == pytest.approx((1 - 1 / 30) / 30)  # Dec 31 neighbours Jan 1


def test_weatherbench2_climatology_fills_day_366_of_common_years_with_day_365():
    # 1 all through 2015, 3 all through 2016: with 2015's day 365 standing in for its day 366, every day
    # and hour averages the two years to 2; without it the days near 366 would lean to 2016's 3
    clim = wb2_clim(series("2015-01-01", "2016-12-31 18:00", lambda t: 1.0 + 2 * (t.year == 2016)))
    assert clim.sizes["dayofyear"] == 366
    np.testing.assert_allclose(clim, 2.0, atol=1e-12)


def test_weatherbench2_climatology_on_a_store_against_numpy(tiny_store):
    clim = weatherbench2_climatology(tiny_store, "z", time_range=None, progress=False).sel(channel="z")
    z = open_store(tiny_store).z.values.astype(np.float64).reshape(10, 24, 32, 64)  # Jan 1..10 2015, hourly
    np.testing.assert_array_equal(clim["hour"], np.arange(24))
    for day, distance in ((3, np.abs(np.arange(1, 11) - 3)), (360, np.arange(1, 11) + 5)):  # 360 wraps to Jan
        w = 1 - distance / 30
        expected = (w[:, None, None] * z[:, 5]).sum(0) / w.sum()
        np.testing.assert_allclose(clim.sel(dayofyear=day, hour=5), expected, rtol=1e-6)
    assert np.isnan(clim.sel(dayofyear=100)).all()  # no data within 30 days


def test_dayofyear_climatology_and_to_zarr(tiny_store, tmp_path):
    clim = dayofyear_climatology(tiny_store, "z", progress=False)
    assert clim.dims == ("dayofyear", "channel", "lat", "lon") and clim.sizes["dayofyear"] == 10
    z = open_store(tiny_store).z.values.astype(np.float64)
    np.testing.assert_allclose(clim.sel(dayofyear=3, channel="z").values, z[48:72].mean(0), rtol=1e-6)
    path = str(tmp_path / "clim.zarr")
    clim.to_dataset().to_zarr(path)
    assert xr.open_zarr(path).climatology.load().identical(clim)


def test_skill_table_has_model_and_baselines():
    t = truth()
    init_values = t["time"].values[[30, 50, 70]]
    init = xr.DataArray(init_values, dims="time", coords={"time": init_values})
    lead_values = np.arange(1, 6) * np.timedelta64(1, "h")
    lead = xr.DataArray(lead_values, dims="prediction_timedelta", coords={"prediction_timedelta": lead_values})
    valid = t["z"].rename(time="valid_time").sel(valid_time=init + lead).drop_vars("valid_time")
    perfect = xr.Dataset({"z": valid}).transpose("time", "prediction_timedelta", ...)
    clim = t.groupby("time.dayofyear").mean()
    skill = evaluate_forecast(perfect, t, clim, "weatherbench2", name="perfect")
    assert list(skill["source"].values) == ["perfect", "persistence", "climatology"]
    assert skill["z"].dims == ("source", "metric", "prediction_timedelta")
    np.testing.assert_allclose(skill["z"].sel(source="perfect", metric="weighted_rmse"), 0.0, atol=1e-12)
    np.testing.assert_allclose(skill["z"].sel(source="perfect", metric="acc"), 1.0)
    assert (skill["z"].sel(source="persistence", metric="rmse_sqrt_before_time_avg") > 0).all()
