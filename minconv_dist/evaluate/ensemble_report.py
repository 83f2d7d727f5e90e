"""The ensemble part of an evaluation: rank histograms of every ensemble forecast at chosen leads, their table,
and the pictures (CRPS, spread-skill ratio and ensemble-mean RMSE vs lead; rank histograms). PNG files drawn on
matplotlib `Figure` objects, as `plots.py` draws."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from minconv_dist.evaluate.layout import LEAD, REALIZATION, TIME, label, units, weatherbench2_key
from minconv_dist.evaluate.metrics import align_truth, rank_histogram
from minconv_dist.evaluate.report import BASELINES

PANELS = {"crps": "CRPS", "spread_skill_ratio": "spread / skill", "ensemble_mean_rmse": "ensemble-mean RMSE"}
IN_UNITS = ("crps", "ensemble_mean_rmse")  # metrics in the variable's units


def ensembles(forecasts: dict[str, xr.Dataset]) -> dict[str, xr.Dataset]:
    """The forecasts with a `realization` dim."""
    return {name: fc for name, fc in forecasts.items() if REALIZATION in fc.dims}


def lead_steps(n_lead: int, steps: list[int] | None) -> list[int]:
    """Lead steps (1-based, clipped to 1..n_lead) to show: `steps`, else the first, middle and last."""
    return sorted({min(max(k, 1), n_lead) for k in (steps or [1, max(1, n_lead // 2), n_lead])})


def rank_histograms(forecasts: dict[str, xr.Dataset], truth: xr.Dataset, steps: list[int] | None = None,
                    seed: int = 0, drop: Sequence = ()) -> xr.Dataset | None:
    """`rank_histogram` of each ensemble forecast at lead `steps` (1-based, as `--map-leads`; default first,
    middle, last), dims (source, prediction_timedelta, rank) per variable; None without an ensemble. Sources
    of different sizes share the `rank` axis (NaN beyond a source's n + 1 bins; the coord `members` gives n). A
    NaN in a forecast or the truth makes the bins NaN, as it makes the scores. `drop`: init times left out
    (the skill's `nan_inits_dropped_times`, so that the histograms count the init times the scores count)."""
    found = ensembles(forecasts)
    if not found:
        return None
    drop = np.asarray(drop, dtype="datetime64[ns]")
    parts = []
    for fc in found.values():
        fc = fc.isel({LEAD: [k - 1 for k in lead_steps(fc.sizes[LEAD], steps)]})
        fc = fc.sel({TIME: fc[TIME].values[~np.isin(fc[TIME].values, drop)]})
        parts.append(rank_histogram(fc.load(), align_truth(fc, truth).load(), seed))
    out = xr.concat(parts, dim="source", coords="minimal", compat="override", join="outer")
    out = out.assign_coords(source=list(found), members=("source", [fc.sizes[REALIZATION] for fc in found.values()]))
    return out.transpose("source", LEAD, "rank")


def rank_frame(hist: xr.Dataset) -> pd.DataFrame:
    """Long table: source, variable, level, channel, lead_time_h, rank, frequency (ranks 0..n of each source;
    a NaN frequency where NaN entered, as in metrics.csv)."""
    frames = []
    for channel in map(str, hist.data_vars):
        variable, level = weatherbench2_key(channel)
        df = hist[channel].to_dataframe(name="frequency").reset_index()
        df = df[df["rank"] <= df["members"]]
        frames.append(df.assign(variable=variable, level=level, channel=channel,
                                lead_time_h=df[LEAD] / pd.Timedelta(hours=1)))
    columns = ["source", "variable", "level", "channel", "lead_time_h", "rank", "frequency"]
    return pd.concat(frames, ignore_index=True)[columns]


def ensemble_skill_figure(skill: xr.Dataset, variable: str, unit: str | None = None) -> Figure:
    """CRPS, spread-skill ratio (the ideal line at 1) and ensemble-mean RMSE against lead time, one line per
    source, in the same colour in every panel: a deterministic forecast's CRPS is its MAE and its ensemble-mean
    RMSE its RMSE; the spread-skill panel shows the ensembles (`members` > 1) only. CRPS and RMSE axes carry
    `unit` (default: `layout.units` of the channel), as `plots.skill_figure`'s do."""
    unit = unit or units(variable)
    metrics = [m for m in PANELS if m in skill["metric"].values]
    members = dict(zip(map(str, skill["source"].values), skill["members"].values)) if "members" in skill.coords \
        else {}
    sources = list(map(str, skill["source"].values))
    color = {source: f"C{i % 10}" for i, source in enumerate(sources)}  # a source's colour in every panel
    fig = Figure(figsize=(5 * len(metrics), 3.6))
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for source in sources:
            if metric == "spread_skill_ratio" and members.get(source, 1) < 2:
                continue
            curve = skill[variable].sel(source=source, metric=metric)
            defined = np.isfinite(curve.values)
            n = members.get(source, 1)
            ax.plot(curve[LEAD].values[defined] / np.timedelta64(1, "h"), curve.values[defined],
                    "--" if source in BASELINES else "-", marker=".", color=color[source],
                    label=f"{source} ({n} members)" if n > 1 else source)
        if metric == "spread_skill_ratio":
            ax.axhline(1.0, color="k", lw=0.8, label="ideal")
        ax.set_xlabel("lead time [h]")
        scaled = unit and metric in IN_UNITS
        ax.set_ylabel(f"{PANELS[metric]} ({label(variable)})" + (f" [{unit}]" if scaled else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{label(variable)}: ensemble skill vs lead time")
    fig.tight_layout()
    return fig


def plot_ensemble_skill(skill: xr.Dataset, variable: str, path: str | Path, unit: str | None = None) -> Path:
    """`ensemble_skill_figure`, saved to `path`."""
    ensemble_skill_figure(skill, variable, unit).savefig(path, dpi=110)
    return Path(path)


def plot_rank_histograms(hist: xr.Dataset, variable: str, path: str | Path) -> Path:
    """One panel per lead: the truth's rank frequency per ensemble, the flat `1 / (n + 1)` of a calibrated
    ensemble dashed."""
    leads = hist[LEAD].values
    fig = Figure(figsize=(4 * len(leads), 3.4))
    axes = fig.subplots(1, len(leads), squeeze=False)[0]
    sources = list(map(str, hist["source"].values))
    width = 0.8 / len(sources)
    for ax, lead in zip(axes, leads):
        for i, source in enumerate(sources):
            freq = hist[variable].sel(source=source, **{LEAD: lead})
            freq = freq.isel(rank=slice(0, int(freq["members"]) + 1))  # NaN bars (NaN entered) are not drawn
            ranks = freq["rank"].values
            ax.bar(ranks + (i - (len(sources) - 1) / 2) * width, freq.values, width, label=source)
            ax.axhline(1 / ranks.size, ls="--", lw=0.8, color=f"C{i}")
        ax.set_title(f"lead {lead / np.timedelta64(1, 'h'):g} h", fontsize=9)
        ax.set_xlabel("rank of the truth among the members")
        ax.set_ylabel("area-weighted frequency")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{label(variable)}: rank histograms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)


def render_ensemble_outputs(skill: xr.Dataset, hist: xr.Dataset | None, folder: Path, stem,
                            unit: Mapping[str, str | None] | None = None) -> list[Path]:
    """Into `folder`: ensemble_<variable>_<level>.png when the skill has CRPS, and with `hist`
    rank_histogram.csv and rank_<variable>_<level>.png; `stem(channel)` names a variable's files, `unit` maps
    a channel to its units (the truth's CF attr)."""
    files: list[Path] = []
    if "crps" in skill["metric"].values:
        files += [plot_ensemble_skill(skill, c, folder / f"ensemble_{stem(c)}.png", (unit or {}).get(c))
                  for c in map(str, skill.data_vars)]
    if hist is not None:
        files.append(folder / "rank_histogram.csv")
        rank_frame(hist).to_csv(files[-1], index=False)
        files += [plot_rank_histograms(hist, c, folder / f"rank_{stem(c)}.png") for c in map(str, hist.data_vars)]
    return files
