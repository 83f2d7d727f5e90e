"""Which init times of a forecast read NaN. A NaN in a model's input spreads through its convolutions and
its state, so the forecast from it is NaN: the forecast job finds these init times before any rollout and
refuses them, naming them and the channel, unless told to write them (`--allow-nan`)."""
from __future__ import annotations

import json
import logging

import numpy as np
import xarray as xr

from minconv_dist.data.chunks import label

log = logging.getLogger(__name__)


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


def check_nan_inits(data: xr.DataArray, idx: np.ndarray, context: int, start: int | None, allow_nan: bool
                    ) -> dict[str, str]:
    """Refuse (ValueError naming them and the channel) the init times whose inputs hold NaN (`nan_inits`), or
    with `allow_nan` say so in one logged line; returns the forecast store's attrs that list them (`nan_inputs`,
    empty when there are none)."""
    nan = nan_inits(data, idx, context, start)
    if not nan:
        return {}
    count = len(set(np.concatenate(list(nan.values()))))
    what = f"{count} of {idx.size} init times read NaN ({describe(nan)})"
    if not allow_nan:
        raise ValueError(f"{what}: their forecasts would be NaN; choose other init times or pass --allow-nan "
                         "to write them")
    log.warning("writing NaN forecasts: %s; listed in the store's nan_inputs attr", what)
    return {"nan_inputs": json.dumps({c: [label(t) for t in times] for c, times in nan.items()})}
