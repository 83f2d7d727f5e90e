"""Synthetic ERA5-like store and Navier–Stokes generator: physics, magnitudes, resumable writes."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from minconv_dist.data import default_store, generate_navier_stokes, open_store, write_synthetic_era5
from minconv_dist.data import navier_stokes as ns
from minconv_dist.simulate import navier_stokes as solver


def test_synthetic_z500_magnitudes_and_predictability(tmp_path):
    path = str(tmp_path / "year.zarr")
    write_synthetic_era5(path, start="2015-01-01", end="2016-01-01", freq="6h")
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


def test_default_store_is_created_once_in_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINCONV_CACHE", str(tmp_path))
    path = default_store()
    assert path.startswith(str(tmp_path)) and default_store() == path
    z = open_store(path).z
    assert z.shape == (17544, 32, 64) and str(z.time.values[-1])[:13] == "2016-12-31T23"
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
