"""A small, learnable ERA5-like store: the embedded default for the demo and the tests.

One model of the atmosphere's time scales, evaluated on any grid and period (docs/data.md states every term
with its amplitude; t in days since 2000-01-01 UTC, φ latitude, λ longitude):

    z500 = 58550 - 8900 sin²φ                      zonal mean (mean ~54000, std ~3300 m²/s², as WeatherBench)
         - 1500 sinφ S(t)                          seasonal cycle, S = cos 2π(t - 19)/365.2422 (+1: northern winter)
         + Σ planetary waves k = 1-3               10-33 day periods, 640-900 m²/s², mid-latitude envelope
         + Σ synoptic waves k = 4-8 · M_syn        2-7 day periods, 320-450 m²/s², damped over high ground
         - stationary trough downstream of the mountains, 1000 m²/s² (x 1.5 in winter)
         + MJO: 200 R(t) e^-(φ/15°)² cos(λ - Θ(t))  eastward, 32-53 day periods (dΘ/dt wanders)
         + ENSO: 250 E(t) e^-(φ/20°)² (1 + 0.5 cos(λ - 200°))   quasi-periodic, 3.7 and 5.3 year periods
         + tides: cos²φ (30 cos(H - 17 h) + 20 cos 2(H - 10 h))  H = local solar time
         + red noise: 24 smooth modes, 150 m²/s², 2-day correlation, weaker in the tropics
    M_syn = (1 + 0.3 W) (1 + 0.35 R(t - 10 d) cos(Θ(t - 10 d) - λ*)) (1 + 0.15 E(t))
            (W: the hemisphere's winter index; the MJO phase 10 days earlier modulates the storm tracks)

The 850-500 hPa layer is tied to z500 by the hypsometric equation, z500 - z850 = R_d Tbar ln(850/500), Tbar the
layer mean temperature (T linear in ln p: Tbar = (T500 + T850)/2). A share κ = 0.3 of z500's departure from its
zonal-mean profile reaches z850 (equivalent barotropic); the rest is thickness, i.e. layer temperature. Over land
T850 gains D: a diurnal cycle peaking at 15 h local time (0.2 K over sea, up to 3 K over land) and a continental
seasonal cycle (6 K sinφ); z850 falls by R_d ln(850/500) D / 2 (a heat low), so the identity still holds. T500 and
T850 carry independent white noise of 0.3 K. Orography (`geopotential_at_surface`) and `land_sea_mask` are a few
smooth continents and mountain ranges, fixed (the seed changes the weather, not the geography).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from minconv_dist.data.store import COMPLETE_ATTR, cache_dir, checksummed, set_attrs, zarr_store

DEFAULT_START, DEFAULT_END, DEFAULT_FREQ = "2015-01-01", "2017-01-01", "1h"
LAYOUTS = ("weatherbench", "weatherbench2")
LEVELS = (500, 850)
R_D = 287.05  # J kg⁻¹ K⁻¹, dry air
G = 9.80665  # m s⁻²
THICKNESS = R_D * np.log(850 / 500)  # m²/s² of 500-850 hPa thickness per K of layer mean temperature
KAPPA = 0.3  # share of z500's departure from its zonal profile that reaches z850
NOISE_T = 0.3  # K, independent white noise of T500 and T850
LAPSE_2M = 6.5e-3  # K/m, from 850 hPa down to 2 m above the surface
MJO_LAG = 10.0  # days from the MJO phase to the storm-track amplitude it modulates
SLAB_VALUES = 2**22  # grid values per field and level computed and written at once (17 MB in float32): bounds memory
_EPOCH = np.datetime64("2000-01-01T00:00")
_DAY = np.timedelta64(1, "D")
_YEAR = 365.2422

# Smooth "continents" (lat, lon, half-width lat, half-width lon; degrees) as super-Gaussian blobs, loosely the
# Earth's: Eurasia, Africa, North America, South America, Australia, Antarctica.
CONTINENTS = ((50, 80, 20, 70), (5, 20, 28, 20), (47, 260, 20, 32), (-15, 298, 25, 14), (-25, 134, 11, 17),
              (-90, 0, 22, np.inf))
# Mountain ranges (lat, lon, half-widths, height in m) as Gaussians: Tibet, Rockies, Andes; and the Antarctic
# plateau, which is high ground but forces no stationary wave here (it sits on the pole).
RANGES = ((33, 88, 7, 16, 4500.0), (45, 245, 14, 7, 2200.0), (-25, 292, 22, 6, 3000.0))
PLATEAU = (-90, 0, 18, np.inf, 2500.0)
LOWLAND_M = 250.0  # height of land away from the ranges


def _blobs(lat: np.ndarray, lon: np.ndarray, table: tuple, power: int, widen: float = 0.0, shift: float = 0.0
           ) -> list[np.ndarray]:
    """One [H, W] bump per row of `table`, exp(-|dlat/a|^p - |dlon/b|^p), its centre moved `shift` degrees east
    and its half-widths grown by `widen` degrees; longitude differences wrap."""
    out = []
    for row in table:
        c_lat, c_lon, a, b = row[:4]
        dlat = (lat[:, None] - c_lat) / (a + widen)
        dlon = (lon[None, :] - c_lon - shift + 180) % 360 - 180
        out.append(np.exp(-np.abs(dlat) ** power - np.abs(dlon / (b + widen)) ** power))
    return out


def geography(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`land_sea_mask` (0..1) and `geopotential_at_surface` (m²/s²), each [H, W] on the grid of `lat`, `lon`
    (degrees)."""
    land = np.clip(sum(_blobs(lat, lon, CONTINENTS, 4)), 0, 1)
    land[land < 0.01] = 0.0  # open sea, not 1e-40 of land
    ranges = sum(r[4] * b for r, b in zip(RANGES, _blobs(lat, lon, RANGES, 2)))
    plateau = PLATEAU[4] * _blobs(lat, lon, (PLATEAU,), 2)[0]
    height = land * np.maximum(LOWLAND_M, ranges + plateau)
    return land, G * height


