"""Metrics against hand-computed values; the cos-lat weighting against a known grid; alignment errors."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from minconv_dist.evaluate import acc, align_truth, bias, latitude_weights, rmse, score, weighted_rmse

LATS = [-60.0, 0.0, 60.0]  # cos = 0.5, 1, 0.5; mean 2/3 -> weights 0.75, 1.5, 0.75


def field(values, lats=LATS, n_lon=2) -> xr.Dataset:
    """values: [init, lead, lat] broadcast over n_lon longitudes -> Dataset with variable z."""
    v = np.broadcast_to(np.asarray(values, float)[..., None], np.shape(values) + (n_lon,))
    init = pd.date_range("2017-01-01", periods=v.shape[0], freq="D").values
    lead = np.arange(1, v.shape[1] + 1) * np.timedelta64(1, "h")
    return xr.Dataset({"z": (("init_time", "lead_time", "latitude", "longitude"), v)},
                      coords={"init_time": init, "lead_time": lead, "latitude": lats, "longitude": [0.0, 180.0][:n_lon]})


def test_latitude_weights_known_grid():
    w = latitude_weights(xr.DataArray(LATS, dims="latitude"))
    np.testing.assert_allclose(w, [0.75, 1.5, 0.75])
    # a WeatherBench 5.625° grid: weights have mean 1 and are symmetric
    lat = -90 + 5.625 / 2 + 5.625 * np.arange(32)
    w = latitude_weights(xr.DataArray(lat, dims="latitude")).values
    assert w.mean() == pytest.approx(1.0) and np.allclose(w, w[::-1])
    assert w[0] == pytest.approx(np.cos(np.deg2rad(lat[0])) / np.cos(np.deg2rad(lat)).mean())


def test_rmse_weighted_by_latitude():
    truth = field(np.zeros((1, 1, 3)))
    fc = field([[[1.0, 2.0, 3.0]]])
    assert rmse(fc, truth)["z"].item() == pytest.approx(np.sqrt((1 + 4 + 9) / 3))
    # (0.75*1 + 1.5*4 + 0.75*9) / 3 = 4.5
    for definition in ("weatherbench", "weatherbench2"):
        assert weighted_rmse(fc, truth, definition)["z"].item() == pytest.approx(np.sqrt(4.5))


def test_weatherbench_vs_weatherbench2_rmse_and_bias():
    truth = field(np.zeros((2, 1, 3)))
    fc = field([[[1.0] * 3], [[-3.0] * 3]])  # init 0 off by +1, init 1 by -3
    assert weighted_rmse(fc, truth, "weatherbench")["z"].item() == pytest.approx(np.sqrt(5.0))  # sqrt(mean(1, 9))
    assert weighted_rmse(fc, truth, "weatherbench2")["z"].item() == pytest.approx(2.0)  # mean(1, 3)
    assert bias(fc, truth)["z"].item() == pytest.approx(-1.0)


def test_acc_hand_computed():
    clim = field(np.zeros((1, 1, 3)))
    # weatherbench: anomalies minus their mean: fa' = [-2, -1, 3], a' = [-1, 0, 1]
    fc, truth = field([[[1.0, 2.0, 6.0]]]), field([[[0.0, 1.0, 2.0]]])
    expected = (0.75 * 2 + 0.75 * 3) / np.sqrt((0.75 * 4 + 1.5 + 0.75 * 9) * (0.75 + 0.75))
    assert acc(fc, truth, clim, "weatherbench")["z"].item() == pytest.approx(expected)
    # weatherbench2: no mean removal; per init then averaged. lats (0, 60): weights 4/3, 2/3
    lats = [0.0, 60.0]
    fc2 = field([[[1.0, 1.0]], [[1.0, 1.0]]], lats)
    truth2 = field([[[1.0, -1.0]], [[1.0, 1.0]]], lats)
    clim2 = field(np.zeros((2, 1, 2)), lats)
    # init 0: (4/3 - 2/3) / sqrt(2 * 2) = 1/3; init 1: 1
    assert acc(fc2, truth2, clim2, "weatherbench2")["z"].item() == pytest.approx((1 / 3 + 1) / 2)


def test_score_stacks_metrics_per_lead_and_rejects_unknown_names():
    truth = field(np.zeros((2, 3, 3)))
    fc = field(np.ones((2, 3, 3)))
    s = score(fc, truth)
    assert list(s["metric"].values) == ["rmse", "weighted_rmse", "bias"]  # no climatology: no ACC
    assert s["z"].dims == ("metric", "lead_time")
    np.testing.assert_allclose(s["z"].sel(metric="bias"), 1.0)
    with pytest.raises(ValueError, match="definition"):
        weighted_rmse(fc, truth, "weatherbench3")
    with pytest.raises(ValueError, match="unknown metrics"):
        score(fc, truth, metrics=("crps",))


def truth_series(days=5, lats=LATS) -> xr.Dataset:
    time = pd.date_range("2017-01-01", periods=days * 24, freq="h").values
    v = np.arange(time.size, dtype=float)[:, None, None] * np.ones((1, len(lats), 2))
    return xr.Dataset({"z": (("time", "latitude", "longitude"), v)},
                      coords={"time": time, "latitude": lats, "longitude": [0.0, 180.0]})


def test_align_truth_picks_valid_times_and_reorders_latitude():
    truth = truth_series().isel(latitude=slice(None, None, -1))  # descending in the truth
    fc = field(np.zeros((2, 3, 3)))
    t = align_truth(fc, truth)
    assert t["z"].dims == fc["z"].dims and list(t["latitude"].values) == LATS
    # init day 1 (hour 24) + lead 2 h -> value 26
    assert float(t["z"].isel(init_time=1, lead_time=1, latitude=0, longitude=0)) == 26.0


@pytest.mark.parametrize("change, message", [
    (lambda t: t.rename(z="t2m"), "not in the truth"),
    (lambda t: t.assign_coords(latitude=[-50.0, 0.0, 50.0]), "grids differ in latitude"),
    (lambda t: t.isel(longitude=[0]), "grids differ in longitude"),
    (lambda t: t.isel(time=slice(0, 30)), "valid times"),
])
def test_align_truth_rejects_mismatches(change, message):
    with pytest.raises(ValueError, match=message):
        align_truth(field(np.zeros((2, 12, 3))), change(truth_series()))
