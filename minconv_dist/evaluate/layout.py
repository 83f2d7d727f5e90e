"""The WeatherBench2 forecast layout, and the conversion to and from our internal channel names.

WeatherBench2 forecasts (google-research/weatherbench2, `docs/source/evaluation.ipynb` "Specify input
datasets", `weatherbench2/schema.py` `mock_forecast_data`, `docs/source/init-vs-valid-time.md`) are zarr
stores with dims `time` (the init time), `prediction_timedelta` (the lead), `latitude`, `longitude` and, for
variables on pressure levels, `level` (hPa); variables carry ERA5's long names (`geopotential`,
`2m_temperature`), one variable for all levels of a quantity.

Inside this package a field is one variable per *channel*, named by its channel spec (`z`, `geopotential@500`,
see `minconv_dist.data.ChannelSpec`). This module is the one place that maps between the two:
`to_weatherbench2` (channels -> WB2 variables with a `level` dim), `from_weatherbench2` (WB2 variables ->
the channels a truth store offers), `with_cf_attrs` (units and long names). Unknown names pass through.
"""
from __future__ import annotations

import json
from typing import Iterable

import xarray as xr

from minconv_dist.data import DimNames, parse_channels

# Dims of forecasts (and of everything the metrics compare), as WeatherBench2 names them.
TIME, LEAD, LAT, LON, LEVEL = "time", "prediction_timedelta", "latitude", "longitude", "level"
LEGACY_DIMS = {"init_time": TIME, "lead_time": LEAD}  # this package's forecast layout before WB2's

Key = tuple[str, "int | float | None"]  # (WeatherBench2 variable, level in hPa or None)

#: WeatherBench v1 short name (pangeo-data/WeatherBench, its data files and `src/score.py`) -> WeatherBench2
#: name, and the level a channel of that name means when it names none: WeatherBench's single-level files
#: `geopotential_500` and `temperature_850` hold `z` and `t` (z500, t850).
SHORT_NAMES: dict[str, Key] = {
    "z": ("geopotential", 500), "t": ("temperature", 850), "q": ("specific_humidity", None),
    "r": ("relative_humidity", None), "u": ("u_component_of_wind", None), "v": ("v_component_of_wind", None),
    "t2m": ("2m_temperature", None), "u10": ("10m_u_component_of_wind", None),
    "v10": ("10m_v_component_of_wind", None), "msl": ("mean_sea_level_pressure", None),
    "tp": ("total_precipitation", None), "tisr": ("toa_incident_solar_radiation", None),
}

#: CF attributes of WeatherBench2 variables, as ERA5 (and so WB2's ERA5 stores) spells them.
VARIABLE_ATTRS: dict[str, dict[str, str]] = {
    "geopotential": {"units": "m**2 s**-2", "long_name": "Geopotential", "standard_name": "geopotential"},
    "temperature": {"units": "K", "long_name": "Temperature", "standard_name": "air_temperature"},
    "specific_humidity": {"units": "kg kg**-1", "long_name": "Specific humidity", "standard_name": "specific_humidity"},
    "relative_humidity": {"units": "%", "long_name": "Relative humidity", "standard_name": "relative_humidity"},
    "u_component_of_wind": {"units": "m s**-1", "long_name": "U component of wind", "standard_name": "eastward_wind"},
    "v_component_of_wind": {"units": "m s**-1", "long_name": "V component of wind", "standard_name": "northward_wind"},
    "2m_temperature": {"units": "K", "long_name": "2 metre temperature"},
    "10m_u_component_of_wind": {"units": "m s**-1", "long_name": "10 metre U wind component"},
    "10m_v_component_of_wind": {"units": "m s**-1", "long_name": "10 metre V wind component"},
    "mean_sea_level_pressure": {"units": "Pa", "long_name": "Mean sea level pressure",
                                "standard_name": "air_pressure_at_mean_sea_level"},
    "total_precipitation": {"units": "m", "long_name": "Total precipitation"},
    "toa_incident_solar_radiation": {"units": "J m**-2", "long_name": "TOA incident solar radiation"},
}

#: CF attributes of the coordinates. The time coordinates get their `units` from xarray's CF encoding.
COORD_ATTRS: dict[str, dict[str, str]] = {
    TIME: {"long_name": "forecast initialization time", "standard_name": "forecast_reference_time"},
    LEAD: {"long_name": "forecast lead time", "standard_name": "forecast_period"},
    LAT: {"units": "degrees_north", "long_name": "latitude", "standard_name": "latitude"},
    LON: {"units": "degrees_east", "long_name": "longitude", "standard_name": "longitude"},
    LEVEL: {"units": "hPa", "long_name": "pressure level", "standard_name": "air_pressure"},
}


def _level(value: float | None) -> int | float | None:
    """A level as WB2 stores it: an int when whole (500, not 500.0)."""
    return None if value is None else int(value) if float(value).is_integer() else float(value)


def weatherbench2_key(channel: str) -> Key:
    """(WeatherBench2 variable, level) of an internal channel: `z` -> (geopotential, 500),
    `geopotential@500` -> (geopotential, 500), `t2m` -> (2m_temperature, None); unknown names unchanged."""
    (spec,) = parse_channels([channel])
    name, default_level = SHORT_NAMES.get(spec.variable, (spec.variable, None))
    return name, _level(spec.level if spec.level is not None else default_level)


