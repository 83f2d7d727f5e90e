"""Data integrity: checksummed stores, bad and missing chunks named by both readers (windows, statistics),
plausibility checks on every frame, and the time axis. Every failure names the store and what is wrong with it."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec

from minconv_dist.data import (DEFAULT_BOUNDS, DataError, NormStats, WindowDataset, channel_bounds,
                               check_stats, compute_stats, generate_navier_stokes, open_store)

T = 5


def copy_of(store: str, tmp_path, name: str = "copy.zarr") -> str:
    path = str(tmp_path / name)
    shutil.copytree(store, path)
    return path


def read_with(reader: str, path: str, **kwargs) -> None:
    """Read all of `z` in `path` the way training does: statistics (dask) or windows (zarr blocks)."""
    if reader == "stats":
        compute_stats(path, "z", progress=False, **kwargs)
    else:
        list(WindowDataset(path, "z", T, shuffle=False, **kwargs))


def test_generated_stores_carry_checksums(tiny_store, tmp_path):
    ns = str(tmp_path / "ns.zarr")
    generate_navier_stokes(ns, samples=2, resolution=8, downsample=2, time_units=1, dt=0.1, batch_size=2,
                           progress=False)
    for path, var in ((tiny_store, "z"), (ns, "vorticity")):
        codecs = zarr.open_array(os.path.join(path, var), mode="r").metadata.codecs
        assert isinstance(codecs[-1], Crc32cCodec), codecs  # after the compressor: it covers the stored bytes


@pytest.mark.parametrize("reader", ["stats", "windows"])
def test_a_flipped_byte_fails_the_checksum_naming_the_chunk(reader, tiny_store, tmp_path):
    path = copy_of(tiny_store, tmp_path)
    chunk = os.path.join(path, "z", "c", "3", "0", "0")
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0x40  # same length: only the checksum can tell
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(DataError, match=r"cannot read channel z time 2015-01-0.* of '.*copy.zarr': "
                                        r"chunk 'z/c/3/0/0' does not decode \(.*checksum"):
        read_with(reader, path)


@pytest.mark.parametrize("reader", ["stats", "windows"])
def test_an_undecodable_chunk_is_named_by_both_readers(reader, tiny_store, tmp_path):
    path = copy_of(tiny_store, tmp_path)
    with open(os.path.join(path, "z", "c", "5", "0", "0"), "wb") as f:
        f.write(b"not zstd at all")
    with pytest.raises(DataError, match="chunk 'z/c/5/0/0' does not decode") as info:
        read_with(reader, path)
    assert "\n" not in str(info.value)


MISSING = (r"chunk 'z/c/10/0/0' of variable 'z' \(time 2015-01-03T12:00:00 to 2015-01-03T17:00:00\) is missing from "
           r"'.*{name}' \(zarr reads it as ")


def without_chunk(path: str, key: str = "z/c/10/0/0") -> str:
    os.remove(os.path.join(path, *key.split("/")))
    return path


@pytest.mark.parametrize("reader", ["stats", "windows"])
def test_a_missing_chunk_is_named_by_both_readers(reader, tiny_store, tmp_path):
    """zarr reads a deleted chunk as NaN (the fill value): named, with its period, as a corrupt one is."""
    path = without_chunk(copy_of(tiny_store, tmp_path))
    kwargs = {"allow_nan": False} if reader == "stats" else {}
    with pytest.raises(DataError, match=MISSING.format(name="copy.zarr") + r"NaN, its fill value\); copy it again, "
                                        r"or set data.nan_policy to 'fill' or 'skip'") as info:
        read_with(reader, path, **kwargs)
    assert "\n" not in str(info.value)


@pytest.fixture
def zero_filled_store(tiny_store, tmp_path) -> str:
    """The tiny store with 0 as zarr's fill value (no CF _FillValue): a missing chunk reads as 0, not NaN."""
    path = rewritten(tiny_store, tmp_path, lambda ds: ds, {"z": {"fill_value": 0.0, "_FillValue": None}})
    assert zarr.open_array(os.path.join(path, "z")).metadata.fill_value == 0
    return without_chunk(path)


