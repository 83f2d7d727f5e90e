"""Channel specs such as `geopotential@500, temperature@850, 2m_temperature` and their selection."""

from __future__ import annotations

from dataclasses import dataclass

import xarray as xr

from minconv_dist.data.store import DimNames


@dataclass(frozen=True)
class ChannelSpec:
    """One input channel: a variable, at one pressure level if the variable has a level dimension."""

    variable: str
    level: float | None = None

    def __str__(self) -> str:
        if self.level is None:
            return self.variable
        return f"{self.variable}@{int(self.level) if float(self.level).is_integer() else self.level}"


def parse_channels(spec: str | list[str] | list[ChannelSpec]) -> list[ChannelSpec]:
    """Parse `"var@level, var"` (or a list of such items) into channel specs."""
    items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        if isinstance(item, ChannelSpec):
            out.append(item)
            continue
        name, sep, level = item.strip().partition("@")
        if not name or (sep and not level):
            raise ValueError(f"bad channel {item!r} in {spec!r}: expected 'variable' or 'variable@level'")
        try:
            out.append(ChannelSpec(name, float(level) if sep else None))
        except ValueError as err:
            raise ValueError(f"bad level {level!r} in channel {item!r}: expected a number") from err
    if not out:
        raise ValueError(f"no channels in {spec!r}")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate channels in {spec!r}")
    return out


def channel_layers(ds: xr.Dataset, channels: str | list, dims: DimNames = DimNames()) -> list[xr.DataArray]:
    """One validated `([sample,] time, lat, lon)` array per channel, in the store's dim names and as lazy as `ds`."""
    wanted = ((dims.sample,) if dims.sample else ()) + (dims.time, dims.lat, dims.lon)
    layers = []
    for spec in parse_channels(channels):
        if spec.variable not in ds.data_vars:
            raise KeyError(f"variable {spec.variable!r} (channel {spec}) not in store; "
                           f"it has {sorted(map(str, ds.data_vars))}")
        var = ds[spec.variable]
        if spec.level is not None:
            if dims.level not in var.dims:
                raise ValueError(f"channel {spec} asks for a level but {spec.variable!r} has dims {var.dims} "
                                 f"(no level dim {dims.level!r})")
            levels = var[dims.level].values
            if spec.level not in levels:
                raise KeyError(f"level {spec.level:g} of {spec.variable!r} (channel {spec}) not in store; "
                               f"levels are {levels.tolist()}")
            var = var.sel({dims.level: spec.level}, drop=True)
        elif dims.level in var.dims:
            raise ValueError(f"variable {spec.variable!r} has a {dims.level!r} dim: name one level, "
                             f"e.g. '{spec.variable}@{var[dims.level].values[0]:g}'")
        if set(var.dims) != set(wanted):
            raise ValueError(f"variable {spec.variable!r} has dims {var.dims}; expected {wanted} (give the store's "
                             "dim names: --dims of the forecast and evaluation jobs, data.dims in training, DimNames "
                             "in Python)")
        layers.append(var.transpose(*wanted).reset_coords(drop=True))
    return layers


def select_channels(ds: xr.Dataset, channels: str | list, dims: DimNames = DimNames()) -> xr.DataArray:
    """Stack the chosen variables/levels into a lazy `[[sample,] time, channel, lat, lon]` array (needs a
    dask-backed `ds`).

    Dimensions are renamed to these canonical names; latitude keeps the store's order and both
    coordinates stay attached, so nothing downstream has to guess whether latitude descends.
    """
    specs = parse_channels(channels)
    return stack_channels(channel_layers(ds, specs, dims), specs, dims)


def stack_channels(layers: list[xr.DataArray], specs: list[ChannelSpec], dims: DimNames) -> xr.DataArray:
    """The per-channel arrays of `channel_layers` as one `[[sample,] time, channel, lat, lon]` array."""
    out = xr.concat(layers, dim="channel", coords="minimal", compat="override", join="exact")
    out = out.assign_coords(channel=[str(s) for s in specs])
    pairs = ((dims.sample, "sample"), (dims.time, "time"), (dims.lat, "lat"), (dims.lon, "lon"))
    out = out.rename({old: new for old, new in pairs if old and old != new})
    return out.transpose(*(("sample",) if dims.sample else ()), "time", "channel", "lat", "lon")
