"""The readers of `store.READERS`: the fast-io extra's (zarrs's codec pipeline, obstore's S3 client) read every
slice bit-equal to zarr-python's, name a corrupt chunk, leave a missing one to be named, read the static fields,
fail in bounded time on an endpoint that never answers, survive forked loader workers, and are refused (or left
for zarr-python) where they cannot serve."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader
from zarr.core.array import AsyncArray
from zarr.storage import StorePath

from minconv_dist.data import (DataError, DimNames, WindowDataset, compute_stats, open_store, parse_channels,
                               write_synthetic_era5)
from minconv_dist.data import store as store_module
from minconv_dist.data.chunks import Source, read
from minconv_dist.data.static import read_static
from minconv_dist.data.store import fast_io_missing, reading, resolve_reader, s3_client, zarr_store
from minconv_dist.train.config import ConfigError, load_config

needs_fast_io = pytest.mark.skipif(fast_io_missing() is not None, reason=f"fast-io extra: {fast_io_missing()}")
NS = DimNames(lat="y", lon="x", sample="sample")
S3_KEYS = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}


@pytest.fixture(scope="module")
def s3_process():
    """storage_options of a moto server in a process of its own (`local_s3`: the zarrs reader cannot be served
    from inside this interpreter), with a bucket `readers` holding the tiny store and the sample store."""
    pytest.importorskip("moto")
    from minconv_dist.train.local_s3 import local_s3

    with local_s3(["readers"]) as options:
        yield options


def s3_copy(local: str, name: str, options: dict) -> str:
    """`local` uploaded to s3://readers/<name>."""
    fs = store_module.filesystem("s3://readers", options)[0]
    fs.put(local, f"readers/{name}", recursive=True)
    return f"s3://readers/{name}"


def slices(n: int) -> list[slice]:
    """Whole, across chunks, a partial last chunk, one frame, empty."""
    return [slice(0, n), slice(5, n - 1), slice(n - 2, n), slice(7, 8), slice(3, 3)]


def test_resolving_readers(monkeypatch):
    assert resolve_reader("/x.zarr", None, "zarr") == "zarr"
    monkeypatch.setattr(store_module, "fast_io_missing", lambda: "zarrs not installed (pip install ...)")
    assert resolve_reader("/x.zarr") == "zarr"  # auto falls back to zarr-python without the extra
    assert resolve_reader("s3://b/x.zarr", S3_KEYS) == "zarr"
    for reader in ("zarrs", "obstore"):
        with pytest.raises(ValueError, match=f"reader='{reader}': zarrs not installed"):
            resolve_reader("/x.zarr", None, reader)
        with pytest.raises(ConfigError, match=f"data.reader: reader='{reader}': zarrs not installed"):
            load_config(None, [f"data.reader={reader}"])
    with pytest.raises(ValueError, match=r"reader='fast': expected one of \('auto', 'zarr', 'zarrs', 'obstore'\)"):
        resolve_reader("/x.zarr", None, "fast")


@needs_fast_io
def test_which_reader_auto_picks():
    assert resolve_reader("/x.zarr") == resolve_reader("file:///x.zarr") == "zarrs"
    assert resolve_reader("memory://x.zarr") == resolve_reader("gs://b/x.zarr", {"token": "anon"}) == "zarr"
    assert resolve_reader("s3://b/x.zarr", S3_KEYS) == "obstore"  # the faster on S3 (docs/benchmarks.md)
    assert resolve_reader("s3://b/x.zarr", {"anon": True, "client_kwargs": {"region_name": "eu-west-1"}}) == "obstore"
    # s3fs finds what obstore would not: credentials of a profile or the environment, a bucket's region
    for options in (None, {"anon": True}, {"key": "k", "secret": "s"}, {**S3_KEYS, "profile": "p"}):
        assert resolve_reader("s3://b/x.zarr", options) == "zarr", options
    assert resolve_reader("/x.zarr", None, "obstore") == "zarr"  # obstore serves s3:// only
    assert resolve_reader("s3://b/x.zarr", {"anon": True}, "zarrs") == "zarrs"  # asked for: obstore's own chain
    with pytest.raises(ValueError, match=r"storage_options\['profile'\] has no obstore equivalent; read "
                                         r"'s3://b/x.zarr' with reader 'zarr'"):
        resolve_reader("s3://b/x.zarr", {**S3_KEYS, "profile": "p"}, "zarrs")
    with pytest.raises(ConfigError, match=r"data.reader: storage_options\['profile'\]"):
        load_config(None, ["data.url=s3://b/x.zarr", "data.reader=obstore", "data.storage_options.profile=p"])
    with pytest.raises(ConfigError, match=r"data.reader: storage_options\['profile'\] .* 's3://b/static.zarr'"):
        load_config(None, ["data.static_url=s3://b/static.zarr", "data.reader=zarrs", "data.storage_options.profile=p"])


