"""Frequency power spectrum of the synthetic ERA5-like store: which time scales it holds, and how much of each.

    python benchmarks/store_spectrum.py --out docs/store_spectrum.png    # ~2 min on 2 cores

Writes two stores with `write_synthetic_era5` (seed 0, 32x64): 20 years 6-hourly (2000-2019) for the slow
modes, and the default store's 2 years hourly (2015-2016) for the diurnal cycle and the fast waves. For each,
the power spectral density of every grid point's anomaly (its time mean removed, Hann window) is averaged
with cell-area weights (`cell_area_weights`, as the evaluation) and smoothed in log-spaced frequency bins;
z500 and T850 over the globe, z500 over the tropics (|latitude| <= 15°, where the MJO lives). Prints the mean
density in each band and plots density against period, log-log, with the bands shaded.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minconv_dist.data import open_store, write_synthetic_era5  # noqa: E402
from minconv_dist.evaluate import cell_area_weights  # noqa: E402

# (label, shortest, longest period in days) of the time scales the store is built with
BANDS = (("diurnal", 0.9, 1.1), ("2-7 d", 2.0, 7.0), ("30-60 d", 30.0, 60.0), ("annual", 330.0, 400.0),
         ("interannual", 700.0, 3000.0))
FIELDS = {"z500": ("geopotential", 500), "T850": ("temperature", 850)}


def power_spectrum(field: xr.DataArray, max_lat: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
    """(frequency in cycles per day, area-mean one-sided power spectral density in units² per cycle per day) of
    `field: (time, latitude, longitude)` at evenly spaced times, over the rows with |latitude| <= `max_lat`.
    Each point's time mean is removed and a Hann window applied (density normalised by the window's power)."""
    field = field.sel(latitude=field.latitude[np.abs(field.latitude) <= max_lat]).load()  # one read of the store
    days = (field.time.values - field.time.values[0]) / np.timedelta64(1, "D")
    dt = float(days[1] - days[0])
    window = np.hanning(days.size)[:, None]
    weights = cell_area_weights(field.latitude).values
    freq = np.fft.rfftfreq(days.size, dt)
    density = np.zeros(freq.size)
    for row, weight in enumerate(weights):  # one latitude row at a time: float64 copies of T x longitudes only
        x = field.values[:, row].astype(np.float64)
        x = (x - x.mean(0)) * window
        power = np.abs(np.fft.rfft(x, axis=0)) ** 2 * 2 * dt / (window**2).sum()
        density += weight * power.mean(1) / weights.size
    return freq[1:], density[1:]


def band_density(freq: np.ndarray, density: np.ndarray, shortest: float, longest: float) -> float:
    """Mean density over the periods [shortest, longest] days."""
    period = 1 / freq
    return float(density[(period >= shortest) & (period <= longest)].mean())


def smooth(freq: np.ndarray, density: np.ndarray, per_decade: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Means in log-spaced frequency bins (`per_decade` bins per factor 10), empty bins dropped."""
    edges = np.logspace(np.log10(freq[0]), np.log10(freq[-1]) + 1e-9, int(np.log10(freq[-1] / freq[0]) * per_decade) + 2)
    index = np.digitize(freq, edges)
    keep = np.unique(index)
    return (np.array([freq[index == i].mean() for i in keep]), np.array([density[index == i].mean() for i in keep]))


def spectra(url: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The three curves of the figure for one store."""
    ds = open_store(url)
    out = {name: power_spectrum(ds[var].sel(level=level)) for name, (var, level) in FIELDS.items()}
    out["z500 tropics"] = power_spectrum(ds["geopotential"].sel(level=500), max_lat=15)
    return out


def plot(curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for ax, units, names in ((axes[0], "(m²/s²)² per cycle/day", ("z500", "z500 tropics")),
                             (axes[1], "K² per cycle/day", ("T850",))):
        for (record, style) in (("20 years 6-hourly", "-"), ("2 years hourly", ":")):
            for name, colour in zip(names, ("C0", "C1")):
                f, d = smooth(*curves[record][name])
                ax.loglog(1 / f, d, style, color=colour, lw=1.2, label=f"{name}, {record}")
        for label, low, high in BANDS:
            ax.axvspan(low, high, color="0.85", zorder=0)
            ax.text(np.sqrt(low * high), 1.02, label, transform=ax.get_xaxis_transform(), ha="center", fontsize=8)
        ax.set_xlabel("period (days)")
        ax.set_ylabel(f"area-mean power spectral density, {units}")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(True, which="major", lw=0.3)
    axes[0].set_xlim(0.08, 1e4)
    fig.suptitle("synthetic ERA5-like store (seed 0, 32x64): power of anomalies vs period", y=1.0)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/store_spectrum.png", help="PNG to write")
    p.add_argument("--years", type=int, default=20, help="length of the 6-hourly record, from 2000")
    p.add_argument("--grid", type=int, nargs=2, default=[32, 64])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    nlat, nlon = args.grid
    records = {"20 years 6-hourly": dict(start="2000-01-01", end=f"{2000 + args.years}-01-01", freq="6h"),
               "2 years hourly": dict(start="2015-01-01", end="2017-01-01", freq="1h")}
    curves = {}
    with tempfile.TemporaryDirectory() as work:
        for i, (record, period) in enumerate(records.items()):
            url = f"{work}/store{i}.zarr"
            write_synthetic_era5(url, **period, nlat=nlat, nlon=nlon, seed=args.seed, layout="weatherbench2")
            curves[record] = spectra(url)
    print("| record | field | " + " | ".join(label for label, _, _ in BANDS) + " |")
    print("|---" * (2 + len(BANDS)) + "|")
    for record, fields in curves.items():
        for name, (f, d) in fields.items():
            cells = [f"{band_density(f, d, low, high):.3g}" if 1 / f[0] >= high and 1 / f[-1] <= low else "—"
                     for _, low, high in BANDS]
            print(f"| {record} | {name} | " + " | ".join(cells) + " |")
    plot(curves, Path(args.out))
    print(f"wrote {args.out}")
    return curves


if __name__ == "__main__":
    main()
