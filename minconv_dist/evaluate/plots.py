"""The pictures users judge a forecast by: skill vs lead time, and truth/forecast/error maps. PNG files, drawn
on matplotlib `Figure` objects (no pyplot: no global backend or figure list to set or leak)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from minconv_dist.evaluate.layout import LAT, LEAD, LON, TIME, label, units

LABELS = {"rmse": "RMSE", "weighted_rmse": "lat-weighted RMSE", "bias": "bias", "acc": "ACC"}
IN_UNITS = ("rmse", "weighted_rmse", "rmse_sqrt_before_time_avg", "bias")  # metrics in the variable's units


def _hours(lead: xr.DataArray) -> np.ndarray:
    return lead.values / np.timedelta64(1, "h")


def skill_figure(skill: xr.Dataset, variable: str, metrics: tuple[str, ...] = ("weighted_rmse", "acc"),
                 title: str = "", unit: str | None = None) -> Figure:
    """One panel per metric, one line per source (model and baselines), against lead time in hours; `variable`
    is a channel (one level of a WB2 variable), titled by its WB2 name. RMSE and bias axes carry `unit`
    (default: `layout.units` of the channel)."""
    unit = unit or units(variable)
    metrics = tuple(m for m in metrics if m in skill["metric"].values)
    fig = Figure(figsize=(5 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for source in skill["source"].values:
            curve = skill[variable].sel(source=source, metric=metric)
            style = "--" if source in ("persistence", "climatology") else "-"
            defined = np.isfinite(curve.values)  # a source without some leads (another forecast's step)
            ax.plot(_hours(curve[LEAD])[defined], curve.values[defined], style, marker=".", label=str(source))
        ax.set_xlabel("lead time [h]")
        scaled = unit and metric in IN_UNITS
        ax.set_ylabel(f"{LABELS.get(metric, metric)} ({label(variable)})" + (f" [{unit}]" if scaled else ""))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or f"{label(variable)}: skill vs lead time ({skill.attrs.get('definition', '')})")
    fig.tight_layout()
    return fig


def plot_skill(skill: xr.Dataset, variable: str, path: str | Path, metrics: tuple[str, ...] = ("weighted_rmse", "acc"),
               title: str = "", unit: str | None = None) -> Path:
    """`skill_figure` as a PNG at `path`."""
    skill_figure(skill, variable, metrics, title, unit).savefig(path, dpi=110)
    return Path(path)


def maps_figure(forecast: xr.Dataset, truth: xr.Dataset, variable: str, leads: list[int] | None = None,
                init_index: int = 0) -> Figure:
    """Rows: chosen lead steps (1-based); columns: truth, forecast, error, for one init time; longitude and
    latitude on the axes, the colour bars in the truth's units (its CF attr, else `layout.units`)."""
    n_lead = forecast.sizes[LEAD]
    leads = sorted({min(max(k, 1), n_lead) for k in (leads or [1, max(1, n_lead // 2), n_lead])})
    fc = forecast[variable].isel({TIME: init_index}).sortby(LAT)
    valid = fc[TIME].values + fc[LEAD].values
    tr = truth[variable].sortby(LAT).sel(time=valid).rename(time=LEAD).assign_coords({LEAD: fc[LEAD].values})
    unit = units(variable, truth[variable].attrs) or ""
    lo, hi = float(min(tr.min(), fc.min())), float(max(tr.max(), fc.max()))
    err_max = float(abs(fc - tr).max()) or 1.0
    extent = [float(fc[LON].min()), float(fc[LON].max()), float(fc[LAT].min()), float(fc[LAT].max())]
    fig = Figure(figsize=(12, 2.6 * len(leads)))
    axes = fig.subplots(len(leads), 3, squeeze=False)
    for row, k in zip(axes, leads):
        t, f = tr.isel({LEAD: k - 1}).values, fc.isel({LEAD: k - 1}).values
        hours = _hours(fc[LEAD])[k - 1]
        for ax, field, name, kw in ((row[0], t, "truth", dict(vmin=lo, vmax=hi, cmap="viridis")),
                                    (row[1], f, "forecast", dict(vmin=lo, vmax=hi, cmap="viridis")),
                                    (row[2], f - t, "error", dict(vmin=-err_max, vmax=err_max, cmap="RdBu_r"))):
            im = ax.imshow(field, origin="lower", extent=extent, aspect="auto", **kw)
            ax.set_title(f"{name}, lead {hours:g} h", fontsize=9)
            ax.set_xlabel("longitude [°E]", fontsize=8)
            ax.set_ylabel("latitude [°N]", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8).set_label(unit, fontsize=8)
    fig.suptitle(f"{label(variable)}, init {pd.Timestamp(fc[TIME].values)}")
    fig.tight_layout()
    return fig


def plot_maps(forecast: xr.Dataset, truth: xr.Dataset, variable: str, path: str | Path,
              leads: list[int] | None = None, init_index: int = 0) -> Path:
    """`maps_figure` as a PNG at `path`."""
    maps_figure(forecast, truth, variable, leads, init_index).savefig(path, dpi=100)
    return Path(path)
