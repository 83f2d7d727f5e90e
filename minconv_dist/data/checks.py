"""Plausibility checks: a corrupt chunk that still decodes (a flipped exponent bit, a torn write of an
unchecksummed store) gives values like 1e26, which train silently into a registered model. The statistics
pass and the windows look at every frame's smallest and largest value per channel against the range the
channel's values can physically take, and refuse infinities (always) and NaN (unless a NaN policy allows
them), naming the channel, the time and the store.

The range of a channel is, in this order: the one given (config `data.bounds`, one `[low, high]` or null per
channel), the table below for `variable@level`, the table for `variable`; else only finiteness is checked.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from minconv_dist.data.channels import parse_channels
from minconv_dist.data.chunks import label
from minconv_dist.data.store import DataError, redact

if TYPE_CHECKING:
    from minconv_dist.data.stats import NormStats

Range = tuple[float, float]

# Generous physical ranges, in the units ERA5 / WeatherBench store (geopotential in m^2/s^2, K, m/s, Pa).
# `z` alone is WeatherBench v1's z500.
DEFAULT_BOUNDS: dict[str, Range] = {
    "z": (3e4, 7e4), "z@500": (3e4, 7e4), "geopotential@500": (3e4, 7e4),
    "z@850": (5e3, 2.5e4), "geopotential@850": (5e3, 2.5e4),
    "t": (150.0, 350.0), "temperature": (150.0, 350.0), "t2m": (150.0, 350.0), "2m_temperature": (150.0, 350.0),
    "u": (-200.0, 200.0), "v": (-200.0, 200.0), "u_component_of_wind": (-200.0, 200.0),
    "v_component_of_wind": (-200.0, 200.0), "u10": (-100.0, 100.0), "v10": (-100.0, 100.0),
    "10m_u_component_of_wind": (-100.0, 100.0), "10m_v_component_of_wind": (-100.0, 100.0),
    "msl": (8.5e4, 1.1e5), "mean_sea_level_pressure": (8.5e4, 1.1e5),
}


def channel_bounds(channels: str | Sequence, given: Sequence[Sequence[float] | None] | None = None
                   ) -> list[Range | None]:
    """The plausible range of each channel: `given[i]` where set, else `DEFAULT_BOUNDS`, else None."""
    specs = parse_channels(channels)
    if given is not None and len(given) != len(specs):
        raise ValueError(f"bounds: {len(given)} entries for {len(specs)} channels {[str(s) for s in specs]}")
    out = []
    for i, spec in enumerate(specs):
        pick = given[i] if given is not None and given[i] is not None else (
            DEFAULT_BOUNDS.get(str(spec)) or DEFAULT_BOUNDS.get(spec.variable))
        out.append(None if pick is None else (float(pick[0]), float(pick[1])))
    return out


def frame_sums(x: np.ndarray) -> np.ndarray:
    """Per frame of `x: [..., H, W]`: `[..., 5]` = smallest and largest value (NaN aside), NaN count, sum and sum
    of squares (NaN aside), in float64: one pass gives the checks and the statistics."""
    flat = x.reshape(*x.shape[:-2], -1).astype(np.float64)
    nan = np.isnan(flat)
    if not nan.any():  # the usual case, twice as fast as the NaN-aware functions
        parts = (flat.min(-1), flat.max(-1), np.zeros(flat.shape[:-1]), flat.sum(-1), np.einsum("...i,...i", flat, flat))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN frames: NaN low and high; counted
            parts = (np.nanmin(flat, -1), np.nanmax(flat, -1), nan.sum(-1), np.nansum(flat, -1),
                     np.nansum(flat * flat, -1))
    return np.stack(parts, axis=-1)


@dataclass
class Frames:
    """Per frame (rows) and channel (columns): the smallest and the largest value, NaN aside, and the number of
    NaN; with each frame's time (and sample) label. What the checks look at, from a block or a dask pass."""

    low: np.ndarray
    high: np.ndarray
    nans: np.ndarray
    times: np.ndarray
    samples: np.ndarray | None = None

    @classmethod
    def of_sums(cls, sums: np.ndarray, times: np.ndarray, samples: np.ndarray | None) -> "Frames":
        """From `frame_sums` of a `[S, T, C, H, W]` array (S = 1 without a sample dim) with its T time and S
        sample labels."""
        s, t, c, _ = sums.shape
        rows = sums.reshape(s * t, c, 5)
        return cls(rows[..., 0], rows[..., 1], rows[..., 2], np.tile(times, s),
                   None if samples is None else np.repeat(samples, t))

    def where(self, bad: np.ndarray) -> tuple[int, str]:
        """The first flagged frame and a text naming it (and how far the flagged frames reach)."""
        rows = np.flatnonzero(bad)
        text = self._name(rows[0])
        if rows.size > 1:
            text += f" (and {rows.size - 1} more frames up to {self._name(rows[-1])})"
        return int(rows[0]), text

    def _name(self, row: int) -> str:
        sample = "" if self.samples is None else f" of sample {label(self.samples[row])}"
        return f"time {label(self.times[row])}{sample}"


def check_frames(frames: Frames, channels: str | Sequence, bounds: Sequence[Range | None], url: str, *,
                 allow_nan: bool) -> None:
    """Refuse infinite values, NaN (unless `allow_nan`) and values outside each channel's range, naming the
    channel, the time and the store."""
    for c, (spec, rng) in enumerate(zip(parse_channels(channels), bounds)):
        low, high = frames.low[:, c], frames.high[:, c]
        problems = [("infinite values", np.isinf(low) | np.isinf(high), "")]
        if not allow_nan:
            problems.append(("NaN", frames.nans[:, c] > 0, "; set data.nan_policy to 'fill' or 'skip' to continue"))
        if rng is not None:
            problems.append((f"values outside the plausible range [{rng[0]:g}, {rng[1]:g}]",
                             (low < rng[0]) | (high > rng[1]), "; if they are right, widen data.bounds"))
        for what, bad, hint in problems:
            if bad.any():
                row, where = frames.where(bad)
                seen = f" ({low[row]:.4g} to {high[row]:.4g})" if what != "NaN" else ""
                raise DataError(f"{what}{seen} in channel {spec} (variable {spec.variable!r}) at {where} of "
                                f"{redact(url)!r}{hint}")


def check_stats(stats: "NormStats", bounds: Sequence[Range | None], where: str) -> None:
    """Statistics that values within a channel's range could have: mean inside it, std at most half its width
    (the largest any distribution on an interval can have). `where` names the store and period."""
    for spec, m, s, rng in zip(stats.channels, stats.mean, stats.std, bounds):
        if rng is not None and not (rng[0] <= m <= rng[1] and s <= (rng[1] - rng[0]) / 2):
            raise DataError(f"statistics of channel {spec} over {where}: mean {m:.4g}, std {s:.4g} do not fit its "
                            f"plausible range [{rng[0]:g}, {rng[1]:g}]; if the data are right, widen data.bounds")