@pytest.mark.parametrize("reader, kwargs", [("stats", {"bounds": [None]}), ("windows", {"nan_policy": "skip"})])
def test_a_missing_chunk_that_reads_as_a_number_is_named_whatever_the_policy(reader, kwargs, zero_filled_store):
    """No range and NaN allowed: only the store can tell that the zeros of a missing chunk are not data."""
    with pytest.raises(DataError, match=MISSING.format(name="rewritten.zarr") + r"its fill value 0, which looks like "
                                        r"data\); copy it again$"):
        read_with(reader, zero_filled_store, **kwargs)


def test_a_missing_chunk_read_as_nan_is_the_nan_policys(tiny_store, tmp_path):
    """Under "skip" the windows touching the missing chunk's frames are left out, like any NaN; statistics that
    allow NaN leave them out too. Chunks of one value that are stored are read as data."""
    path = without_chunk(copy_of(tiny_store, tmp_path))
    assert len(list(WindowDataset(path, "z", T, shuffle=False, nan_policy="skip"))) == 240 - T + 1 - (6 + T - 1)
    assert np.isfinite(compute_stats(path, "z", progress=False).mean[0])
    const = copy_of(tiny_store, tmp_path, "const.zarr")
    zarr.open_array(os.path.join(const, "z"), mode="r+")[60:66] = np.float32(50000)  # chunk 10, stored
    assert len(list(WindowDataset(const, "z", T, shuffle=False))) == 240 - T + 1


def test_a_missing_chunk_of_an_s3_store_is_named(tiny_store, s3_options, s3_bucket):
    import s3fs

    url = f"s3://{s3_bucket}/tiny.zarr"
    fs = s3fs.S3FileSystem(**{k: v for k, v in s3_options.items() if k != "endpoint_url"},
                           endpoint_url=s3_options["endpoint_url"])
    fs.put(tiny_store, url, recursive=True)
    fs.rm(f"{url}/z/c/10/0/0")
    with pytest.raises(DataError, match=rf"chunk 'z/c/10/0/0' of variable 'z' .* is missing from '{url}'"):
        list(WindowDataset(url, "z", T, shuffle=False, storage_options=s3_options))


@pytest.fixture
def implausible_store(tiny_store, tmp_path) -> str:
    """A chunk that decodes to garbage (frames 36-41 x 1e22): what a corrupt unchecksummed store gives."""
    path = copy_of(tiny_store, tmp_path, "implausible.zarr")
    arr = zarr.open_array(os.path.join(path, "z"), mode="r+")
    arr[36:42] = arr[36:42] * np.float32(1e22)
    return path


@pytest.mark.parametrize("reader", ["stats", "windows"])
def test_decodable_garbage_is_implausible_naming_channel_time_and_store(reader, implausible_store):
    kwargs = {"bounds": channel_bounds("z")}
    with pytest.raises(DataError, match=r"values outside the plausible range \[30000, 70000\] \(.*e\+26\) in channel "
                                        r"z \(variable 'z'\) at time 2015-01-02T12:00:00 \(and 5 more frames up to "
                                        r"time 2015-01-02T17:00:00\) of '.*implausible.zarr'.*widen data.bounds"):
        read_with(reader, implausible_store, **kwargs)


def test_statistics_check_every_frame_by_default(implausible_store, tiny_store):
    with pytest.raises(DataError, match="plausible range"):
        compute_stats(implausible_store, "z", progress=False)
    assert channel_bounds("z") == [DEFAULT_BOUNDS["z"]]
    stats = compute_stats(implausible_store, "z", progress=False, bounds=[None])  # no range: finiteness only
    assert stats.mean[0] > 1e24
    with pytest.raises(DataError, match=r"statistics of channel z over .*: mean .*e\+2.* do not fit its plausible"):
        check_stats(stats, channel_bounds("z"), repr(implausible_store))
    check_stats(compute_stats(tiny_store, "z", progress=False), channel_bounds("z"), repr(tiny_store))


@pytest.fixture
def nan_inf_store(tiny_store, tmp_path) -> str:
    """NaN in frame 100 (2015-01-05T04:00), +inf in frame 130 (2015-01-06T10:00)."""
    path = copy_of(tiny_store, tmp_path, "naninf.zarr")
    arr = zarr.open_array(os.path.join(path, "z"), mode="r+")
    arr[100, 3, 4] = np.nan
    arr[130, 0, 0] = np.inf
    return path


