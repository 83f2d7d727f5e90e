"""Normalisation statistics, computed with dask over the training split only.

`NormStats` holds them on the way to the model (whose normaliser keeps them as buffers, so they travel with
the weights) and as a small JSON file (`data.stats_path`, `--stats` for official checkpoints).
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import dask
import fsspec
import numpy as np
import xarray as xr
from dask.diagnostics import ProgressBar

from minconv_dist.data.channels import parse_channels
from minconv_dist.data.selection import select_split
from minconv_dist.data.store import DimNames, is_local, local_path, redact


@dataclass
class NormStats:
    """Per-channel mean and std; `channels` are channel spec strings such as `geopotential@500`."""

    channels: list[str]
    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        if not (len(self.channels) == len(self.mean) == len(self.std)):
            raise ValueError(f"NormStats: {len(self.channels)} channels but {len(self.mean)} means "
                             f"and {len(self.std)} stds")
        bad = [c for c, s in zip(self.channels, self.std) if not (np.isfinite(s) and s > 0)]
        if bad or not np.all(np.isfinite(self.mean)):
            raise ValueError(f"NormStats: non-finite mean or non-positive std for channels {bad or self.channels}")

    def save(self, url: str, storage_options: dict | None = None) -> None:
        """Write JSON; locally through a temporary file and a rename, so a reader never sees half a file."""
        text = json.dumps(asdict(self), indent=1)
        if is_local(url):
            path = local_path(url)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        else:  # an object-store PUT is atomic
            with fsspec.open(url, "w", **(storage_options or {})) as f:
                f.write(text)

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None) -> "NormStats":
        with fsspec.open(url, "r", **(storage_options or {})) as f:
            try:
                raw = json.load(f)
                return cls(channels=list(raw["channels"]), mean=list(raw["mean"]), std=list(raw["std"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{redact(url)!r} is not a NormStats JSON file: {err}") from err


def compute_stats(url_or_ds: str | xr.Dataset, channels: str | list, dims: DimNames = DimNames(),
                  time_range: tuple | None = None, storage_options: dict | None = None,
                  progress: bool = True, sample_range: tuple[int, int] | None = None) -> NormStats:
    """Mean and (population) std per channel over (sample,) time, lat and lon, in float64, in one dask pass.

    `sample_range=(start, stop)` restricts a sample store to its training trajectories, as `time_range` does
    the training period of a single series."""
    da = select_split(url_or_ds, channels, dims, time_range, sample_range, storage_options).astype("float64")
    over = [d for d in da.dims if d != "channel"]
    with ProgressBar() if progress else nullcontext():
        mean, sq = dask.compute(da.mean(over).data, (da**2).mean(over).data)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    return NormStats(channels=[str(s) for s in parse_channels(channels)], mean=mean.tolist(), std=std.tolist())