def units(channel: str, attrs: dict | None = None) -> str | None:
    """A channel's units: its CF `units` attr when the store gives one, else ERA5's for its WB2 variable
    (`VARIABLE_ATTRS`), else None."""
    return (attrs or {}).get("units") or VARIABLE_ATTRS.get(weatherbench2_key(channel)[0], {}).get("units")


def label(channel: str) -> str:
    """The channel as WB2 names it, for tables and plots: `z` -> `geopotential@500`."""
    name, level = weatherbench2_key(channel)
    return name if level is None else f"{name}@{level}"


def to_weatherbench2(ds: xr.Dataset) -> xr.Dataset:
    """Variables named by channel -> WeatherBench2 variables; channels at several levels of one variable become
    one variable with a `level` dim (just before `latitude`, else last), NaN where a variable lacks a level
    another one has. Other dims, coords and attrs are kept; no CF attributes are added (`with_cf_attrs`)."""
    groups: dict[str, dict] = {}
    for channel in map(str, ds.data_vars):
        name, level = weatherbench2_key(channel)
        levels = groups.setdefault(name, {})
        if level in levels or (levels and (level is None or None in levels)):
            raise ValueError(f"channel {channel!r} clashes with {levels.get(level, next(iter(levels.values())))!r} "
                             f"as WeatherBench2 variable {name!r}: one variable is either on levels or not")
        levels[level] = channel
    out = xr.Dataset({name: _stack_levels(ds, levels) for name, levels in groups.items()}, attrs=ds.attrs)
    return out.assign_coords({k: v for k, v in ds.coords.items() if k not in out.coords})


def _stack_levels(ds: xr.Dataset, levels: dict) -> xr.DataArray:
    """One WB2 variable from its channels {level: channel}; a lone level-less channel stays as it is."""
    if None in levels:
        return ds[levels[None]]
    order = sorted(levels)
    stacked = xr.concat([ds[levels[lv]] for lv in order], dim=xr.DataArray(order, dims=LEVEL, name=LEVEL),
                        coords="minimal", compat="override")
    dims = [d for d in stacked.dims if d != LEVEL]
    at = dims.index(LAT) if LAT in dims else len(dims)
    return stacked.transpose(*dims[:at], LEVEL, *dims[at:])


def with_cf_attrs(ds: xr.Dataset) -> xr.Dataset:
    """CF `units` / `long_name` (and `standard_name`) on every WB2 variable and coordinate this module knows."""
    out = ds.copy()
    for name in list(out.data_vars) + list(out.coords):
        known = VARIABLE_ATTRS.get(str(name)) or COORD_ATTRS.get(str(name), {})
        out[name].attrs.update(known)
    return out


def _locations(ds: xr.Dataset, level: str) -> dict[Key, tuple[str, object]]:
    """(WB2 variable, level) -> (stored variable, level value or None) for every field of a store: one per
    level of a variable with a `level` dim, else the variable itself (named in WB2's or WB v1's way)."""
    out: dict[Key, tuple[str, object]] = {}
    for name, var in ds.data_vars.items():
        for value in (var[level].values if level in var.dims else [None]):
            channel = str(name) if value is None else f"{name}@{_level(value)}"
            out.setdefault(weatherbench2_key(channel), (str(name), value))
    return out


def store_channels(ds: xr.Dataset, dims: DimNames = DimNames()) -> list[str]:
    """Every channel of a truth store in `dims`'s layout (`var@level` per level, else `var`): the variables
    with time, latitude and longitude dims."""
    fields = ds[[v for v, d in ds.data_vars.items() if {dims.time, dims.lat, dims.lon} <= set(d.dims)]]
    return [name if value is None else f"{name}@{_level(value)}"
            for name, value in _locations(fields, dims.level).values()]


def listed_channels(ds: xr.Dataset) -> list[str] | None:
    """The channels a forecast written by this package was made from (its `channels` attr), else None."""
    listed = ds.attrs.get("channels")
    return None if listed is None else list(json.loads(listed) if isinstance(listed, str) else listed)


def from_weatherbench2(ds: xr.Dataset, channels: Iterable[str]) -> xr.Dataset:
    """A WB2-layout forecast -> one variable per internal channel, for each of `channels` whose WB2 (variable,
    level) the store holds (the first such channel wins). A store of ours offers only the channels of its
    `channels` attr (other levels are NaN padding). Variables named as channels (`z`) and the legacy dims
    `init_time`, `lead_time` are read too. Dims come in our order (time, prediction_timedelta, ..., latitude,
    longitude); attrs and the coords other than `level` are kept."""
    ds = ds.rename({k: v for k, v in LEGACY_DIMS.items() if k in ds.dims})
    held = _locations(ds, LEVEL)
    listed = listed_channels(ds)
    if listed is not None:
        held = {k: v for k, v in held.items() if k in set(map(weatherbench2_key, listed))}
    picked: dict[Key, str] = {}
    for channel in channels:
        picked.setdefault(weatherbench2_key(channel), channel)
    fields = {}
    for key, channel in picked.items():
        if key in held:
            name, value = held[key]
            field = ds[name] if value is None else ds[name].sel({LEVEL: value}, drop=True)
            fields[channel] = field.drop_attrs().transpose(TIME, LEAD, ..., LAT, LON, missing_dims="ignore")
    return xr.Dataset(fields, attrs=ds.attrs)
