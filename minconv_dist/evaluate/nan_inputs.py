"""Which init times of a forecast read NaN. A NaN in a model's input spreads through its convolutions and
its state, so the forecast from it is NaN: the forecast job finds these init times before any rollout and
refuses them, naming them and the channel, unless told to write them (`--allow-nan`)."""
from __future__ import annotations

import numpy as np
import xarray as xr

from minconv_dist.data.chunks import label


def nan_inits(data: xr.DataArray, idx: np.ndarray, context: int, start: int | None = None) -> dict[str, np.ndarray]:
    """{channel: the init times whose inputs hold NaN in it}, from one read of the frames the forecast reads.

    data: (time, channel, lat, lon); idx: the init times' positions in it. An init reads the `context` frames
    ending at it, or, with a warm-up pass from frame `start`, every frame from `start` to it (the state
    carries a NaN to every later init)."""
    window = np.arange(-context + 1, 1)
    frames = np.unique(idx[:, None] + window) if start is None else np.arange(start, int(idx.max()) + 1)
    flags = data.isel(time=frames).isnull().any(["lat", "lon"]).transpose("time", "channel").values
    if not flags.any():
        return {}
    if start is None:
        bad = flags[np.searchsorted(frames, idx[:, None] + window)].any(axis=1)  # [init, channel]
    else:
        bad = np.cumsum(flags, axis=0)[idx - start] > 0
    times = data["time"].values[idx]
    return {str(c): times[bad[:, k]] for k, c in enumerate(data["channel"].values) if bad[:, k].any()}


def describe(found: dict[str, np.ndarray], limit: int = 3) -> str:
    """`channel z: 2016-03-02T00:00:00, 2016-03-03T00:00:00 (and 4 more)` for each channel of `nan_inits`."""
    parts = []
    for channel, times in found.items():
        listed = ", ".join(label(t) for t in times[:limit])
        parts.append(f"channel {channel}: {listed}" + (f" (and {times.size - limit} more)" if times.size > limit else ""))
    return "; ".join(parts)
