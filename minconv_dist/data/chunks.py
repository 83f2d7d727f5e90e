"""Naming the chunk behind a bad read: the one mechanism the windows and the statistics share.

A read that fails (bytes that do not decompress, a CRC32C that does not match) is re-tried chunk by chunk
over the region it covered, and the error names the chunk's key (e.g. `z/c/3/0/0`), so that the fix is
plain: copy that one object again. A failure no chunk reproduces was transient (the network): it stays an
`OSError`, which a retry may cure; a chunk that fails again is a `DataError`, which no retry can.

A chunk missing from the store does not fail: zarr reads its fill value (NaN, or a number that looks like
data). Stores are read as dense: every chunk of a read whose values are all one value (as a fill value is)
is looked up, and one that is absent is a `DataError` naming it, unless it reads as NaN and the reader's NaN
policy takes NaN (`Source.allow_nan`). Ordinary data cost two passes over the values and no request.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
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
    """One channel of one store: what a read needs to name a chunk that is missing or does not decode.
    `allow_nan`: a missing chunk that reads as NaN is the reader's NaN policy's to handle, not an error."""

    url: str
    spec: ChannelSpec
    dims: DimNames = DimNames()
    storage_options: dict | None = field(default=None, compare=False)
    allow_nan: bool = False


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
    names = list(getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS", []))  # v3 or v2
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


def _stored(group: zarr.Group, source: Source, region: dict[str, slice]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """`(key, chunk index)` of every stored object of `source`'s variable that `region` touches."""
    arr = group[source.spec.variable]
    for chunk in product(*_chunk_ranges(group, arr, source, region)):
        yield f"{arr.path}/{arr.metadata.encode_chunk_key(chunk)}", chunk


def bad_chunk(source: Source, region: dict[str, slice]) -> tuple[str, str] | None:
    """`(key, what is wrong)` of the first chunk of `source` within `region` (slices by the store's dim names)
    that does not decode; None when every one of them reads."""
    group = zarr.open_group(zarr_store(source.url, source.storage_options), mode="r")
    arr = group[source.spec.variable]
    grid = arr.shards or arr.chunks
    for key, chunk in _stored(group, source, region):
        try:
            arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(chunk, grid))]
        except Exception as err:  # noqa: BLE001 - any decoding failure condemns the chunk
            return key, f"does not decode ({type(err).__name__}: {err})"
    return None


def uniform_chunks(values: np.ndarray, starts: Sequence[int], sizes: Sequence[int]) -> list[tuple[tuple[int, ...], Any]]:
    """`(chunk index, value)` of every chunk (of `sizes`) whose part of `values` (a region beginning at `starts`)
    holds one value, NaN throughout or one number. Three values of each part (its first, middle and last) rule
    out almost every chunk of real data in ~0.1 ms whatever the size (a min/max pass over a 480x32x64 block took
    30 ms, more than reading it); only parts where they agree are compared in full."""
    if not values.size:
        return []
    cuts = [np.array([0, *range(c * (s // c + 1) - s, n, c), n]) for n, s, c in zip(values.shape, starts, sizes)]

    def at(picks: tuple[np.ndarray, ...]) -> np.ndarray:  # values at every combination of picks: np.ix_ (slower)
        return values[tuple(p.reshape([-1] + [1] * (len(picks) - 1 - i)) for i, p in enumerate(picks))]

    first, middle, last = (at(picks) for picks in zip(*((b[:-1], (b[:-1] + b[1:] - 1) // 2, b[1:] - 1) for b in cuts)))
    agree = ((first == middle) & (first == last)) | ((first != first) & (middle != middle) & (last != last))
    out = []
    for idx in zip(*np.nonzero(agree)):
        part = values[tuple(slice(b[i], b[i + 1]) for b, i in zip(cuts, idx))]
        value = part.flat[0]
        if (part == value).all() if value == value else np.isnan(part).all():
            out.append((tuple(int(s // c + i) for s, c, i in zip(starts, sizes, idx)), value))
    return out


def check_present(layer: xr.DataArray, region: dict[str, slice], source: Source, values: np.ndarray) -> None:
    """Raise a DataError naming a chunk of `region` of `layer` (read as `values`) that is missing from the store:
    zarr read its fill value. A chunk read as NaN passes when `source.allow_nan` (the NaN policy decides)."""
    grid = layer.encoding.get("preferred_chunks", {})
    starts = [region[d].indices(n)[0] if d in region else 0 for d, n in zip(layer.dims, layer.shape)]
    sizes = [int(grid.get(d, n)) for d, n in zip(layer.dims, layer.shape)]
    found = [(c, v) for c, v in uniform_chunks(values, starts, sizes) if not (source.allow_nan and v != v)]
    if not found:
        return
    fs, root = filesystem(source.url, source.storage_options)
    group = zarr.open_group(zarr_store(source.url, source.storage_options), mode="r")
    for chunk, value in found:
        where = {d: slice(i * c, min((i + 1) * c, n)) for d, i, c, n in zip(layer.dims, chunk, sizes, layer.shape)}
        for key, _ in _stored(group, source, where):
            if not fs.exists(f"{root.rstrip('/')}/{key}"):
                reads = ("NaN, its fill value); copy it again, or set data.nan_policy to 'fill' or 'skip' to read it "
                         "as missing values" if value != value else
                         f"its fill value {value:g}, which looks like data); copy it again")
                raise DataError(f"chunk {key!r} of variable {source.spec.variable!r} ({span(layer, where, source.dims)}) "
                                f"is missing from {redact(source.url)!r} (zarr reads it as {reads}")


def read(layer: xr.DataArray, region: dict[str, slice], source: Source) -> xr.DataArray:
    """`layer[region]` loaded into memory, without coordinates: its readers want the values, and building the
    coordinates took ~0.7 ms a read, a third of reading a 48-frame 32x64 block. A failure is a DataError naming
    the chunk that fails again, or, when none does (a passing network fault), an OSError naming what was being
    read; a chunk missing from the store is a DataError naming it (`check_present`)."""
    try:
        out = xr.DataArray(layer.variable.isel(region).load())
    except Exception as err:
        where = f"channel {source.spec} {span(layer, region, source.dims)} of {redact(source.url)!r}"
        found = bad_chunk(source, region)
        if found is None:
            raise OSError(f"cannot read {where} ({type(err).__name__}: {err})") from err
        raise DataError(f"cannot read {where}: chunk {found[0]!r} {found[1]}") from err
    check_present(layer, region, source, out.values)
    return out


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
