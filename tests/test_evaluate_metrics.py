"""Metrics against values computed by hand (numpy arithmetic written out here), on grids with and without
pole rows; WeatherBench2 against WeatherBench v1 forms; alignment errors."""
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from minconv_dist.evaluate import (acc, acc_per_time, align_truth, bias, cell_area_weights, compute_weighted_acc,
                                   compute_weighted_rmse, cos_latitude_weights, mse_per_time, rmse,
                                   rmse_sqrt_before_time_avg, score)

LATS = [-60.0, 0.0, 60.0]  # cos = 0.5, 1, 0.5; mean 2/3 -> weights 0.75, 1.5, 0.75 (cell areas agree)
POLES = [-90.0, -60.0, -30.0, 0.0, 30.0, 60.0, 90.0]  # with pole rows
NO_POLES = [-75.0, -45.0, -15.0, 15.0, 45.0, 75.0]  # cell centres, no pole rows
# cell edges by hand: halfway between rows, and the poles; a pole row gets the half-cell up to +-75
POLES_AREA = np.sin(np.deg2rad([-75, -45, -15, 15, 45, 75, 90])) - np.sin(np.deg2rad([-90, -75, -45, -15, 15, 45, 75]))
NO_POLES_AREA = np.sin(np.deg2rad([-60, -30, 0, 30, 60, 90])) - np.sin(np.deg2rad([-90, -60, -30, 0, 30, 60]))


def field(values, lats=LATS, n_lon=2) -> xr.Dataset:
    """values: [init, lead, lat] broadcast over n_lon longitudes -> Dataset with variable z."""
    v = np.broadcast_to(np.asarray(values, float)[..., None], np.shape(values) + (n_lon,))
    init = pd.date_range("2017-01-01", periods=v.shape[0], freq="D").values
    lead = np.arange(1, v.shape[1] + 1) * np.timedelta64(1, "h")
    return xr.Dataset({"z": (("time", "prediction_timedelta", "latitude", "longitude"), v)},
                      coords={"time": init, "prediction_timedelta": lead, "latitude": lats, "longitude": [0.0, 180.0][:n_lon]})


def test_cell_area_weights_with_and_without_pole_rows():
    w = cell_area_weights(xr.DataArray(POLES, dims="latitude"))
    np.testing.assert_allclose(w, POLES_AREA / POLES_AREA.mean())
    assert w.dims == ("latitude",) and w[0] > 0  # the pole row keeps its half-cell
    assert float(cos_latitude_weights(xr.DataArray(POLES, dims="latitude"))[0]) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(cell_area_weights(xr.DataArray(POLES[::-1], dims="latitude")),
                               POLES_AREA[::-1] / POLES_AREA.mean())  # descending latitude
    # without pole rows, equally spaced: cell areas are proportional to cos(latitude)
    lat = xr.DataArray(NO_POLES, dims="latitude")
    np.testing.assert_allclose(cell_area_weights(lat), NO_POLES_AREA / NO_POLES_AREA.mean())
    np.testing.assert_allclose(cell_area_weights(lat), cos_latitude_weights(lat))
    for bad in ([0.0, 0.0, 30.0], [-95.0, 0.0]):
        with pytest.raises(ValueError, match="distinct and within"):
            cell_area_weights(xr.DataArray(bad, dims="latitude"))


def test_cos_latitude_weights_known_grid():
    w = cos_latitude_weights(xr.DataArray(LATS, dims="latitude"))
    np.testing.assert_allclose(w, [0.75, 1.5, 0.75])
    # a WeatherBench 5.625° grid: weights have mean 1 and are symmetric
    lat = -90 + 5.625 / 2 + 5.625 * np.arange(32)
    w = cos_latitude_weights(xr.DataArray(lat, dims="latitude")).values
    assert w.mean() == pytest.approx(1.0) and np.allclose(w, w[::-1])
    assert w[0] == pytest.approx(np.cos(np.deg2rad(lat[0])) / np.cos(np.deg2rad(lat)).mean())


