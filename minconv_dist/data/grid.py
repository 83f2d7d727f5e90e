"""Which grids have latitudes, and their rows' cell areas: one definition for the training loss and the
evaluation (both layers sit above data/, so neither imports the other for it)."""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import xarray as xr

A = TypeVar("A", xr.DataArray, np.ndarray)

# CF conventions (section 4.1): a latitude coordinate is known by its units or its standard_name
LATITUDE_UNITS = ("degrees_north", "degree_north", "degree_N", "degrees_N", "degreeN", "degreesN")
LATITUDE_NAMES = ("lat", "latitude")  # what WeatherBench (v1) and WeatherBench2 call it, with no attributes


def cell_area_weights(latitude: A) -> A:
    """Relative area of each latitude row's cells, normalised to mean 1 (WeatherBench2's weights).

    Source: weatherbench2 `weatherbench2/metrics.py`, `get_lat_weights` / `_cell_area_from_latitude`. Cell
    edges lie halfway between rows and at ±90°, so a row at a pole gets a half-cell; a row's weight is
    `sin(upper edge) - sin(lower edge)`. Latitude may ascend or descend; the weights follow its order. Takes
    and returns a DataArray (the evaluation) or a numpy array (the training loss).
    """
    degrees = np.asarray(latitude, dtype=float)
    order = np.argsort(degrees)
    rows = np.deg2rad(degrees[order])
    if (np.diff(rows) <= 0).any() or (np.abs(degrees) > 90).any():
        raise ValueError(f"latitudes must be distinct and within [-90, 90]; got {degrees.tolist()}")
    edges = np.concatenate([[-np.pi / 2], (rows[:-1] + rows[1:]) / 2, [np.pi / 2]])
    area = np.empty_like(rows)
    area[order] = np.diff(np.sin(edges))
    weights = area / area.mean()
    return latitude.copy(data=weights) if isinstance(latitude, xr.DataArray) else weights


def is_latitude(coord: xr.DataArray) -> bool:
    """Whether a coordinate holds latitudes: CF units or standard_name, else the name WeatherBench gives it."""
    attrs = coord.attrs
    return (attrs.get("units") in LATITUDE_UNITS or attrs.get("standard_name") == "latitude"
            or str(coord.name).lower() in LATITUDE_NAMES)
