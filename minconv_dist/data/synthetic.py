"""A small, learnable ERA5-like store: the embedded default for the demo and the tests.

The z500-like field is a latitude profile (~58550 m²/s² at the equator, ~49650 at the poles), a seasonal
cycle that lowers the winter hemisphere, eastward-travelling planetary waves (zonal wavenumbers 1-6,
mid-latitude envelope, stronger in winter) and smooth red noise, so its mean (~54100) and std (~3300)
match WeatherBench z500 while most of its evolution is predictable from the past.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.data.store import COMPLETE_ATTR, cache_dir, checksummed, set_attrs, zarr_store

DEFAULT_START, DEFAULT_END, DEFAULT_FREQ = "2015-01-01", "2017-01-01", "1h"
_DAY = np.timedelta64(1, "D")


def _basis(lat: np.ndarray, lon: np.ndarray, rng: np.random.Generator, n_noise: int) -> np.ndarray:
    """Spatial patterns [P, H*W]: per hemisphere 6 wavenumbers x (cos, sin), a seasonal dipole, noise modes."""
    phi, lam = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    env = np.sin(2 * phi) ** 2
    rows = []
    for hemi in (phi > 0, phi <= 0):
        for k in range(1, 7):
            rows += [env * hemi * np.cos(k * lam), env * hemi * np.sin(k * lam)]
    rows.append(-np.sin(phi) * np.ones_like(lam))
    for _ in range(n_noise):  # smooth random modes: low zonal wavenumber times a low meridional harmonic
        m, n = rng.integers(0, 6), rng.integers(1, 5)
        rows.append(np.cos(n * (phi + np.pi / 2)) * np.cos(m * lam + rng.uniform(0, 2 * np.pi)))
    return np.stack([r * np.ones((lat.size, lon.size)) for r in rows]).reshape(len(rows), -1)


def _coefficients(days: np.ndarray, rng: np.random.Generator, n_noise: int, noise0: np.ndarray,
                  dt_days: float) -> tuple[np.ndarray, np.ndarray]:
    """Time coefficients [T, P] for `_basis`, and the red-noise state to carry into the next slab."""
    season = np.cos(2 * np.pi * (days - 20) / 365.25)  # +1 in late January: northern winter
    cols = []
    for h, hemi_winter in enumerate((season, -season)):
        for k in range(1, 7):
            speed = 2 * np.pi * (12 - k) / 360 * (1 + 0.3 * h)  # rad/day: short waves travel faster
            amp = 900 * (1 + 0.3 * hemi_winter) / np.sqrt(k / 2 + 0.5)
            phase = k * speed * days + 1.7 * k + h
            cols += [amp * np.cos(phase), amp * np.sin(phase)]
    cols.append(1500 * season)
    rho = np.exp(-dt_days / 2.0)  # two-day correlation time
    noise = np.empty((days.size, n_noise))
    state = noise0
    kicks = rng.standard_normal((days.size, n_noise)) * 150 * np.sqrt(1 - rho**2)
    for i in range(days.size):
        state = rho * state + kicks[i]
        noise[i] = state
    return np.concatenate([np.stack(cols, axis=1), noise], axis=1), state


def _grid(nlat: int, nlon: int, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    dlat, dlon = 180 / nlat, 360 / nlon
    lat = -90 + dlat / 2 + dlat * np.arange(nlat)
    return (lat[::-1] if descending else lat), dlon * np.arange(nlon)


def write_synthetic_era5(url: str, *, start: str = DEFAULT_START, end: str = DEFAULT_END, freq: str = DEFAULT_FREQ,
                         nlat: int = 32, nlon: int = 64, seed: int = 0, storage_options: dict | None = None,
                         chunks: int = 24, layout: str = "weatherbench") -> None:
    """Write the synthetic store, time slab by time slab; marked incomplete until the last slab lands.

    `layout="weatherbench"`: variable `z`, dims (time, lat, lon), latitude ascending (WeatherBench v1).
    `layout="weatherbench2"`: `geopotential` and `temperature` at levels 500/850, `2m_temperature`,
    dims (time, level, latitude, longitude), latitude descending (WeatherBench2 / ARCO-ERA5).
    `chunks` is the time-chunk length; each chunk holds the whole grid. Chunks carry a CRC32C checksum.
    """
    if layout not in ("weatherbench", "weatherbench2"):
        raise ValueError(f"layout={layout!r}: expected 'weatherbench' or 'weatherbench2'")
    times = pd.date_range(start, end, freq=freq, inclusive="left").values
    if times.size == 0:
        raise ValueError(f"empty time range [{start}, {end}) at freq {freq!r}")
    wb2 = layout == "weatherbench2"
    lat, lon = _grid(nlat, nlon, descending=wb2)
    tdim, ydim, xdim = ("time", "latitude", "longitude") if wb2 else ("time", "lat", "lon")
    coords = {tdim: times, ydim: lat, xdim: lon}
    shape2 = (times.size, nlat, nlon)
    if wb2:
        coords["level"] = np.array([500, 850], dtype=np.int64)
        shape3 = (times.size, 2, nlat, nlon)
        template = {"geopotential": ((tdim, "level", ydim, xdim), shape3),
                    "temperature": ((tdim, "level", ydim, xdim), shape3),
                    "2m_temperature": ((tdim, ydim, xdim), shape2)}
    else:
        template = {"z": ((tdim, ydim, xdim), shape2)}
    import dask.array as dsa
    data_vars = {name: (d, dsa.zeros(s, chunks=(chunks,) + s[1:], dtype=np.float32)) for name, (d, s) in template.items()}
    ds = xr.Dataset(data_vars, coords=coords, attrs={COMPLETE_ATTR: False, "source": "minconv_dist synthetic ERA5-like"})
    store = zarr_store(url, storage_options)
    ds.to_zarr(store, mode="w", compute=False, consolidated=False, zarr_format=3, encoding=checksummed(ds))

    rng = np.random.default_rng(seed)
    n_noise = 24
    basis = _basis(lat, lon, rng, n_noise)
    days = (times - times[0]) / _DAY
    dt_days = float(days[1] - days[0]) if days.size > 1 else 1.0
    doy0 = float((times[0] - times[0].astype("datetime64[Y]")) / _DAY)
    base = (58550 - 8900 * np.sin(np.deg2rad(lat)) ** 2)[:, None] * np.ones(nlon)
    slab = max(chunks, (2048 // chunks) * chunks)
    state = np.zeros(n_noise)
    for i0 in range(0, times.size, slab):
        sl = slice(i0, min(i0 + slab, times.size))
        coef, state = _coefficients(days[sl] + doy0, rng, n_noise, state, dt_days)
        z = (base.reshape(1, -1) + coef @ basis).reshape(-1, nlat, nlon)
        if wb2:
            zn = (z - 54100) / 3300
            out = {"geopotential": np.stack([z, 0.27 * z - 700 + 0.05 * 3300 * np.roll(zn, 1, axis=2)], axis=1),
                   "temperature": np.stack([253 + 12 * zn, 275 + 15 * zn + np.roll(zn, 2, axis=1)], axis=1),
                   "2m_temperature": 281 + 18 * zn}
        else:
            out = {"z": z}
        region = xr.Dataset({k: (template[k][0], v.astype(np.float32)) for k, v in out.items()})
        region.to_zarr(store, region={tdim: sl}, consolidated=False)
    set_attrs(url, storage_options, **{COMPLETE_ATTR: True})


def default_store() -> str:
    """Path of the embedded synthetic store (2 years hourly, 32x64, `z`), created on first use.

    Lives in `$MINCONV_CACHE` or `~/.cache/minconv_dist`; written to a temporary directory and renamed,
    so concurrent callers (several Ray workers) never see a half-written store.
    """
    cache = cache_dir()
    path = cache / "era5_synthetic_z_5.625deg_2015-2016_1h_v2.zarr"  # v2: checksummed chunks
    if path.exists():
        return str(path)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache)
    try:
        write_synthetic_era5(os.path.join(tmp, "store.zarr"))
        try:
            os.rename(os.path.join(tmp, "store.zarr"), path)
        except OSError:
            if not path.exists():  # lost a race with another writer is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
