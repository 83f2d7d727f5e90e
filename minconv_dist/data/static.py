"""Static fields: variables without a time dim (orography, land-sea mask, ...) that a model reads as inputs with
every frame. Read once, coarsened as the data are and put on the data's grid; the model keeps them as buffers
(`models.normalizer.StaticFields`), so a forecast never reads them again."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from minconv_dist.data.channels import ChannelSpec
from minconv_dist.data.chunks import Source, read
from minconv_dist.data.selection import coarsen as coarsen_grid
from minconv_dist.data.store import DimNames, open_store, redact


def read_static(url: str, names: Sequence[str], *, latitude: np.ndarray, longitude: np.ndarray,
                dims: DimNames = DimNames(), coarsen: int = 1, storage_options: dict | None = None) -> np.ndarray:
    """Variables `names` of the store at `url`, each with dims (lat, lon) only, block-averaged by `coarsen` and
    put on the data's grid (`latitude` [H], `longitude` [W], after coarsening; a latitude running the other way
    is flipped): float32 [S, H, W]. A variable that is missing, has a time dim (or any dim but lat and lon), holds
    NaN or lies on another grid is a ValueError naming it and the store."""
    ds = open_store(url, storage_options, dask=False)
    where = repr(redact(url))
    fields = []
    for name in names:
        if name not in ds.data_vars:
            raise ValueError(f"static field {name!r} is not in {where}; it has {sorted(map(str, ds.data_vars))}")
        var = ds[name]
        if dims.time in var.dims:
            raise ValueError(f"static field {name!r} of {where} has the time dim {dims.time!r} (dims {var.dims}): "
                             "a static field is one (lat, lon) field; time-varying variables are data.channels")
        if set(var.dims) != {dims.lat, dims.lon}:
            raise ValueError(f"static field {name!r} of {where} has dims {var.dims}; expected ({dims.lat!r}, "
                             f"{dims.lon!r})")
        var = var.transpose(dims.lat, dims.lon)
        values = read(var, {}, Source(url, ChannelSpec(name), dims, storage_options))
        values = values.assign_coords({d: var[d].values for d in (dims.lat, dims.lon)})
        field = coarsen_grid(values, coarsen, dims.lat, dims.lon, url)
        lat, lon = field[dims.lat].values, field[dims.lon].values
        if lat.shape == np.shape(latitude) and not np.allclose(lat, latitude) and np.allclose(lat[::-1], latitude):
            field, lat = field.isel({dims.lat: slice(None, None, -1)}), lat[::-1]
        if lat.shape != np.shape(latitude) or lon.shape != np.shape(longitude) or not (
                np.allclose(lat, latitude) and np.allclose(lon, longitude)):
            raise ValueError(f"static field {name!r} of {where} lies on a {lat.size}x{lon.size} grid (latitude "
                             f"{lat[0]:g} .. {lat[-1]:g}) that differs from the data's {np.size(latitude)}x"
                             f"{np.size(longitude)} (latitude {latitude[0]:g} .. {latitude[-1]:g}) after coarsening")
        if not np.isfinite(field.values).all():
            raise ValueError(f"static field {name!r} of {where} holds NaN or infinite values")
        fields.append(field.values.astype(np.float32))
    return np.stack(fields) if fields else np.zeros((0, np.size(latitude), np.size(longitude)), np.float32)
