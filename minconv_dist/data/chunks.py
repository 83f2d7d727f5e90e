"""Naming the chunk behind a failed read: the one mechanism the windows and the statistics share.

A read that fails (bytes that do not decompress, a CRC32C that does not match) is re-tried chunk by chunk
over the region it covered, and the error names the chunk's key (e.g. `z/c/3/0/0`), so that the fix is
plain: copy that one object again. A failure no chunk reproduces was transient (the network): it stays an
`OSError`, which a retry may cure; a chunk that fails again is a `DataError`, which no retry can.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from itertools import product
from typing import Any

import dask
import dask.array
import numpy as np
import xarray as xr
import zarr

from minconv_dist.data.channels import ChannelSpec
from minconv_dist.data.store import DataError, DimNames, filesystem, redact, zarr_store


@dataclass(frozen=True)
class Source:
    """One channel of one store: what a failed read needs to name its chunk."""

    url: str
    spec: ChannelSpec
    dims: DimNames = DimNames()
    storage_options: dict | None = field(default=None, compare=False)


def label(value: Any) -> str:
    """A coordinate value for messages: datetimes to the second, numbers compactly."""
    if isinstance(value, (np.datetime64, datetime)):  # pandas' Timestamp is a datetime
        return np.datetime_as_string(np.datetime64(value), unit="s")
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def span(layer: xr.DataArray, region: dict[str, slice], dims: DimNames) -> str:
    """The time (and sample) labels that `region` of `layer` covers, e.g. `time 2015-01-04T00:00:00 to ...`."""
    parts = []
    for dim in (dims.time, dims.sample):
        if dim in region and dim in layer.coords:
            values = layer[dim].values[region[dim]]
            if values.size:
                parts.append(f"{dim} {label(values[0])}" + (f" to {label(values[-1])}" if values.size > 1 else ""))
    return ", ".join(parts)


def _chunk_ranges(group: zarr.Group, arr: zarr.Array, source: Source, region: dict[str, slice]) -> list[range]:
    """Per dim of `arr`, the chunk indices that `region` touches (the channel's level; other dims whole)."""
    names = list(arr.metadata.dimension_names or arr.attrs.get("_ARRAY_DIMENSIONS", []))
    grid = arr.shards or arr.chunks  # stored objects: shards when the array is sharded
    ranges = []
    for name, size, csize in zip(names, arr.shape, grid):
        if name in region:
            start, stop, _ = region[name].indices(size)
            ranges.append(range(start // csize, (max(stop, start + 1) - 1) // csize + 1))
        elif name == source.dims.level and source.spec.level is not None:
            index = int(np.flatnonzero(group[name][:] == source.spec.level)[0])
            ranges.append(range(index // csize, index // csize + 1))
        else:
            ranges.append(range(math.ceil(size / csize)))
    return ranges


def bad_chunk(source: Source, region: dict[str, slice]) -> tuple[str, str] | None:
    """`(key, what is wrong)` of the first chunk of `source` within `region` (slices by the store's dim names)
    that is missing from the store or does not decode; None when every one of them reads."""
    group = zarr.open_group(zarr_store(source.url, source.storage_options), mode="r")
    arr = group[source.spec.variable]
    fs, root = filesystem(source.url, source.storage_options)
    grid = arr.shards or arr.chunks
    for chunk in product(*_chunk_ranges(group, arr, source, region)):
        key = f"{arr.path}/{arr.metadata.encode_chunk_key(chunk)}"
        if not fs.exists(f"{root.rstrip('/')}/{key}"):
            return key, "is missing from the store"
        try:
            arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk, grid))]
        except Exception as err:  # noqa: BLE001 - any decoding failure condemns the chunk
            return key, f"does not decode ({type(err).__name__}: {err})"
    return None


def read(layer: xr.DataArray, region: dict[str, slice], source: Source) -> xr.DataArray:
    """`layer[region]` loaded into memory, without coordinates: its readers want the values, and building the
    coordinates took ~0.7 ms a read, a third of reading a 48-frame 32x64 block. A failure is a DataError naming
    the chunk that fails again, or, when none does (a passing network fault), an OSError naming what was being
    read."""
    try:
        return xr.DataArray(layer.variable.isel(region).load())
    except Exception as err:
        where = f"channel {source.spec} {span(layer, region, source.dims)} of {redact(source.url)!r}"
        found = bad_chunk(source, region)
        if found is None:
            raise OSError(f"cannot read {where} ({type(err).__name__}: {err})") from err
        raise DataError(f"cannot read {where}: chunk {found[0]!r} {found[1]}") from err


class _NamedReads:
    """Array-like over a lazy layer whose reads go through `read`, for `dask.array.from_array`."""

    def __init__(self, layer: xr.DataArray, source: Source) -> None:
        self.layer, self.source = layer, source
        self.shape, self.dtype, self.ndim = layer.shape, layer.dtype, layer.ndim

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        return read(self.layer, dict(zip(self.layer.dims, key)), self.source).values


def dask_layer(layer: xr.DataArray, source: Source) -> xr.DataArray:
    """`layer` (lazy, not dask) as a dask array chunked as on disk, each task reading through `read`, so
    that a dask computation over it (the statistics) fails naming the chunk."""
    preferred = layer.encoding.get("preferred_chunks", {})
    chunks = tuple(preferred.get(dim, -1) for dim in layer.dims)
    name = "named-read-" + dask.base.tokenize(source.url, str(source.spec), layer.dims, layer.shape)
    data = dask.array.from_array(_NamedReads(layer, source), chunks=chunks, name=name,
                                 meta=np.empty((0,) * layer.ndim, layer.dtype))
    return layer.copy(data=data)