@dataclass
class _Model:
    """The spatial patterns and the seed's phases of one grid; `fields` evaluates any slab of time."""

    lat: np.ndarray
    lon: np.ndarray
    seed: int

    def __post_init__(self) -> None:
        phi, lam = np.deg2rad(self.lat)[:, None], np.deg2rad(self.lon)[None, :]
        ones = np.ones((self.lat.size, self.lon.size))
        self.land, self.orography = geography(self.lat, self.lon)
        rng = np.random.default_rng([self.seed, 1])  # phases; the noise draws have streams of their own
        self.phases = rng.uniform(0, 2 * np.pi, 17)  # 7 for the MJO and ENSO, 10 for the synoptic waves
        # z500's terms beside its zonal profile, each a pattern [H, W] times a coefficient of time
        patterns = [-1500 * np.sin(phi) * ones]  # seasonal
        env = np.exp(-((np.abs(self.lat[:, None]) - 47) / 15) ** 2) * ones  # storm tracks
        damp = 1 - 0.5 * self.orography / max(self.orography.max(), 1.0)  # waves weaken over high ground
        for north in (True, False):
            hemi = env * ((phi > 0) if north else (phi <= 0))
            for k in range(1, 9):
                shape = hemi * (damp if k >= 4 else 1)
                patterns += [shape * np.cos(k * lam), shape * np.sin(k * lam)]
        trough, ridge = (sum(b * r[4] for b, r in zip(_blobs(self.lat, self.lon, RANGES, 2, 8, s), RANGES))
                         / max(r[4] for r in RANGES) for s in (25, 60))  # 25° and 60° east of the ranges
        for north in (True, False):  # the stationary wave, by hemisphere (each has its own winter)
            patterns.append(-1000 * (trough - 0.6 * ridge) * ((phi > 0) if north else (phi <= 0)))
        tropics = np.exp(-(self.lat[:, None] / 15) ** 2) * ones
        patterns += [200 * tropics * np.cos(lam), 200 * tropics * np.sin(lam)]  # MJO
        patterns.append(250 * np.exp(-(self.lat[:, None] / 20) ** 2) * (1 + 0.5 * np.cos(lam - np.deg2rad(200))))
        for amp, n, peak in ((30.0, 1, 17), (20.0, 2, 10)):  # tides peaking at `peak` h local solar time
            shift = n * (lam - 2 * np.pi * peak / 24)
            patterns += [amp * np.cos(phi) ** 2 * np.cos(shift), amp * np.cos(phi) ** 2 * np.sin(shift)]
        noise_rng = np.random.default_rng([self.seed, 2])
        for _ in range(24):  # smooth random modes: low zonal wavenumber x low meridional harmonic
            m, n = noise_rng.integers(0, 6), noise_rng.integers(1, 5)
            patterns.append((0.35 + 0.65 * np.abs(np.sin(phi))) * np.cos(n * (phi + np.pi / 2))
                            * np.cos(m * lam + noise_rng.uniform(0, 2 * np.pi)))
        # Every field is linear in the coefficients [1, z500 terms (t), land terms (t)]: one weight matrix
        # [K, H*W] per field, so a slab of a field is one matrix product (plus the temperatures' noise).
        z_terms = np.stack([p * ones for p in patterns]).reshape(len(patterns), -1)
        diurnal = (0.2 + 2.8 * self.land) * (0.4 + 0.6 * np.cos(phi))  # K: T850's land term D, peak at 15 h
        peak = lam - 2 * np.pi * 15 / 24
        d_terms = np.stack([diurnal * np.cos(peak), -diurnal * np.sin(peak),
                            6 * self.land * np.sin(phi) * ones]).reshape(3, -1)  # and a continental season
        sin2 = (np.sin(phi) ** 2 * ones).reshape(1, -1)
        z500_0, tbar_0, lapse = 58550 - 8900 * sin2, 284 - 40 * sin2, 26 - 8 * sin2  # m²/s², K, K (T850 - T500)

        def weights(base: np.ndarray, z: float = 0.0, d: float = 0.0) -> np.ndarray:
            return np.concatenate([base, z * z_terms, d * d_terms])

        z500 = weights(z500_0, 1)
        z850 = weights(z500_0 - THICKNESS * tbar_0, KAPPA, -THICKNESS / 2)  # z500 - THICKNESS (Tbar + D / 2)
        t500 = weights(tbar_0 - lapse / 2, (1 - KAPPA) / THICKNESS)
        t850 = weights(tbar_0 + lapse / 2, (1 - KAPPA) / THICKNESS, 1)
        surface = weights(self.orography.reshape(1, -1) + 4 * G / LAPSE_2M)
        t2m = t850 + LAPSE_2M / G * (z850 - surface) + weights(0 * sin2, 0, 1)  # 6.5 K/km below 850 hPa, 2 D
        self.weights = {name: np.concatenate(w, axis=1).astype(np.float32)
                        for name, w in (("geopotential", [z500, z850]), ("temperature", [t500, t850]),
                                        ("2m_temperature", [t2m]))}
        self.noise_state = np.zeros(24)
        self.noise_rng = np.random.default_rng([self.seed, 3])
        self.t_rng = np.random.default_rng([self.seed, 4])

    def mjo(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """MJO amplitude R(t) in [0.6, 1.4] and phase Θ(t): frequency (1 + 0.15 cos + 0.1 cos)/40 per day."""
        p = self.phases
        theta = 2 * np.pi * t / 40 + p[0] + sum(b * period / 40 * np.sin(2 * np.pi * t / period + q)
                                               for b, period, q in ((0.15, 173, p[1]), (0.1, 411, p[2])))
        r = 1 + 0.25 * np.sin(2 * np.pi * t / 97 + p[3]) + 0.15 * np.sin(2 * np.pi * t / 263 + p[4])
        return r, theta

    def enso(self, t: np.ndarray) -> np.ndarray:
        """ENSO index E(t), unit standard deviation: periods of 3.7 and 5.3 years."""
        p = self.phases
        return (np.sin(2 * np.pi * t / (3.7 * _YEAR) + p[5]) + 0.7 * np.sin(2 * np.pi * t / (5.3 * _YEAR) + p[6])
                ) / np.sqrt((1 + 0.7**2) / 2)

    def coefficients(self, t: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
        """Time coefficients [T, P] of z500's terms and [T, 3] of T850's land terms; advances the red noise."""
        season = np.cos(2 * np.pi * (t - 19) / _YEAR)
        r, theta = self.mjo(t)
        r_lag, theta_lag = self.mjo(t - MJO_LAG)
        enso = self.enso(t)
        cols = [season]
        for h, winter in enumerate((season, -season)):
            teleconnection = np.deg2rad((140, 200)[h])  # the MJO longitude that strengthens this storm track
            modulation = (1 + 0.35 * r_lag * np.cos(theta_lag - teleconnection)) * (1 + 0.15 * enso)
            for k in range(1, 9):
                if k <= 3:  # planetary: slow, eastward; as the first version of this store
                    amp = 900 * (1 + 0.3 * winter) / np.sqrt(k / 2 + 0.5)
                    phase = k * 2 * np.pi * (12 - k) / 360 * (1 + 0.3 * h) * t + 1.7 * k + h
                else:  # synoptic: 6.5 to 2.2 day periods (the south's 10 % shorter)
                    amp = 450 / np.sqrt(k / 4) * (1 + 0.3 * winter) * modulation
                    period = (6.5, 5.0, 4.0, 3.0, 2.2)[k - 4] * (1 - 0.1 * h)
                    phase = 2 * np.pi * t / period + self.phases[7 + 5 * h + k - 4]
                cols += [amp * np.cos(phase), amp * np.sin(phase)]
        cols += [1 + 0.5 * season, 1 - 0.5 * season]  # stationary waves, stronger in each hemisphere's winter
        cols += [r * np.cos(theta), r * np.sin(theta), enso]
        utc = 2 * np.pi * (t % 1)
        cols += [np.cos(utc), -np.sin(utc), np.cos(2 * utc), -np.sin(2 * utc)]
        # red noise, exact whatever the slabs: state carried, kicks drawn in order from their own stream
        rho = np.exp(-dt / 2.0)
        kicks = self.noise_rng.standard_normal((t.size, 24)) * 150 * np.sqrt(1 - rho**2)
        noise = np.empty_like(kicks)
        for i in range(t.size):
            self.noise_state = rho * self.noise_state + kicks[i]
            noise[i] = self.noise_state
        land = np.stack([np.cos(utc), np.sin(utc), -season], axis=1)
        return np.concatenate([np.stack(cols, axis=1), noise], axis=1), land

    def fields(self, t: np.ndarray, dt: float, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """`[T, L * H * W]` float32 of each of `names` (`z`, `geopotential`, `temperature`, `2m_temperature`; L
        levels, 500 then 850) at times `t` (days since 2000-01-01); the temperatures draw this slab's noise.
        `z` is geopotential's first level, out of the same product, so both layouts hold the same z500."""
        z_coef, d_coef = self.coefficients(t, dt)
        coef = np.concatenate([np.ones((t.size, 1)), z_coef, d_coef], axis=1).astype(np.float32)
        out = {name: coef @ self.weights[name] for name in names if name != "z"}
        if "z" in names:
            out["z"] = (coef @ self.weights["geopotential"])[:, :self.lat.size * self.lon.size]
        if "temperature" in names:
            noise = self.t_rng.standard_normal(out["temperature"].shape, dtype=np.float32)
            noise *= NOISE_T
            out["temperature"] += noise
            out["2m_temperature"] += noise[:, noise.shape[1] // 2:]  # T850's
        return out


def _grid(nlat: int, nlon: int) -> tuple[np.ndarray, np.ndarray]:
    """Cell-centre latitudes, south to north (as WeatherBench v1 and WeatherBench2's ERA5 64x32), and longitudes
    from 0 east."""
    dlat, dlon = 180 / nlat, 360 / nlon
    return -90 + dlat / 2 + dlat * np.arange(nlat), dlon * np.arange(nlon)


def write_synthetic_era5(url: str, *, start: str = DEFAULT_START, end: str = DEFAULT_END, freq: str = DEFAULT_FREQ,
                         nlat: int = 32, nlon: int = 64, seed: int = 0, storage_options: dict | None = None,
                         chunks: int = 24, layout: str = "weatherbench") -> None:
    """Write the synthetic store, slab of time by slab (memory bounded by `SLAB_VALUES`, whatever the period);
    marked incomplete until the last slab lands. Deterministic in its arguments.

    `layout="weatherbench"`: z500 alone as `z`, dims (time, lat, lon) (WeatherBench v1).
    `layout="weatherbench2"`: `geopotential` and `temperature` on `level` 500 and 850 and `2m_temperature`,
    dims (time, level, latitude, longitude), and the static `geopotential_at_surface` and `land_sea_mask`
    (latitude, longitude) (WeatherBench2's names). Its `geopotential@500` equals the first layout's `z`.
    Latitude runs south to north in both. `chunks` is the time-chunk length; a chunk holds one level of the whole
    grid and carries a CRC32C checksum.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    times = pd.date_range(start, end, freq=freq, inclusive="left").values
    if times.size == 0:
        raise ValueError(f"empty time range [{start}, {end}) at freq {freq!r}")
    wb2 = layout == "weatherbench2"
    lat, lon = _grid(nlat, nlon)
    model = _Model(lat, lon, seed)
    tdim, ydim, xdim = ("time", "latitude", "longitude") if wb2 else ("time", "lat", "lon")
    coords = {tdim: times, ydim: lat, xdim: lon}
    if wb2:
        coords["level"] = np.array(LEVELS, dtype=np.int64)
        levelled = (times.size, len(LEVELS), nlat, nlon)
        template = {"geopotential": ((tdim, "level", ydim, xdim), levelled),
                    "temperature": ((tdim, "level", ydim, xdim), levelled),
                    "2m_temperature": ((tdim, ydim, xdim), (times.size, nlat, nlon))}
    else:
        template = {"z": ((tdim, ydim, xdim), (times.size, nlat, nlon))}
    import dask.array as dsa  # one lazy chunk per variable: never computed, only its metadata is written

    data_vars = {name: (d, dsa.zeros(s, chunks=s, dtype=np.float32)) for name, (d, s) in template.items()}
    if wb2:  # static fields: written with the metadata
        data_vars["geopotential_at_surface"] = ((ydim, xdim), model.orography.astype(np.float32))
        data_vars["land_sea_mask"] = ((ydim, xdim), model.land.astype(np.float32))
    ds = xr.Dataset(data_vars, coords=coords, attrs={COMPLETE_ATTR: False, "source": "minconv_dist synthetic ERA5-like",
                                                     "seed": seed})
    encoding = checksummed(ds)
    for name, (dims, shape) in template.items():
        encoding[name]["chunks"] = (chunks,) + tuple(1 if d == "level" else n for d, n in zip(dims[1:], shape[1:]))
    store = zarr_store(url, storage_options)
    ds.to_zarr(store, mode="w", compute=False, consolidated=False, zarr_format=3, encoding=encoding)

    days = (times - _EPOCH) / _DAY
    dt = float(days[1] - days[0]) if days.size > 1 else 1.0
    slab = max(1, SLAB_VALUES // (nlat * nlon) // chunks) * chunks
    for i0 in range(0, times.size, slab):
        sl = slice(i0, min(i0 + slab, times.size))
        out = model.fields(days[sl], dt, tuple(template))
        region = xr.Dataset({k: (template[k][0], v.reshape((-1,) + template[k][1][1:])) for k, v in out.items()})
        region.to_zarr(store, region={tdim: sl}, consolidated=False)
    set_attrs(url, storage_options, **{COMPLETE_ATTR: True})


def default_store() -> str:
    """Path of the embedded synthetic store (2 years hourly, 32x64, the WeatherBench2 layout with its static
    fields), created on first use.

    Lives in `$MINCONV_CACHE` or `~/.cache/minconv_dist`; written to a temporary directory and renamed,
    so concurrent callers (several Ray workers) never see a half-written store.
    """
    cache = cache_dir()
    path = cache / "era5_synthetic_wb2_5.625deg_2015-2016_1h_v3.zarr"  # v3: multi-variable, WB2 layout
    if path.exists():
        return str(path)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache)
    try:
        write_synthetic_era5(os.path.join(tmp, "store.zarr"), layout="weatherbench2")
        try:
            os.rename(os.path.join(tmp, "store.zarr"), path)
        except OSError:
            if not path.exists():  # lost a race with another writer is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)