def test_rmse_weighted_by_latitude():
    truth = field(np.zeros((1, 1, 3)))
    fc = field([[[1.0, 2.0, 3.0]]])
    # (0.75*1 + 1.5*4 + 0.75*9) / 3 = 4.5; one init time, so every form agrees
    for metric in (rmse, rmse_sqrt_before_time_avg, compute_weighted_rmse):
        assert metric(fc, truth)["z"].item() == pytest.approx(np.sqrt(4.5))


def test_rmse_takes_the_root_after_the_time_mean_and_bias():
    # fixed: weatherbench2's RMSE was asserted as mean(1, 3) = 2, which is RMSESqrtBeforeTimeAvg
    truth = field(np.zeros((2, 1, 3)))
    fc = field([[[1.0] * 3], [[-3.0] * 3]])  # init 0 off by +1, init 1 by -3
    np.testing.assert_allclose(mse_per_time(fc, truth)["z"].values.ravel(), [1.0, 9.0])
    assert rmse(fc, truth)["z"].item() == pytest.approx(np.sqrt(5.0))  # sqrt(mean(1, 9))
    assert rmse_sqrt_before_time_avg(fc, truth)["z"].item() == pytest.approx(2.0)  # mean(1, 3)
    assert compute_weighted_rmse(fc, truth)["z"].item() == pytest.approx(np.sqrt(5.0))
    assert bias(fc, truth)["z"].item() == pytest.approx(-1.0)


@pytest.mark.parametrize("lats, area", [(POLES, POLES_AREA), (NO_POLES, NO_POLES_AREA)])
def test_area_weighted_errors_against_hand_values(lats, area):
    e = np.arange(1.0, len(lats) + 1)  # error per latitude row at init 0; doubled at init 1
    truth = field(np.zeros((2, 1, len(lats))), lats)
    fc = field([[e], [2 * e]], lats)
    m0 = (area * e**2).sum() / area.sum()
    b0 = (area * e).sum() / area.sum()
    np.testing.assert_allclose(mse_per_time(fc, truth)["z"].values.ravel(), [m0, 4 * m0])
    assert rmse(fc, truth)["z"].item() == pytest.approx(np.sqrt((m0 + 4 * m0) / 2))
    assert rmse_sqrt_before_time_avg(fc, truth)["z"].item() == pytest.approx((np.sqrt(m0) + 2 * np.sqrt(m0)) / 2)
    assert bias(fc, truth)["z"].item() == pytest.approx((b0 + 2 * b0) / 2)
    # WeatherBench v1: cos-latitude weights with mean 1, one mean over time and latitude
    w = np.cos(np.deg2rad(lats)) / np.cos(np.deg2rad(lats)).mean()
    v1 = np.sqrt(((w * e**2).mean() + (w * 4 * e**2).mean()) / 2)
    assert compute_weighted_rmse(fc, truth)["z"].item() == pytest.approx(v1)
    assert (v1 == pytest.approx(np.sqrt(2.5 * m0))) == (lats is NO_POLES)  # the two agree without pole rows


def test_acc_hand_computed():
    clim = field(np.zeros((1, 1, 3)))
    # weatherbench v1: anomalies minus their mean: fa' = [-2, -1, 3], a' = [-1, 0, 1]
    fc, truth = field([[[1.0, 2.0, 6.0]]]), field([[[0.0, 1.0, 2.0]]])
    expected = (0.75 * 2 + 0.75 * 3) / np.sqrt((0.75 * 4 + 1.5 + 0.75 * 9) * (0.75 + 0.75))
    assert compute_weighted_acc(fc, truth, clim)["z"].item() == pytest.approx(expected)
    # weatherbench2: no mean removal; per init then averaged. Fixed: this asserted cos-latitude weights
    # (4/3, 2/3); rows (0, 60) have cells [-90, 30] and [30, 90], areas 1.5 and 0.5
    lats = [0.0, 60.0]
    area = np.sin(np.deg2rad([30, 90])) - np.sin(np.deg2rad([-90, 30]))
    np.testing.assert_allclose(area, [1.5, 0.5])
    fc2 = field([[[1.0, 1.0]], [[1.0, 1.0]]], lats)
    truth2 = field([[[1.0, -1.0]], [[1.0, 1.0]]], lats)
    clim2 = field(np.zeros((2, 1, 2)), lats)
    # init 0: (1.5 - 0.5) / sqrt(2 * 2) = 1/2; init 1: 1
    assert acc(fc2, truth2, clim2)["z"].item() == pytest.approx((1 / 2 + 1) / 2)


