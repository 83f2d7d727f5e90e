"""Normalisation statistics and climatology, computed with dask over the training period only.

`NormStats` is a small JSON file meant to travel with the model: the same numbers must normalise
training inputs and de-normalise forecasts, wherever the model is later run.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import dask
import fsspec
import numpy as np
import torch
import xarray as xr
from dask.diagnostics import ProgressBar

from minconv_dist.data.channels import parse_channels, select_channels
from minconv_dist.data.store import DimNames, is_local, local_path, open_store, redact


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

    def _shaped(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim < 3 or x.shape[-3] != len(self.channels):
            raise ValueError(f"expected [..., C={len(self.channels)}, H, W] for channels {self.channels}, "
                             f"got shape {tuple(x.shape)}")
        as_t = lambda v: torch.tensor(v, dtype=x.dtype, device=x.device).view(-1, 1, 1)  # noqa: E731
        return as_t(self.mean), as_t(self.std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """`(x - mean) / std` per channel; `x: [..., C, H, W]`."""
        mean, std = self._shaped(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._shaped(x)
        return x * std + mean


def _training_array(url_or_ds: str | xr.Dataset, channels: str | list, dims: DimNames,
                    time_range: tuple | None, storage_options: dict | None,
                    sample_range: tuple[int, int] | None = None) -> xr.DataArray:
    if sample_range is not None and not dims.sample:
        raise ValueError(f"sample_range={sample_range} needs a sample dim: set DimNames(sample=...)")
    ds = open_store(url_or_ds, storage_options) if isinstance(url_or_ds, str) else url_or_ds
    da = select_channels(ds, channels, dims)
    if time_range is not None:
        da = da.sel(time=slice(*time_range))
    if da.sizes["time"] == 0:
        raise ValueError(f"time range {time_range} selects no data (store covers "
                         f"{ds[dims.time].values[0]} to {ds[dims.time].values[-1]})")
    if sample_range is not None:
        n = da.sizes["sample"]
        if not 0 <= sample_range[0] < sample_range[1] <= n:
            raise ValueError(f"sample_range={sample_range}: need 0 <= start < stop <= {n}, the number of samples")
        da = da.isel(sample=slice(*sample_range))
    return da


def compute_stats(url_or_ds: str | xr.Dataset, channels: str | list, dims: DimNames = DimNames(),
                  time_range: tuple | None = None, storage_options: dict | None = None,
                  progress: bool = True, sample_range: tuple[int, int] | None = None) -> NormStats:
    """Mean and (population) std per channel over (sample,) time, lat and lon, in float64, in one dask pass.

    `sample_range=(start, stop)` restricts a sample store to its training trajectories, as `time_range` does
    the training period of a single series."""
    da = _training_array(url_or_ds, channels, dims, time_range, storage_options, sample_range).astype("float64")
    over = [d for d in da.dims if d != "channel"]
    with ProgressBar() if progress else nullcontext():
        mean, sq = dask.compute(da.mean(over).data, (da**2).mean(over).data)
    std = np.sqrt(np.maximum(sq - mean**2, 0.0))
    return NormStats(channels=[str(s) for s in parse_channels(channels)], mean=mean.tolist(), std=std.tolist())
