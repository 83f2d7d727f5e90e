"""What the plots say: units on the axes and colour bars that carry them, latitude and longitude on the maps."""
import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.evaluate import evaluate_forecast
from minconv_dist.evaluate.plots import maps_figure, skill_figure


def fields(values: np.ndarray, name: str, dims: tuple[str, ...], **coords) -> xr.Dataset:
    lat, lon = np.linspace(-80, 80, 4), np.arange(0, 360, 45.0)
    return xr.Dataset({name: (dims, values.astype(np.float32))}, coords={"latitude": lat, "longitude": lon, **coords})


def skill_and_truth(name: str, truth_units: str | None):
    rng = np.random.default_rng(0)
    times = pd.date_range("2016-01-01", periods=10, freq="6h").values
    leads = np.arange(1, 3) * np.timedelta64(6, "h")
    truth = fields(rng.normal(size=(10, 4, 8)), name, ("time", "latitude", "longitude"), time=times)
    if truth_units:
        truth[name].attrs["units"] = truth_units
    fc = fields(rng.normal(size=(4, 2, 4, 8)), name, ("time", "prediction_timedelta", "latitude", "longitude"),
                time=times[:4], prediction_timedelta=leads)
    return evaluate_forecast(fc, truth), fc, truth


def test_skill_axes_carry_the_units_of_the_store_else_era5s():
    skill, _, _ = skill_and_truth("z", None)
    rmse, acc = skill_figure(skill, "z").axes
    assert rmse.get_ylabel() == "lat-weighted RMSE (geopotential@500) [m**2 s**-2]"  # ERA5's, by its WB2 name
    assert acc.get_ylabel() == "ACC (geopotential@500)"  # no unit
    assert skill_figure(skill, "z", ("bias",), unit="m2 s-2").axes[0].get_ylabel().endswith("[m2 s-2]")


def test_maps_name_latitude_longitude_and_the_colour_bars_unit():
    skill, fc, truth = skill_and_truth("vorticity", "s-1")  # no ERA5 default: the store's attr
    fig = maps_figure(fc, truth, "vorticity", leads=[1, 2])
    panels = [ax for ax in fig.axes if ax.get_title()]
    bars = [ax for ax in fig.axes if not ax.get_title()]
    assert len(panels) == len(bars) == 6
    assert {ax.get_xlabel() for ax in panels} == {"longitude [°E]"} and {ax.get_ylabel() for ax in panels} == {
        "latitude [°N]"}
    assert {ax.get_ylabel() for ax in bars} == {"s-1"}