def test_acc_per_time_then_mean_on_a_grid_with_pole_rows():
    f = np.array([1.0, 0.0, 2.0, -1.0, 0.0, 1.0, 3.0])  # forecast anomaly per row
    o = np.array([2.0, 1.0, 1.0, -1.0, 1.0, 0.0, 2.0])  # observed anomaly per row; negated at init 1
    clim = field(np.full((2, 1, 7), 10.0), POLES)
    fc, truth = field([[10 + f], [10 + f]], POLES), field([[10 + o], [10 - o]], POLES)
    wb2 = (POLES_AREA * f * o).sum() / np.sqrt((POLES_AREA * f**2).sum() * (POLES_AREA * o**2).sum())
    np.testing.assert_allclose(acc_per_time(fc, truth, clim)["z"].values.ravel(), [wb2, -wb2])
    assert acc(fc, truth, clim)["z"].item() == pytest.approx(0.0, abs=1e-12)
    # v1: cos weights (0 at the poles), mean anomaly over time and latitude removed, one sum over both
    w = np.cos(np.deg2rad(POLES))
    F, O = np.stack([f, f]), np.stack([o, -o])
    F, O = F - F.mean(), O - O.mean()
    v1 = (w * F * O).sum() / np.sqrt((w * F**2).sum() * (w * O**2).sum())
    assert compute_weighted_acc(fc, truth, clim)["z"].item() == pytest.approx(v1)


def test_score_labels_follow_the_definition_and_reject_unknown_names():
    e = np.arange(1.0, 8.0)
    truth, fc = field(np.zeros((2, 3, 7)), POLES), field(np.broadcast_to(e, (2, 3, 7)), POLES)
    wb2, v1 = score(fc, truth, definition="weatherbench2"), score(fc, truth)
    assert list(wb2["metric"].values) == ["weighted_rmse", "rmse_sqrt_before_time_avg", "bias"]  # no climatology: no ACC
    assert list(v1["metric"].values) == ["weighted_rmse", "bias"]
    assert wb2["z"].dims == ("metric", "prediction_timedelta")
    np.testing.assert_allclose(wb2["z"].sel(metric="weighted_rmse"), rmse(fc, truth)["z"])
    np.testing.assert_allclose(v1["z"].sel(metric="weighted_rmse"), compute_weighted_rmse(fc, truth)["z"])
    assert not np.allclose(wb2["z"].sel(metric="weighted_rmse"), v1["z"].sel(metric="weighted_rmse"))
    clim = field(np.zeros((2, 3, 7)), POLES)
    assert list(score(fc, truth, clim, "weatherbench2", metrics=("acc",))["metric"].values) == ["acc"]
    with pytest.raises(ValueError, match="definition"):
        score(fc, truth, definition="weatherbench3")
    with pytest.raises(ValueError, match="unknown metrics"):
        score(fc, truth, metrics=("crps",))
    with pytest.raises(ValueError, match="unknown metrics"):
        score(fc, truth, definition="weatherbench", metrics=("rmse_sqrt_before_time_avg",))


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
    assert float(t["z"].isel(time=1, prediction_timedelta=1, latitude=0, longitude=0)) == 26.0


@pytest.mark.parametrize("change, message", [
    (lambda t: t.rename(z="t2m"), "not in the truth"),
    (lambda t: t.assign_coords(latitude=[-50.0, 0.0, 50.0]), "grids differ in latitude"),
    (lambda t: t.isel(longitude=[0]), "grids differ in longitude"),
    (lambda t: t.isel(time=slice(0, 30)), "valid times"),
])
def test_align_truth_rejects_mismatches(change, message):
    with pytest.raises(ValueError, match=message):
        align_truth(field(np.zeros((2, 12, 3))), change(truth_series()))
