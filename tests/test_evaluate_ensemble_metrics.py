"""Probabilistic metrics against WeatherBench2's formulas written out by hand (explicit sums over member pairs,
cell areas from their edges) on a grid with pole rows; the fair CRPS of two members against its closed form;
rank histograms; their statistics on a calibrated ensemble; an ensemble truth refused."""
import itertools

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from minconv_dist.evaluate import (crps, crps_per_time, ensemble_mean_rmse, rank_histogram, rmse, score,
                                   spread_skill_ratio, store_channels)

POLES = [-90.0, -60.0, -30.0, 0.0, 30.0, 60.0, 90.0]
# cell edges halfway between rows and at the poles: a pole row gets the half-cell up to +-75
AREA = np.sin(np.deg2rad([-75, -45, -15, 15, 45, 75, 90])) - np.sin(np.deg2rad([-90, -75, -45, -15, 15, 45, 75]))
DIMS = ("time", "prediction_timedelta", "realization", "latitude", "longitude")


def ensemble(values, lats=POLES, n_lon=2) -> xr.Dataset:
    """values [init, lead, member, lat, lon] -> Dataset z with WB2's dims."""
    values = np.asarray(values, float)
    init = pd.date_range("2017-01-01", periods=values.shape[0], freq="D").values
    lead = np.arange(1, values.shape[1] + 1) * np.timedelta64(6, "h")
    return xr.Dataset({"z": (DIMS, values)}, coords={"time": init, "prediction_timedelta": lead,
                                                     "latitude": lats, "longitude": np.arange(n_lon) * 360.0 / n_lon})


def truth_of(fc: xr.Dataset, values) -> xr.Dataset:
    return xr.Dataset({"z": (tuple(d for d in DIMS if d != "realization"), np.asarray(values, float))},
                      coords={k: v for k, v in fc.coords.items() if k != "realization"})


def area_mean(field: np.ndarray) -> np.ndarray:
    """[..., lat, lon] -> [...]: cell-area-weighted mean, by hand."""
    return (field * AREA[:, None]).sum((-2, -1)) / (AREA.sum() * field.shape[-1])


