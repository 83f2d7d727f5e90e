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


def test_an_ensemble_sources_line_has_one_colour_in_every_panel():
    """The spread/skill panel leaves deterministic sources out; their absence must not shift the ensembles'
    colours, or the panels' legends disagree."""
    from minconv_dist.evaluate.ensemble_report import ensemble_skill_figure
    from minconv_dist.evaluate.layout import LEAD

    sources = ["deterministic", "ensemble A", "ensemble B", "persistence"]
    metrics = ["crps", "spread_skill_ratio", "ensemble_mean_rmse"]
    leads = pd.to_timedelta([6, 12, 24], unit="h")
    values = np.random.default_rng(0).uniform(1, 2, (len(sources), len(metrics), len(leads)))
    skill = xr.Dataset({"geopotential@500": (("source", "metric", LEAD), values)},
                       coords={"source": sources, "metric": metrics, LEAD: leads,
                               "members": ("source", [1, 8, 8, 1])})
    fig = ensemble_skill_figure(skill, "geopotential@500")
    colours = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in fig.axes]
    assert "ensemble A (8 members)" in colours[1] and "deterministic" not in colours[1]
    for label in ("ensemble A (8 members)", "ensemble B (8 members)"):
        assert len({panel[label] for panel in colours}) == 1, [panel[label] for panel in colours]
    assert colours[0]["ensemble A (8 members)"] != colours[0]["ensemble B (8 members)"]
