"""Opening stores (local, file://, memory://, S3 via moto), channel specs and their errors."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr
import zarr

from minconv_dist.data import (ChannelSpec, DimNames, open_store, parse_channels, select_channels,
                               write_synthetic_era5)
from minconv_dist.data.chunks import Source, read
from minconv_dist.data.store import (COMPLETE_ATTR, READ_BATCH_CHUNKS, DataError, reading, remote_options, set_attrs,
                                     store_dims, zarr_store)
from minconv_dist.train.local_ray import free_port

WB2 = DimNames(lat="latitude", lon="longitude")
SMALL = {"start": "2015-01-01", "end": "2015-01-03", "chunks": 12}


def test_local_file_and_memory_round_trip(tiny_store, tmp_path):
    ref = open_store(tiny_store)
    assert ref.z.chunks[0][0] == 6 and ref.z.dtype == np.float32
    assert open_store(f"file://{tiny_store}").z.identical(ref.z)
    write_synthetic_era5("memory://roundtrip.zarr", start="2015-01-01", end="2015-01-11", chunks=6)
    np.testing.assert_array_equal(open_store("memory://roundtrip.zarr").z.values, ref.z.values)


def test_reads_in_batches_of_chunks_give_what_zarr_alone_gives(tiny_store):
    """open_store's arrays decode `READ_BATCH_CHUNKS` chunks per task; any slice (across chunks, a partial last
    chunk, one frame) reads the same values as zarr's default one chunk per task, coordinates left out."""
    with reading():
        batched = zarr.open_group(zarr_store(tiny_store), mode="r")["z"]
    plain = zarr.open_group(zarr_store(tiny_store), mode="r")["z"]
    assert batched._async_array.codec_pipeline.batch_size == READ_BATCH_CHUNKS > 1
    assert plain._async_array.codec_pipeline.batch_size == 1
    layer = open_store(tiny_store, dask=False).z
    n = layer.sizes["time"]
    for region in (slice(0, n), slice(5, n - 1), slice(n - 2, n), slice(7, 8)):
        got = read(layer, {"time": region}, Source(tiny_store, parse_channels("z")[0]))
        assert got.dims == layer.dims and not got.coords
        np.testing.assert_array_equal(got.values, plain[region])
        np.testing.assert_array_equal(batched[region], plain[region])


def test_s3_round_trip(tiny_store, s3_bucket, s3_options):
    url = f"s3://{s3_bucket}/tiny.zarr"
    write_synthetic_era5(url, start="2015-01-01", end="2015-01-11", chunks=6, storage_options=s3_options)
    ds = open_store(url, s3_options)
    np.testing.assert_array_equal(ds.z.values, open_store(tiny_store).z.values)
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/absent.zarr"):
        open_store(f"s3://{s3_bucket}/absent.zarr", s3_options)


def test_unreachable_bucket_names_url_not_credentials():
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "AKIDSECRETKEY", "secret": "SUPERSECRET",
               "config_kwargs": {"connect_timeout": 0.5, "retries": {"max_attempts": 2}}}
    start = time.monotonic()
    with pytest.raises(OSError) as info:
        open_store("s3://some-bucket/era5.zarr", options)
    message = str(info.value)
    assert "s3://some-bucket/era5.zarr" in message
    assert not any(s in message for s in ("SUPERSECRET", "AKIDSECRETKEY"))
    assert time.monotonic() - start < 60


def test_remote_timeouts_are_defaults_under_the_users_options():
    options = remote_options("s3://bucket/x.zarr", {"anon": True, "config_kwargs": {"read_timeout": 2}})
    assert options == {"anon": True, "config_kwargs": {"connect_timeout": 10, "read_timeout": 2,
                                                       "retries": {"mode": "standard", "max_attempts": 3}}}
    assert remote_options("gs://bucket/x.zarr", {"requests_timeout": 5}) == {"requests_timeout": 5}
    assert remote_options("gs://bucket/x.zarr")["requests_timeout"] > 0
    assert remote_options("/local/x.zarr") == {} and remote_options("memory://x.zarr") == {}


def open_in_subprocess(endpoint: str, timeout: float, config: dict) -> tuple[subprocess.CompletedProcess, float]:
    """`open_store` of an S3 URL at `endpoint` in a fresh interpreter (whose exit would show any coroutine
    left behind), printing the error; with the time it took."""
    options = {"endpoint_url": endpoint, "key": "k", "secret": "s", "config_kwargs": config}
    code = ("from minconv_dist.data import open_store\n"
            "try:\n"
            f"    open_store('s3://bucket/era5.zarr', {options!r}, timeout={timeout})\n"
            "except OSError as err:\n"
            "    print(err)\n")
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - start