def test_s3_options_map_to_obstore_with_the_remote_defaults():
    client = s3_client("s3://bucket/era5/z.zarr/", {**S3_KEYS, "token": "t", "requester_pays": True,
                                                   "client_kwargs": {"region_name": "eu-west-1"},
                                                   "config_kwargs": {"read_timeout": 2}})
    assert client["bucket"] == "bucket" and client["prefix"] == "era5/z.zarr"
    assert client["config"] == {"endpoint": "http://127.0.0.1:9", "access_key_id": "k", "secret_access_key": "s",
                                "session_token": "t", "request_payer": True, "region": "eu-west-1"}
    # REMOTE_DEFAULTS' 10 s to connect and 3 attempts stay; the user's read timeout bounds each request
    assert {k: v.total_seconds() for k, v in client["client_options"].items() if k != "allow_http"} == {
        "connect_timeout": 10, "timeout": 2}
    assert client["client_options"]["allow_http"] and client["retry_config"] == {"max_retries": 2}
    assert s3_client("s3://bucket", {"anon": True})["config"] == {"skip_signature": True}


@needs_fast_io
@pytest.mark.parametrize("reader", ["zarrs", "obstore"])
def test_every_slice_reads_bit_equal_to_zarr_python(reader, tiny_store, tiny_sample_store, s3_process):
    """Each read of `chunks.read` (what the windows and statistics use) by `reader` equals zarr-python's own
    array read of the same slice: time slices of the tiny store and (sample, time) slices of the sample store,
    whose chunks (4, 5) divide neither dim; locally and on S3."""
    stores = [(tiny_store, None, "z", "time", DimNames()), (tiny_sample_store, None, "vorticity", "time", NS)]
    stores += [(s3_copy(path, os.path.basename(path), s3_process), s3_process, var, dim, dims)
               for path, _, var, dim, dims in stores]
    checked = []
    for url, options, var, dim, dims in stores:
        if resolve_reader(url, options, reader) != reader:
            continue  # obstore on a local store is zarr-python's own read
        plain = zarr.open_group(zarr_store(url, options), mode="r")[var]
        layer = open_store(url, options, dask=False, reader=reader)[var]
        source = Source(url, parse_channels(var)[0], dims, options)
        regions = [{dim: t} for t in slices(layer.sizes[dim])]
        if dims.sample:
            regions += [{dim: slice(2, 11), "sample": s} for s in slices(layer.sizes["sample"])]
        for region in regions:
            got = read(layer, region, source).values
            want = plain[tuple(region.get(d, slice(None)) for d in layer.dims)]
            assert got.dtype == want.dtype and got.shape == want.shape, region
            np.testing.assert_array_equal(got, want, err_msg=f"{url} {region}")
        checked.append((url, len(regions)))
    assert [n for _, n in checked] == ([5, 10] * (2 if reader == "zarrs" else 1)), checked


@needs_fast_io
def test_an_epoch_of_windows_is_the_same_whatever_the_reader(tiny_store):
    windows = {reader: torch.stack(list(WindowDataset(tiny_store, "z", 7, seed=3, reader=reader)))
               for reader in ("zarr", "zarrs")}
    assert torch.equal(windows["zarr"], windows["zarrs"])


def flip_a_byte(path: str) -> None:
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x40  # same length: only the checksum can tell
    open(path, "wb").write(bytes(data))


@needs_fast_io
@pytest.mark.parametrize("reader", ["zarrs", "obstore"])
def test_a_corrupt_chunk_is_named(reader, tiny_store, tmp_path, s3_process):
    """A flipped byte fails the CRC32C, read by `reader`, and the error names the chunk and the store."""
    path = str(tmp_path / "corrupt.zarr")
    shutil.copytree(tiny_store, path)
    flip_a_byte(os.path.join(path, "z", "c", "3", "0", "0"))
    urls = [(path, None), (s3_copy(path, f"corrupt-{reader}.zarr", s3_process), s3_process)]
    for url, options in urls:
        if resolve_reader(url, options, reader) != reader:
            continue
        with pytest.raises(DataError, match=rf"cannot read channel z time 2015-01-0.* of '{url}': "
                                            r"chunk 'z/c/3/0/0' does not decode \(.*checksum") as info:
            list(WindowDataset(url, "z", 5, shuffle=False, storage_options=options, reader=reader))
        assert "\n" not in str(info.value)


@needs_fast_io
@pytest.mark.filterwarnings("ignore:Successfully reconstructed a store:RuntimeWarning")  # zarrs's copy of the store
def test_an_endpoint_that_never_answers_fails_a_read_in_bounded_time(tiny_store, silent_endpoint):
    """A store whose endpoint accepts connections and then says nothing (metadata opened elsewhere, as when it
    stops answering mid-epoch): a read fails after the timeouts and attempts of storage_options, mapped onto
    obstore's client (1 s a request, 2 attempts here), where obstore alone would wait 30 s a request 10 times."""
    options = {"endpoint_url": silent_endpoint, "key": "k", "secret": "s",
               "client_kwargs": {"region_name": "us-east-1"},
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 2}}}
    metadata = zarr.open_array(os.path.join(tiny_store, "z"), mode="r").metadata
    for reader in ("zarrs", "obstore"):
        with reading(reader):
            store = zarr_store("s3://bucket/tiny.zarr", options, reader)
            arr = zarr.Array(AsyncArray(metadata, StorePath(store, "z")))
        start = time.monotonic()
        with pytest.raises(Exception, match="(?i)timed? ?out|error sending request"):
            arr[0:12]
        assert time.monotonic() - start < 20, reader


