"""Synthetic ERA5-like store and Navier–Stokes generator: physics, magnitudes, time scales, resumable writes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import torch
import xarray as xr

from minconv_dist.data import (DimNames, channel_bounds, default_store, generate_navier_stokes, open_store,
                               select_channels, write_synthetic_era5)
from minconv_dist.data import navier_stokes as ns
from minconv_dist.data import synthetic
from minconv_dist.simulate import navier_stokes as solver

from tests.conftest import TINY

YEAR = {"start": "2015-01-01", "end": "2016-01-01", "freq": "6h"}
WB2 = DimNames(lat="latitude", lon="longitude")
CHANNELS = ["geopotential@500", "geopotential@850", "temperature@500", "temperature@850", "2m_temperature"]


@pytest.fixture(scope="module")
def year(tmp_path_factory) -> xr.Dataset:
    """A year 6-hourly in the WeatherBench2 layout, loaded."""
    path = str(tmp_path_factory.mktemp("year") / "wb2.zarr")
    write_synthetic_era5(path, **YEAR, layout="weatherbench2")
    return open_store(path).load()


def test_synthetic_z500_magnitudes_and_predictability(tmp_path, year):
    path = str(tmp_path / "year.zarr")
    write_synthetic_era5(path, **YEAR)
    z = open_store(path).z
    assert z.dims == ("time", "lat", "lon") and z.shape == (1460, 32, 64)
    values = z.values.astype(np.float64)
    assert 53500 < values.mean() < 54700 and 2900 < values.std() < 3700
    lat = z.lat.values
    assert np.allclose(np.diff(lat), 5.625) and lat[0] == -87.1875
    # seasonal cycle: the northern mid-latitudes are lower in January than in July
    north = (lat > 30) & (lat < 70)
    jan, jul = values[:124][:, north].mean(), values[724:848][:, north].mean()
    assert jul - jan > 1000
    # travelling waves: 6 h persistence error is far below the field's own variability
    anomaly = values - values.mean(0)
    assert np.sqrt(((values[1:] - values[:-1]) ** 2).mean()) < 0.3 * anomaly.std()
    # one z500 model: the single-variable layout's z is the multi-variable layout's geopotential at 500
    np.testing.assert_array_equal(values, year.geopotential.sel(level=500).values)


def test_wb2_layout_variables_statics_and_statistics(year):
    """WeatherBench2 names and dims, static fields without a time dim, ERA5-like statistics inside the plausible
    ranges of data/checks.py."""
    assert year.geopotential.dims == year.temperature.dims == ("time", "level", "latitude", "longitude")
    assert year["2m_temperature"].dims == ("time", "latitude", "longitude")
    assert year.level.values.tolist() == [500, 850] and year.latitude.values[0] < 0  # south to north, as WB2
    for static in ("geopotential_at_surface", "land_sea_mask"):
        assert year[static].dims == ("latitude", "longitude")
    land, orography = year.land_sea_mask.values, year.geopotential_at_surface.values
    assert land.min() == 0 and land.max() == pytest.approx(1, abs=1e-3) and 0.2 < land.mean() < 0.4
    assert orography.min() == 0 and (orography[land == 0] == 0).all() and orography.max() > 2e4  # m²/s²: > 2 km
    fields = select_channels(year, CHANNELS, WB2)
    for channel, bounds in zip(CHANNELS, channel_bounds(CHANNELS)):
        x = fields.sel(channel=channel).values
        assert bounds[0] < x.min() and x.max() < bounds[1], channel
    z500, t850 = (fields.sel(channel=c).values.astype(np.float64) for c in ("geopotential@500", "temperature@850"))
    assert 53500 < z500.mean() < 54700 and 2900 < z500.std() < 3700
    assert 272 < t850.mean() < 278 and 13 < t850.std() < 18


def test_same_seed_same_store_other_seed_other_weather(tmp_path):
    paths = [str(tmp_path / f"{i}.zarr") for i in range(3)]
    for path, seed in zip(paths, (0, 0, 1)):
        write_synthetic_era5(path, **TINY, nlat=8, nlon=16, seed=seed, layout="weatherbench2")
    a, b, c = (open_store(p).load() for p in paths)
    xr.testing.assert_identical(a, b)
    assert np.abs(a.temperature - c.temperature).mean() > 0.1  # K: other noise, waves, MJO and ENSO phases
    xr.testing.assert_identical(a.land_sea_mask, c.land_sea_mask)  # the seed changes the weather, not the Earth


def hypsometric_error(ds: xr.Dataset) -> str | None:
    """What breaks z500 - z850 = R_d Tbar ln(850/500), Tbar = (T500 + T850) / 2, beyond the stated noise: the
    residual is -R_d ln(850/500) (e500 + e850) / 2, with e500, e850 independent N(0, NOISE_T²): mean 0 and std
    R_d ln(850/500) NOISE_T / sqrt(2) (32.3 m²/s²). None if the store fits, else why not."""
    z, t = ds.geopotential.astype(np.float64), ds.temperature.astype(np.float64)
    tbar = (t.sel(level=500) + t.sel(level=850)) / 2
    residual = (z.sel(level=500) - z.sel(level=850) - synthetic.R_D * np.log(850 / 500) * tbar).values
    sigma = synthetic.R_D * np.log(850 / 500) * synthetic.NOISE_T / np.sqrt(2)
    if abs(residual.mean()) > 4 * sigma / np.sqrt(residual.size):  # 4 standard errors of the mean
        return f"mean residual {residual.mean():.3g} m²/s²"
    if abs(residual.std() / sigma - 1) > 0.03:  # the sample std's own error is 0.1% here
        return f"residual std {residual.std():.3g} m²/s², expected {sigma:.3g}"
    return None


def test_temperature_is_tied_to_geopotential_by_the_hypsometric_equation(tiny_wb2_store):
    ds = open_store(tiny_wb2_store).load()
    assert hypsometric_error(ds) is None
    t850 = ds.temperature.sel(level=850)
    shifted = ds.copy()
    shifted["temperature"] = xr.where(ds.level == 850, ds.temperature + 0.5, ds.temperature)  # 0.5 K warmer
    assert "mean residual" in hypsometric_error(shifted)
    noisy = ds.copy()  # as much independent noise again on T850
    extra = synthetic.NOISE_T * np.random.default_rng(0).standard_normal(t850.shape)
    noisy["temperature"] = xr.where(ds.level == 850, ds.temperature + t850.copy(data=extra), ds.temperature)
    assert "residual std" in hypsometric_error(noisy)


def harmonic(x: np.ndarray, hours: np.ndarray, period: float = 24.0) -> tuple[np.ndarray, np.ndarray]:
    """Amplitude and hour of the maximum of the `period`-hour harmonic of `x: [T, ...]` sampled at `hours`
    (least squares: a cos w + b sin w peaks at w = atan2(b, a))."""
    w = 2 * np.pi * hours / period
    basis = np.stack([np.ones_like(w), np.cos(w), np.sin(w)], axis=1)
    (_, a, b), *_ = np.linalg.lstsq(basis, x.reshape(len(hours), -1), rcond=None)
    peak = np.arctan2(b, a) * period / (2 * np.pi) % period
    return np.hypot(a, b).reshape(x.shape[1:]), peak.reshape(x.shape[1:])


def test_diurnal_t850_cycle_is_larger_over_land_and_peaks_in_the_afternoon(tiny_wb2_store):
    ds = open_store(tiny_wb2_store).load()
    t850 = ds.temperature.sel(level=850).values.astype(np.float64)
    utc = (ds.time.values - ds.time.values[0]) / np.timedelta64(1, "h")
    amplitude, peak_utc = harmonic(t850, utc)
    land = ds.land_sea_mask.values
    over_land, over_sea = amplitude[land > 0.9].mean(), amplitude[land == 0].mean()
    assert over_land > 1.0 and over_land > 4 * over_sea, (over_land, over_sea)
    local = (peak_utc + ds.longitude.values[None, :] / 15) % 24  # local solar time of the maximum
    assert np.all(np.abs(local[land > 0.9] - 15) < 2)  # the afternoon, 15 h local time by construction


def test_spectrum_of_a_long_record_holds_the_mjo_band_and_the_diurnal_peak(tmp_path):
    """6 years 6-hourly on 16x32, through the figure's own spectrum (benchmarks/store_spectrum.py): tropical z500
    has a 30-60 day peak (the MJO) well above the 10-20 and 90-180 day bands (11x and 6x here; without the MJO
    about 1x), and T850 a line at one cycle per day (~6000x its neighbours' median)."""
    from benchmarks.store_spectrum import band_density, power_spectrum

    path = str(tmp_path / "long.zarr")
    write_synthetic_era5(path, start="2001-01-01", end="2007-01-01", freq="6h", nlat=16, nlon=32,
                         layout="weatherbench2")
    ds = open_store(path)
    f, d = power_spectrum(ds.geopotential.sel(level=500), max_lat=15)
    mjo = band_density(f, d, 30, 60)
    assert mjo > 4 * band_density(f, d, 10, 20) and mjo > 4 * band_density(f, d, 90, 180)
    f, d = power_spectrum(ds.temperature.sel(level=850))
    day = d[np.argmin(np.abs(f - 1))]
    neighbours = d[((f > 0.7) & (f < 0.9)) | ((f > 1.1) & (f < 1.3))]
    assert day > 100 * np.median(neighbours)


def test_slab_by_slab_equals_one_slab(tmp_path, monkeypatch):
    """The store is written a slab of time at a time (bounded memory); a slab's edges leave no seam: the red
    noise, the temperature noise and every phase continue across them. Equal up to float32 rounding (<= 1e-6 of
    the value, ~10 units in the last place: the float32 matrix product's summation order depends on the slab's
    length), where a seam would jump by the noise's size (150 m²/s², 0.3 K: 3e-3 and 1e-3 of the value)."""
    one, many = str(tmp_path / "one.zarr"), str(tmp_path / "many.zarr")
    write_synthetic_era5(one, **TINY, nlat=8, nlon=16, layout="weatherbench2")
    monkeypatch.setattr(synthetic, "SLAB_VALUES", 18 * 8 * 16)  # slabs of 18 frames: 3 chunks of 6
    write_synthetic_era5(many, **TINY, nlat=8, nlon=16, layout="weatherbench2")
    xr.testing.assert_allclose(open_store(one).load(), open_store(many).load(), rtol=1e-6, atol=0)


def test_memory_does_not_grow_with_the_record(tmp_path, monkeypatch):
    """Peak memory of a write is set by the slab, not by the period: 2 years take what 1 year takes (~5.7 MB traced
    here; written in one slab instead, 6.8 and 13.3 MB)."""
    monkeypatch.setattr(synthetic, "SLAB_VALUES", 720 * 8 * 16)
    peaks = []
    for years in (1, 2):
        tracemalloc.start()
        write_synthetic_era5(str(tmp_path / f"{years}.zarr"), start="2001-01-01", end=f"{2001 + years}-01-01",
                             freq="6h", nlat=8, nlon=16, layout="weatherbench2")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.25 * peaks[0], peaks


def test_default_store_is_created_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINCONV_CACHE", str(tmp_path))
    path = default_store()
    assert path.startswith(str(tmp_path)) and default_store() == path
    ds = open_store(path)
    assert ds.geopotential.shape == ds.temperature.shape == (17544, 2, 32, 64)
    assert str(ds.time.values[-1])[:13] == "2016-12-31T23" and "land_sea_mask" in ds
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []


def _grid(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) / n


def test_single_mode_decays_at_the_viscous_rate():
    """cos 2πx cos 2πy is a steady Euler solution: only viscosity acts, exp(-ν 8π² t)."""
    x = _grid(16)
    w0 = (torch.cos(2 * math.pi * x)[:, None] * torch.cos(2 * math.pi * x)[None, :])[None]
    out = solver.solve_vorticity(w0, None, viscosity=0.01, t_final=1.0, dt=4e-3, record_every=0.5)
    assert out.shape == (1, 2, 16, 16)
    for k, t in enumerate((0.5, 1.0)):  # Crank–Nicolson: error O(dt²), here ~1e-5 of the amplitude
        torch.testing.assert_close(out[0, k], w0[0] * math.exp(-0.01 * 8 * math.pi**2 * t), rtol=0, atol=1e-4)


def _dealiased_field(n: int) -> torch.Tensor:
    w0 = solver.gaussian_random_field(2, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kx, ky = solver._wavenumbers(n, w0.device)
    keep = (kx.abs() <= n / 3) & (ky.abs() <= n / 3)
    return torch.fft.irfft2(torch.fft.rfft2(w0) * keep, s=(n, n))


def test_inviscid_unforced_flow_conserves_enstrophy_and_viscous_decays():
    w0 = _dealiased_field(32)
    enstrophy = lambda w: (w**2).mean((-1, -2))  # noqa: E731
    inviscid = solver.solve_vorticity(w0, None, viscosity=0.0, t_final=0.5, dt=1e-3, record_every=0.25)
    assert not torch.allclose(inviscid[:, -1], w0, atol=1e-3)  # the flow really moved
    torch.testing.assert_close(enstrophy(inviscid[:, -1]), enstrophy(w0), rtol=1e-3, atol=0)
    assert inviscid.mean((-1, -2)).abs().max() < 1e-12  # zero mean vorticity is kept
    viscous = enstrophy(solver.solve_vorticity(w0, None, viscosity=1e-3, t_final=0.5, dt=2e-3, record_every=0.1))
    assert torch.all(viscous[:, 1:] < viscous[:, :-1]) and torch.all(viscous[:, -1] < 0.98 * enstrophy(w0))


def test_forcing_matches_paper_formula():
    f = solver.paper_forcing(16, torch.float64)
    x = _grid(16)
    assert f[3, 5].item() == pytest.approx(0.1 * (math.sin(2 * math.pi * (x[3] + x[5])) + math.cos(2 * math.pi * (x[3] + x[5]))))


SMALL_NS = {"samples": 5, "resolution": 16, "downsample": 2, "time_units": 3, "dt": 2.5e-2, "batch_size": 2,
            "progress": False}


def test_navier_stokes_store_interrupted_then_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    whole = str(tmp_path / "whole.zarr")
    generate_navier_stokes(whole, **SMALL_NS)
    expected = open_store(whole).vorticity
    assert expected.dims == ("sample", "time", "y", "x") and expected.shape == (5, 4, 8, 8)
    np.testing.assert_array_equal(expected.time.values, [0, 1, 2, 3])

    path = str(tmp_path / "resumed.zarr")
    real, calls = ns.solve_vorticity, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ns, "solve_vorticity", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_navier_stokes(path, **SMALL_NS)
    monkeypatch.setattr(ns, "solve_vorticity", real)
    with pytest.raises(ValueError, match="incomplete"):
        open_store(path)
    generate_navier_stokes(path, **SMALL_NS)
    np.testing.assert_array_equal(open_store(path).vorticity.values, expected.values)
    with pytest.raises(ValueError, match="another Navier–Stokes run"):
        generate_navier_stokes(path, **{**SMALL_NS, "viscosity": 1e-4})


def test_generate_job_help():
    out = subprocess.run([sys.executable, "jobs/generate_navier_stokes.py", "--help"], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True)
    assert "--samples" in out.stdout and "--viscosity" in out.stdout