def test_crps_spread_skill_and_ensemble_mean_rmse_equal_weatherbench2_formulas():
    rng = np.random.default_rng(0)
    n, shape = 3, (2, 2, 3, 7, 2)  # 2 inits, 2 leads, 3 members, 7 latitudes with both poles, 2 longitudes
    x = rng.normal(size=shape)
    y = rng.normal(size=(2, 2, 7, 2))
    fc, truth = ensemble(x), truth_of(ensemble(x), y)
    # CRPSSkill - 0.5 CRPSSpread per init time (area means), then the mean over inits
    skill = area_mean(np.mean([abs(x[:, :, k] - y) for k in range(n)], axis=0))
    pairs = sum(abs(x[:, :, i] - x[:, :, j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    expected_crps = (skill - 0.5 * area_mean(pairs)).mean(0)
    np.testing.assert_allclose(crps(fc, truth)["z"], expected_crps, rtol=1e-12)
    # EnsembleMeanMSE per init, time mean, then the root; EnsembleVariance (ddof 1) likewise
    mse = area_mean((x.mean(2) - y) ** 2).mean(0)
    var = area_mean(sum((x[:, :, k] - x.mean(2)) ** 2 for k in range(n)) / (n - 1)).mean(0)
    np.testing.assert_allclose(ensemble_mean_rmse(fc, truth)["z"], np.sqrt(mse), rtol=1e-12)
    np.testing.assert_allclose(spread_skill_ratio(fc, truth)["z"], np.sqrt(var) / np.sqrt(mse), rtol=1e-12)
    # the root after the time mean: not the mean of per-init roots
    assert not np.allclose(ensemble_mean_rmse(fc, truth)["z"], np.sqrt(area_mean((x.mean(2) - y) ** 2)).mean(0))

    table = score(fc, truth, definition="weatherbench2")  # an ensemble gets the probabilistic metrics
    assert list(table["metric"].values) == ["weighted_rmse", "rmse_sqrt_before_time_avg", "bias", "crps",
                                            "spread_skill_ratio", "ensemble_mean_rmse"]
    np.testing.assert_allclose(table["z"].sel(metric="crps"), expected_crps, rtol=1e-12)
    np.testing.assert_allclose(table["z"].sel(metric="weighted_rmse"), np.sqrt(mse), rtol=1e-12)  # of the mean
    np.testing.assert_allclose(table["z"].sel(metric="bias"), area_mean(x.mean(2) - y).mean(0), rtol=1e-12)
    picked = score(fc, truth, definition="weatherbench2", metrics=("crps", "spread_skill_ratio"))
    assert list(picked["metric"].values) == ["crps", "spread_skill_ratio"]
    assert list(score(fc, truth)["metric"].values) == ["weighted_rmse", "bias"]  # WeatherBench v1: none
    with pytest.raises(ValueError, match="unknown metrics"):
        score(fc, truth, metrics=("crps",))  # not a WeatherBench v1 metric


@pytest.mark.parametrize("x1, x2, y", [(1.0, 3.0, 2.0), (1.0, 3.0, 5.0), (-2.0, -2.0, 0.5), (4.0, 1.0, 4.0),
                                       (0.0, 10.0, -3.0)])
def test_fair_crps_of_two_members_is_the_closed_form(x1, x2, y):
    fc = ensemble([[[[[x1]], [[x2]]]]], lats=[0.0], n_lon=1)  # one grid point: the area mean is the value
    truth = truth_of(fc, [[[[y]]]])
    closed = (abs(x1 - y) + abs(x2 - y) - abs(x1 - x2)) / 2
    assert crps(fc, truth)["z"].item() == pytest.approx(closed, abs=1e-12)
    assert crps_per_time(fc, truth)["z"].item() == pytest.approx(closed, abs=1e-12)


def test_fair_crps_per_point_on_a_grid_and_one_member_is_the_mae():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 1, 2, 7, 2))
    y = rng.normal(size=(1, 1, 7, 2))
    fc, truth = ensemble(x), truth_of(ensemble(x), y)
    closed = (abs(x[:, :, 0] - y) + abs(x[:, :, 1] - y) - abs(x[:, :, 0] - x[:, :, 1])) / 2
    assert crps(fc, truth)["z"].item() == pytest.approx(area_mean(closed).item(), rel=1e-12)
    mae = area_mean(abs(x[:, :, 0] - y)).item()
    assert crps(fc.isel(realization=[0]), truth)["z"].item() == pytest.approx(mae, rel=1e-12)
    deterministic = fc.isel(realization=0, drop=True)  # no realization dim: a 1-member ensemble, as in WB2
    assert crps(deterministic, truth)["z"].item() == pytest.approx(mae, rel=1e-12)
    assert spread_skill_ratio(deterministic, truth)["z"].item() == 0.0
    assert ensemble_mean_rmse(deterministic, truth)["z"].item() == pytest.approx(rmse(deterministic, truth)["z"].item())


def test_rank_histogram_by_hand_and_its_ties():
    lats = [-60.0, 0.0, 60.0]  # cells [-90, -30], [-30, 30], [30, 90]: areas 0.5, 1, 0.5
    members = np.array([1.0, 3.0])
    # init 0: truth 0 (below both: rank 0), 2 (rank 1), 4 (rank 2) on the three rows; init 1: all rank 2
    x = np.broadcast_to(members[None, None, :, None, None], (2, 1, 2, 3, 2))
    y = np.stack([np.broadcast_to(np.array([0.0, 2.0, 4.0])[:, None], (3, 2)), np.full((3, 2), 9.0)])[:, None]
    fc = ensemble(x, lats)
    hist = rank_histogram(fc, truth_of(fc, y))["z"]
    assert hist.dims == ("rank", "prediction_timedelta")
    np.testing.assert_allclose(hist.values.ravel(), [(0.25 + 0) / 2, (0.5 + 0) / 2, (0.25 + 1) / 2])
    # ties: a truth equal to all 3 members takes rank 0..3 uniformly at random (fixed by the seed)
    x = np.zeros((4, 1, 3, 7, 500))
    fc = ensemble(x, n_lon=500)
    tied = rank_histogram(fc, truth_of(fc, np.zeros((4, 1, 7, 500))), seed=3)["z"].values.ravel()
    # 14000 points: the binomial standard error of a 1/4 frequency is sqrt(3/16 / 14000) = 0.0037
    np.testing.assert_allclose(tied, 0.25, atol=0.02)
    np.testing.assert_array_equal(tied, rank_histogram(fc, truth_of(fc, np.zeros((4, 1, 7, 500))), seed=3)["z"]
                                  .values.ravel())
    nan_truth = truth_of(fc, np.where(np.arange(7)[:, None] == 0, np.nan, np.zeros((4, 1, 7, 500))))
    assert np.isnan(rank_histogram(fc, nan_truth)["z"]).all()  # NaN propagates, as the other metrics


def calibrated(spread: float, n: int = 8, seed: int = 0) -> tuple[xr.Dataset, xr.Dataset]:
    """Members and truth drawn around one centre per point: the members with std `spread`, the truth with
    std 1 (exchangeable with the members when spread == 1)."""
    rng = np.random.default_rng(seed)
    centre = 5 * rng.normal(size=(20, 2, 1, 7, 100))
    fc = ensemble(centre + spread * rng.normal(size=(20, 2, n, 7, 100)), n_lon=100)
    return fc, truth_of(fc, centre[:, :, 0] + rng.normal(size=(20, 2, 7, 100)))


def test_a_calibrated_ensemble_has_its_expected_scores_and_an_overdispersed_one_fails_them():
    """Members (std s) and truth (std 1) around one centre per point. CRPS = E|X - Y| - E|X - X'| / 2 =
    (sqrt(2 (1 + s²)) - s) / sqrt(pi) for any s, matched by the fair estimator (the plain one, pairs i = j
    included, misses it by s / (2 n sqrt(pi)), 12% at s = 1); at s = 1 (members and truth exchangeable)
    spread/skill -> sqrt(n / (n + 1)) (the ensemble mean's own error) and the rank histogram is flat; a 1.3x
    too wide ensemble breaks both. 28,000 points per lead; each bound is ~5 standard errors of its estimate."""
    n = 8

    def checks(s):
        fc, truth = calibrated(s, n)
        ssr = spread_skill_ratio(fc, truth)["z"].values
        expected_crps = (np.sqrt(2 * (1 + s**2)) - s) / np.sqrt(np.pi)
        hist = rank_histogram(fc, truth)["z"].values
        return (np.abs(ssr / np.sqrt(n / (n + 1)) - 1).max() < 0.03,             # s.e. of the ratio ~0.6%
                np.abs(crps(fc, truth)["z"].values / expected_crps - 1).max() < 0.03,  # s.e. ~0.5%
                np.abs(hist - 1 / (n + 1)).max() < 0.015)                        # binomial s.e. 0.0019

    assert checks(1.0) == (True, True, True)
    assert checks(1.3) == (False, True, False)  # CRPS is right for any spread; calibration is not
    fc, truth = calibrated(1.0, n)
    x, y = fc["z"].values, truth["z"].values
    plain = (abs(x - y[:, :, None]).mean(2) - 0.5 * abs(x[:, :, :, None] - x[:, :, None]).mean((2, 3)))
    plain = area_mean(plain).mean(0)
    assert np.abs(plain / (1 / np.sqrt(np.pi)) - 1).min() > 0.1  # the biased estimator fails the bound


def test_an_ensemble_truth_is_refused():
    fc = ensemble(np.zeros((1, 1, 2, 7, 2)))
    ens_truth = fc.isel(prediction_timedelta=0, drop=True)  # has a realization dim
    for metric in (crps, spread_skill_ratio, ensemble_mean_rmse, rank_histogram):
        with pytest.raises(ValueError, match="scored against one truth"):
            metric(fc, ens_truth)
    with pytest.raises(ValueError, match="scored against one truth"):
        score(fc.isel(realization=0, drop=True), ens_truth, definition="weatherbench2")
    store = ens_truth.rename(realization="number")  # WB2's published ensembles call it `number`
    with pytest.raises(ValueError, match="truth store is an ensemble .*'number'"):
        store_channels(store.rename(latitude="lat", longitude="lon"))