@needs_fast_io
def test_an_unreachable_store_fails_with_one_line_for_every_reader(silent_endpoint):
    """The one request before zarr opens a store (s3fs's, with open_store's timeout) comes first for every reader."""
    options = {"endpoint_url": silent_endpoint, "key": "AKIDSECRETKEY", "secret": "SUPERSECRET",
               "config_kwargs": {"read_timeout": 1, "retries": {"max_attempts": 1}}}
    for reader in ("zarr", "zarrs", "obstore"):
        with pytest.raises(OSError, match=r"^cannot reach zarr store 's3://bucket/era5.zarr': no answer in time") \
                as info:
            open_store("s3://bucket/era5.zarr", options, timeout=1, reader=reader)
        assert "SUPERSECRET" not in str(info.value) and "AKIDSECRETKEY" not in str(info.value)


@needs_fast_io
def test_loader_workers_forked_after_zarrs_started_read_the_same_windows(tiny_store):
    """zarrs's and obstore's threads do not survive a fork: a DataLoader worker forked after the parent read with
    zarrs (here: the dataset's own coordinates) would hang on its first read. It reads with zarr-python."""
    ds = WindowDataset(tiny_store, "z", 6, shuffle=False, reader="zarrs")
    assert store_module._fast_io_pid == os.getpid()
    in_process = torch.stack(list(ds))
    # one batch per worker (each takes a contiguous half of the windows), so the batches come in time order
    loader = DataLoader(ds, batch_size=-(-len(ds) // 2), num_workers=2, timeout=60, multiprocessing_context="fork")
    assert torch.equal(torch.cat(list(loader)), in_process)


def readers_used(monkeypatch) -> list[str]:
    """The readers `open_store` resolves to from now on, one per store opened."""
    seen, real = [], store_module.reading
    monkeypatch.setattr(store_module, "reading", lambda reader="zarr": seen.append(reader) or real(reader))
    return seen


EVERY_READER = ["zarr", pytest.param("zarrs", marks=needs_fast_io), pytest.param("obstore", marks=needs_fast_io)]


@pytest.mark.parametrize("reader", EVERY_READER)
def test_a_missing_chunk_is_named_by_every_reader(reader, tiny_store, tmp_path, s3_process, monkeypatch):
    """A deleted chunk reads as its fill value (NaN) whatever the reader; `chunks.check_present` names it, with
    its period, in the windows and in the statistics, locally and on S3."""
    path = str(tmp_path / "missing.zarr")
    shutil.copytree(tiny_store, path)
    os.remove(os.path.join(path, "z", "c", "10", "0", "0"))
    urls = [(path, None), (s3_copy(path, f"missing-{reader}.zarr", s3_process), s3_process)]
    checked, seen = [], readers_used(monkeypatch)
    for url, options in urls:
        if resolve_reader(url, options, reader) != reader:
            continue  # obstore on a local store is zarr-python's own read
        seen.clear()
        for read_all in (
                lambda: list(WindowDataset(url, "z", 5, shuffle=False, storage_options=options, reader=reader)),
                lambda: compute_stats(url, "z", progress=False, storage_options=options, allow_nan=False,
                                      reader=reader)):
            with pytest.raises(DataError, match=rf"^chunk 'z/c/10/0/0' of variable 'z' \(time 2015-01-03T12:00:00 "
                                                rf"to 2015-01-03T17:00:00\) is missing from '{url}' \(zarr reads it as "
                                                "NaN"):
                read_all()
        assert seen == [reader, reader], seen  # the windows' store and the statistics'
        checked.append(url)
    assert len(checked) == (1 if reader == "obstore" else 2), checked


@needs_fast_io
def test_static_fields_are_read_by_the_reader_asked_for(tiny_static_store, s3_process, monkeypatch):
    """`read_static` (data.static, from data.static_url or data.url) opens its store with the reader asked for and
    reads the same fields as zarr-python, locally and on S3."""
    dims, names = DimNames(lat="latitude", lon="longitude"), ["land_sea_mask", "geopotential_at_surface"]
    grid = open_store(tiny_static_store, reader="zarr")
    kwargs = {"latitude": grid["latitude"].values, "longitude": grid["longitude"].values, "dims": dims}
    want = read_static(tiny_static_store, names, reader="zarr", **kwargs)
    assert want.shape == (2, 32, 64) and want.std(axis=(1, 2)).min() > 0
    url = s3_copy(tiny_static_store, "static.zarr", s3_process)
    seen = readers_used(monkeypatch)
    for where, options, reader in ((tiny_static_store, None, "zarrs"), (url, s3_process, "zarrs"),
                                   (url, s3_process, "obstore")):
        np.testing.assert_array_equal(read_static(where, names, storage_options=options, reader=reader, **kwargs),
                                      want, err_msg=f"{where} {reader}")
    assert seen == ["zarrs", "zarrs", "obstore"]
