"""Normalisation statistics, computed with dask over the training split only.

`NormStats` holds them on the way to the model (whose normaliser keeps them as buffers, so they travel with
the weights) and as a small JSON file (`data.stats_path`, `--stats` for official checkpoints). The pass
that computes them reduces each frame first, so that the same pass checks every frame (`checks.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import dask.array
import fsspec
import numpy as np
import xarray as xr
from dask.diagnostics import ProgressBar

from minconv_dist.data.channels import parse_channels
from minconv_dist.data.checks import Frames, Range, channel_bounds, check_frames, frame_sums
from minconv_dist.data.selection import select_split
from minconv_dist.data.store import DimNames, is_local, local_path, redact, remote_options


@dataclass
class NormStats:
    """Per-channel mean and std; `channels` are channel spec strings such as `geopotential@500`.
    `tendency_std`: the std of one time step's change, x(t+1) - x(t), per channel (what a model that predicts
    tendencies scales its output by: `models.normalizer.TendencyNormalizer`); None in files written before it."""

    channels: list[str]
    mean: list[float]
    std: list[float]
    tendency_std: list[float] | None = None

    def __post_init__(self) -> None:
        if not (len(self.channels) == len(self.mean) == len(self.std)):
            raise ValueError(f"NormStats: {len(self.channels)} channels but {len(self.mean)} means "
                             f"and {len(self.std)} stds")
        bad = [c for c, s in zip(self.channels, self.std) if not (np.isfinite(s) and s > 0)]
        if bad or not np.all(np.isfinite(self.mean)):
            raise ValueError(f"NormStats: non-finite mean or non-positive std for channels {bad or self.channels}")
        if self.tendency_std is not None:
            bad = [c for c, s in zip(self.channels, self.tendency_std) if not (np.isfinite(s) and s > 0)]
            if bad or len(self.tendency_std) != len(self.channels):
                raise ValueError(f"NormStats: tendency_std needs one finite value > 0 per channel, got "
                                 f"{self.tendency_std} for {self.channels}")

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
            with fsspec.open(url, "w", **remote_options(url, storage_options)) as f:
                f.write(text)

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None) -> "NormStats":
        with fsspec.open(url, "r", **remote_options(url, storage_options)) as f:
            try:
                raw = json.load(f)
                tendency = raw.get("tendency_std")
                return cls(channels=list(raw["channels"]), mean=list(raw["mean"]), std=list(raw["std"]),
                           tendency_std=None if tendency is None else list(tendency))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{redact(url)!r} is not a NormStats JSON file: {err}") from err


def compute_stats(url_or_ds: str | xr.Dataset, channels: str | list, dims: DimNames = DimNames(),
                  time_range: tuple | None = None, storage_options: dict | None = None,
                  progress: bool = True, sample_range: tuple[int, int] | None = None,
                  bounds: Sequence[Range | None] | None = None, allow_nan: bool = True,
                  reader: str = "auto") -> NormStats:
    """Mean and (population) std per channel over (sample,) time, lat and lon, in float64, in one dask pass
    that also checks every frame (`checks.check_frames`: finite, NaN only if `allow_nan`, inside `bounds`,
    default `channel_bounds(channels)`); NaN are left out of the statistics. The same pass gives the std of
    the change from one time step to the next (`tendency_std`; within each sample of a sample store), on the
    store's own grid: a coarsened model's changes are a little smoother.

    `sample_range=(start, stop)` restricts a sample store to its training trajectories, as `time_range` does
    the training period of a single series."""
    da = select_split(url_or_ds, channels, dims, time_range, sample_range, storage_options, allow_nan=allow_nan,
                      reader=reader)
    data = da.data if dims.sample else da.data[None]  # [sample, time, channel, lat, lon]
    data = data.rechunk({3: -1, 4: -1})  # whole frames per task
    sums = dask.array.map_blocks(frame_sums, data, drop_axis=4, chunks=data.chunks[:3] + ((5,),), dtype=np.float64)
    change = data[:, 1:] - data[:, :-1]
    change_sums = dask.array.map_blocks(frame_sums, change, drop_axis=4, chunks=change.chunks[:3] + ((5,),),
                                        dtype=np.float64)
    with ProgressBar() if progress else nullcontext():
        sums, change_sums = dask.compute(sums, change_sums)
    url = url_or_ds if isinstance(url_or_ds, str) else "the dataset"
    frames = Frames.of_sums(sums, da["time"].values, da["sample"].values if dims.sample else None)
    check_frames(frames, channels, channel_bounds(channels) if bounds is None else bounds, url, allow_nan=allow_nan)
    cells = da.sizes["lat"] * da.sizes["lon"]
    mean, std = _mean_std(sums, cells)
    return NormStats(channels=[str(s) for s in parse_channels(channels)], mean=mean.tolist(), std=std.tolist(),
                     tendency_std=_change_std(change_sums, cells))


def _mean_std(sums: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the mean and population std, NaN left out, from the `frame_sums` [S, T, C, 5] of frames of
    `cells` values."""
    count = cells * sums.shape[0] * sums.shape[1] - sums[..., 2].sum(axis=(0, 1))
    mean = sums[..., 3].sum(axis=(0, 1)) / count
    return mean, np.sqrt(np.maximum(sums[..., 4].sum(axis=(0, 1)) / count - mean**2, 0.0))


def _change_std(sums: np.ndarray, cells: int) -> list[float] | None:
    """Per channel, the population std of the step changes from their `frame_sums` [S, T - 1, C, 5]; None where
    there is no change to measure (a split of one frame, a channel all NaN, or one that never changes: a model
    cannot scale its output by zero)."""
    if sums.shape[1] == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore"):  # no change counted: 0 / 0, refused below
        std = _mean_std(sums, cells)[1]
    return std.tolist() if np.all(np.isfinite(std) & (std > 0)) else None
