"""The WeatherBench2 forecast layout: channel names to WB2 variables with a level dim and back, CF attributes."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from minconv_dist.data import DimNames, open_store
from minconv_dist.evaluate import (from_weatherbench2, label, store_channels, to_weatherbench2, weatherbench2_key,
                                   with_cf_attrs)

DIMS = ("time", "prediction_timedelta", "latitude", "longitude")


def internal(channels: list[str]) -> xr.Dataset:
    """One (time, prediction_timedelta, latitude, longitude) variable per channel, distinct values each."""
    shape = (2, 3, 4, 5)
    coords = {"time": pd.date_range("2016-01-01", periods=2, freq="D").values,
              "prediction_timedelta": np.arange(1, 4) * np.timedelta64(6, "h"),
              "latitude": [60.0, 20.0, -20.0, -60.0], "longitude": np.arange(5) * 72.0}
    return xr.Dataset({c: (DIMS, np.full(shape, float(k)) + np.arange(np.prod(shape)).reshape(shape))
                       for k, c in enumerate(channels)}, coords=coords)


@pytest.mark.parametrize("channel, key", [
    ("z", ("geopotential", 500)), ("geopotential@500", ("geopotential", 500)), ("z@850", ("geopotential", 850)),
    ("t", ("temperature", 850)), ("t2m", ("2m_temperature", None)), ("2m_temperature", ("2m_temperature", None)),
    ("u10", ("10m_u_component_of_wind", None)), ("c0", ("c0", None)), ("vorticity@300", ("vorticity", 300)),
    ("temperature@512.5", ("temperature", 512.5)),
])
def test_channel_names_map_to_weatherbench2(channel, key):
    assert weatherbench2_key(channel) == key
    assert label(channel) == (key[0] if key[1] is None else f"{key[0]}@{key[1]}")


def test_levels_of_one_variable_become_a_level_dim_and_round_trip():
    channels = ["geopotential@850", "z", "temperature@850", "t2m", "c0"]
    ds = internal(channels)
    wb2 = to_weatherbench2(ds)
    assert sorted(wb2.data_vars) == ["2m_temperature", "c0", "geopotential", "temperature"]
    assert wb2["geopotential"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
    assert wb2["2m_temperature"].dims == DIMS and wb2["c0"].dims == DIMS
    assert list(wb2["level"].values) == [500, 850] and wb2["level"].dtype.kind == "i"
    np.testing.assert_array_equal(wb2["geopotential"].sel(level=500), ds["z"])
    np.testing.assert_array_equal(wb2["geopotential"].sel(level=850), ds["geopotential@850"])
    assert wb2["temperature"].sel(level=500).isnull().all()  # padding: temperature has only 850
    back = from_weatherbench2(wb2, channels)
    assert list(back.data_vars) == channels
    xr.testing.assert_identical(back, ds)
    # the same fields under another store's names: WB2 ones for a WB2-layout truth store
    other = from_weatherbench2(wb2, ["geopotential@500", "2m_temperature", "temperature@500"])
    np.testing.assert_array_equal(other["geopotential@500"], ds["z"])
    np.testing.assert_array_equal(other["2m_temperature"], ds["t2m"])
    # a store of ours offers only the channels it lists (temperature@500 above is padding)
    listed = wb2.assign_attrs(channels='["z", "t2m"]')
    assert list(from_weatherbench2(listed, ["geopotential@500", "temperature@500", "t2m"]).data_vars) == [
        "geopotential@500", "t2m"]


def test_a_variable_on_levels_and_off_them_is_refused():
    with pytest.raises(ValueError, match="clashes"):
        to_weatherbench2(internal(["z", "geopotential@500"]))
    with pytest.raises(ValueError, match="clashes"):
        to_weatherbench2(internal(["geopotential", "geopotential@500"]))


def test_legacy_forecast_layout_is_read():
    ds = internal(["z"]).rename(time="init_time", prediction_timedelta="lead_time")
    back = from_weatherbench2(ds, ["geopotential@500"])
    assert back["geopotential@500"].dims == DIMS


def test_cf_attributes_on_variables_and_coordinates():
    wb2 = with_cf_attrs(to_weatherbench2(internal(["z", "t2m", "c0"])))
    assert wb2["geopotential"].attrs["units"] == "m**2 s**-2" and wb2["2m_temperature"].attrs["units"] == "K"
    assert wb2["c0"].attrs == {}  # unknown: no guess
    for coord, units in (("latitude", "degrees_north"), ("longitude", "degrees_east"), ("level", "hPa")):
        assert wb2[coord].attrs["units"] == units and wb2[coord].attrs["long_name"]
    assert wb2["time"].attrs["long_name"] and wb2["prediction_timedelta"].attrs["long_name"]


def test_store_channels_per_level(tiny_wb2_store, tiny_store):
    wb2 = store_channels(open_store(tiny_wb2_store), DimNames(lat="latitude", lon="longitude"))
    assert sorted(wb2) == ["2m_temperature", "geopotential@500", "geopotential@850", "temperature@500",
                           "temperature@850"]
    assert store_channels(open_store(tiny_store)) == ["z"]