def test_an_endpoint_that_never_answers_fails_in_bounded_time(silent_endpoint):
    out, seconds = open_in_subprocess(silent_endpoint, timeout=3, config={"read_timeout": 1})
    assert out.stdout.splitlines() == ["cannot reach zarr store 's3://bucket/era5.zarr': no answer in time "
                                       "(FSTimeoutError)"], out
    assert out.stderr == "" and seconds < 30


def test_a_refused_endpoint_fails_with_one_line_and_no_async_noise():
    port = free_port()  # nothing listens there
    out, seconds = open_in_subprocess(f"http://127.0.0.1:{port}", timeout=30, config={})
    assert out.stdout.splitlines() == ["cannot reach zarr store 's3://bucket/era5.zarr': EndpointConnectionError"], out
    assert "Exception ignored" not in out.stderr and out.stderr == "" and seconds < 60


def test_missing_local_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.zarr"):
        open_store(str(tmp_path / "nowhere.zarr"))


def test_incomplete_store_is_refused(tmp_path):
    path = str(tmp_path / "half.zarr")
    write_synthetic_era5(path, **SMALL)
    set_attrs(path, None, **{COMPLETE_ATTR: False})
    with pytest.raises(DataError, match=f"zarr store '{path}' is incomplete"):
        open_store(path)


def test_parse_channels_round_trip():
    specs = parse_channels("geopotential@500, temperature@850.5 ,2m_temperature")
    assert specs == [ChannelSpec("geopotential", 500.0), ChannelSpec("temperature", 850.5),
                     ChannelSpec("2m_temperature", None)]
    assert [str(s) for s in specs] == ["geopotential@500", "temperature@850.5", "2m_temperature"]
    assert parse_channels([str(s) for s in specs]) == specs
    for bad in ("", "z@", "@500", "z@abc", "z, z"):
        with pytest.raises(ValueError):
            parse_channels(bad)


def test_select_channels_wb2_layout_keeps_descending_latitude(tiny_north_to_south_store):
    ds = open_store(tiny_north_to_south_store)
    da = select_channels(ds, "geopotential@500, temperature@850, 2m_temperature", WB2)
    assert da.dims == ("time", "channel", "lat", "lon")
    assert list(da.channel.values) == ["geopotential@500", "temperature@850", "2m_temperature"]
    assert da.chunks is not None  # still lazy
    assert da.lat.values[0] > da.lat.values[-1]
    np.testing.assert_array_equal(da.lat.values, ds.latitude.values)
    np.testing.assert_array_equal(da.isel(channel=1).values, ds.temperature.sel(level=850).values)
    np.testing.assert_array_equal(da.isel(channel=2).values, ds["2m_temperature"].values)


def test_store_dims_reads_lat_and_lon_as_the_store_spells_them(tiny_wb2_store, tiny_store, tiny_sample_store):
    wb2, v1 = open_store(tiny_wb2_store), open_store(tiny_store)
    assert store_dims(wb2) == WB2 and store_dims(wb2, WB2) == WB2
    assert store_dims(v1) == DimNames() and store_dims(v1, WB2) == DimNames()
    assert store_dims(wb2, DimNames(time="t", level="plev")) == DimNames(time="t", level="plev", lat="latitude",
                                                                         lon="longitude")  # other names kept
    ns = DimNames(lat="y", lon="x", sample="sample")
    assert store_dims(open_store(tiny_sample_store), ns) == ns
    assert store_dims(v1, DimNames(lat="y")) == DimNames(lat="y")  # not a spelling of lat: left to fail where used


@pytest.mark.parametrize("channels, dims, error, match", [
    ("humidity@500", WB2, KeyError, "variable 'humidity'"),
    ("geopotential@300", WB2, KeyError, "level 300 of 'geopotential'"),
    ("geopotential", WB2, ValueError, "name one level"),
    ("2m_temperature@500", WB2, ValueError, "asks for a level"),
    ("2m_temperature", DimNames(), ValueError, "expected \\('time', 'lat', 'lon'\\)"),
])
def test_select_channels_errors(tiny_wb2_store, channels, dims, error, match):
    with pytest.raises(error, match=match):
        select_channels(open_store(tiny_wb2_store), channels, dims)


def test_zarr_v2_consolidated_store_opens(tiny_store, tmp_path):
    path = str(tmp_path / "v2.zarr")
    ds = xr.open_zarr(tiny_store)
    for var in ds.variables.values():
        var.encoding = {}  # drop the v3 codecs
    ds.chunk(time=6).to_zarr(path, zarr_format=2, consolidated=True)
    np.testing.assert_array_equal(open_store(path).z.values, open_store(tiny_store).z.values)