@pytest.mark.parametrize("reader, kwargs", [("stats", {"allow_nan": True}),
                                            ("windows", {"nan_policy": "fill", "fill_values": [54000.0]})])
def test_infinite_values_are_refused_whatever_the_nan_policy(reader, kwargs, nan_inf_store):
    with pytest.raises(DataError, match=r"infinite values .* in channel z .* at time 2015-01-06T10:00:00 of"):
        read_with(reader, nan_inf_store, **kwargs)


def test_statistics_refuse_nan_unless_allowed(nan_inf_store, tiny_store, tmp_path):
    with pytest.raises(DataError, match=r"NaN in channel z \(variable 'z'\) at time 2015-01-05T04:00:00 of "
                                        r"'.*naninf.zarr'; set data.nan_policy"):
        compute_stats(nan_inf_store, "z", time_range=("2015-01-01", "2015-01-05"), progress=False, allow_nan=False)
    stats = compute_stats(nan_inf_store, "z", time_range=("2015-01-01", "2015-01-05"), progress=False)
    z = open_store(nan_inf_store).z.sel(time=slice("2015-01-01", "2015-01-05")).values.astype(np.float64)
    np.testing.assert_allclose(stats.mean, [np.nanmean(z)], rtol=1e-12)  # NaN left out
    np.testing.assert_allclose(stats.std, [np.nanstd(z)], rtol=1e-8)


def test_channel_bounds_given_default_or_none():
    assert channel_bounds("geopotential@500, temperature@850, vorticity") == [(3e4, 7e4), (150.0, 350.0), None]
    assert channel_bounds("z, t2m", [[1, 2], None]) == [(1.0, 2.0), (150.0, 350.0)]
    with pytest.raises(ValueError, match="1 entries for 2 channels"):
        channel_bounds("z, t2m", [[1, 2]])


def test_loaded_statistics_are_checked():
    bounds = channel_bounds("z")
    check_stats(NormStats(["z"], [54000.0], [3300.0]), bounds, "x")
    with pytest.raises(DataError, match=r"statistics of channel z over 'store' 2015: mean 5.4e\+04, std 3e\+04"):
        check_stats(NormStats(["z"], [54000.0], [30000.0]), bounds, "'store' 2015")  # wider than the range allows


# ---- the time axis: one line naming the store and the problem ----
def rewritten(store: str, tmp_path, change, encoding: dict | None = None) -> str:
    path = str(tmp_path / "rewritten.zarr")
    ds = change(xr.open_zarr(store))
    for var in ds.variables.values():
        var.encoding = {}
    ds.to_zarr(path, zarr_format=3, consolidated=False, encoding=encoding)
    return path


def swap_two_times(ds: xr.Dataset) -> xr.Dataset:
    times = ds.time.values.copy()
    times[[50, 51]] = times[[51, 50]]
    return ds.assign_coords(time=times)


@pytest.mark.parametrize("reader", ["stats", "windows"])
@pytest.mark.parametrize("change, match", [
    (swap_two_times, r"^the time coordinate 'time' of '.*rewritten.zarr' is not strictly increasing: "
                     r"2015-01-03T02:00:00 \(position 51\) follows 2015-01-03T03:00:00$"),
    (lambda ds: ds.drop_vars("time"), r"^'.*rewritten.zarr' has no time coordinate 'time' \(the dim has no values\), "
                                      r"so time_range=\['2015-01-02', '2015-01-03'\] cannot be selected$"),
])
def test_time_axis_problems_are_one_line_naming_the_store(reader, change, match, tiny_store, tmp_path):
    path = rewritten(tiny_store, tmp_path, change)
    kwargs = {"time_range": ("2015-01-02", "2015-01-03")}
    with pytest.raises(DataError, match=match):
        read_with(reader, path, **kwargs)


def test_a_missing_time_coordinate_is_fine_without_a_period(tiny_store, tmp_path):
    """Without a period to select, positions along the time dim will do."""
    path = rewritten(tiny_store, tmp_path, lambda ds: ds.drop_vars("time"))
    assert len(WindowDataset(path, "z", T, shuffle=False)) == 240 - T + 1
