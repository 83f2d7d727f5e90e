"""Open zarr stores by URL (local, file://, memory://, s3://, gs://) and write them safely.

One function opens every store so that dimension layout, error messages and the "incomplete" marker
are handled in one place. Credentials travel only in `storage_options` and are never put in messages.
Remote stores get connect and read timeouts and retries by default (`remote_options`), so an endpoint
that never answers fails in bounded time instead of hanging a job. A store is read by one of `READERS`:
zarr-python alone, or with the `fast-io` extra the zarrs package's compiled codec pipeline and obstore's S3
client (docs/data.md, "Readers").
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import fsspec
import xarray as xr
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

# Attribute a generator sets to False while it writes and to True when the store is whole.
COMPLETE_ATTR = "minconv_complete"

# Defaults under the user's storage_options (theirs win, key by key): seconds to connect and to wait for
# bytes, and attempts with exponential backoff. Without them botocore waits 60 s per read and s3fs retries
# each of its 5 tries, so an endpoint that accepts but never answers holds a job for many minutes.
REMOTE_DEFAULTS: dict[str, dict[str, Any]] = {
    "s3": {"config_kwargs": {"connect_timeout": 10, "read_timeout": 30,
                             "retries": {"mode": "standard", "max_attempts": 3}}},
    "gs": {"requests_timeout": 30},
}
REMOTE_DEFAULTS["s3a"] = REMOTE_DEFAULTS["s3"]
REMOTE_DEFAULTS["gcs"] = REMOTE_DEFAULTS["gs"]
# Chunks zarr decodes per task of a read (its default is 1). Its per-chunk Python runs on one event loop thread
# whatever the cores, so fewer, larger tasks read faster: a year of hourly 32x64 frames in 24-frame chunks,
# 180 -> 130 ms (2-core sandbox), 9-26% less on the H100 host (docs/benchmarks.md, issue 14 item 4). A read
# may then hold up to its own size again in decoded chunks.
READ_BATCH_CHUNKS = 64
# The longest a store may take to answer the first request before `open_store` gives up on it.
REACH_TIMEOUT_S = 60.0
# How a store's chunks are fetched and decoded. "zarr": zarr-python's codec pipeline, remote stores through
# fsspec (today's path, always there). With the fast-io extra, "zarrs": the zarrs package's codec pipeline, which
# fetches and decodes a read's chunks in Rust threads (local paths; s3:// through obstore, as zarrs reads no
# fsspec store), and "obstore": zarr-python's pipeline over obstore's S3 client. "auto": zarrs for local stores,
# obstore for s3:// where storage_options say enough (resolve_reader), else zarr: the fastest of each in
# docs/benchmarks.md (issue 25, item 3).
READERS = ("auto", "zarr", "zarrs", "obstore")
FAST_IO = "pip install 'minconv_dist[fast-io]'"
# The process whose zarrs or obstore threads started: neither survives a fork, so a process forked after them
# (a DataLoader worker) would hang on its first read; it reads with zarr-python instead.
_fast_io_pid: int | None = None
S3_PROTOCOLS = ("s3", "s3a")
# s3fs options -> obstore's S3 config keys; botocore's config_kwargs -> its client and retry options (s3_client)
_S3_KEYS = {"key": "access_key_id", "secret": "secret_access_key", "token": "session_token",
            "anon": "skip_signature", "requester_pays": "request_payer", "endpoint_url": "endpoint",
            "region_name": "region"}


class DataError(ValueError):
    """The data are wrong (corrupt or missing chunk, NaN, implausible values, an incomplete store, a bad time
    axis): deterministic, so retrying cannot help. The message names the store and the problem."""


def checksummed(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """zarr v3 encoding for every variable of `ds`: zstd, then a CRC32C of the compressed chunk, so a chunk
    whose bytes changed fails to read (naming its key) instead of decoding to plausible-looking garbage."""
    return {name: {"compressors": (ZstdCodec(level=0), Crc32cCodec())} for name in ds.variables}


@dataclass(frozen=True)
class DimNames:
    """Names of the dimensions in a store; e.g. `DimNames(lat="latitude", lon="longitude")` for WeatherBench2/ARCO.

    `sample` names the trajectory dim of a store holding many independent series, such as the
    Navier–Stokes store's `(sample, time, y, x)`; None for one continuous series (reanalysis).
    """

    time: str = "time"
    level: str = "level"
    lat: str = "lat"
    lon: str = "lon"
    sample: str | None = None


# The two spellings of the horizontal dims: WeatherBench v1 (`lat`, `lon`) and WeatherBench2 / ARCO-ERA5 / the
# embedded store (`latitude`, `longitude`).
DIM_SPELLINGS = {"lat": ("lat", "latitude"), "lon": ("lon", "longitude")}


def store_dims(ds: xr.Dataset, dims: DimNames = DimNames()) -> DimNames:
    """`dims` as `ds` spells them: a `lat`/`lon` name that `ds` lacks becomes its other spelling (`latitude` for
    `lat`, and back) when `ds` has that one, so one config reads both WeatherBench layouts. Any other name is
    kept as given (a wrong one fails where it is used, naming it)."""
    found = {}
    for field, names in DIM_SPELLINGS.items():
        given = getattr(dims, field)
        if given in names and given not in ds.dims:
            found.update({field: name for name in names if name in ds.dims})
    return replace(dims, **found)


def cache_dir() -> Path:
    """Where embedded stores are created on first use: `$MINCONV_CACHE` or `~/.cache/minconv_dist`."""
    return Path(os.environ.get("MINCONV_CACHE", Path.home() / ".cache" / "minconv_dist"))


def redact(url: str) -> str:
    """`url` without any `user:password@` part, safe to print."""
    return re.sub(r"(://)[^/@]*@", r"\1", url)


def redact_config(value: Any) -> Any:
    """A config (nested dicts and lists) safe to write anywhere: every `storage_options` entry dropped (it holds
    credentials), every URL string redacted. The one place configs are scrubbed."""
    if isinstance(value, dict):
        return {k: redact_config(v) for k, v in value.items() if k != "storage_options"}
    if isinstance(value, (list, tuple)):
        return [redact_config(v) for v in value]
    return redact(value) if isinstance(value, str) else value


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _protocol(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _merged(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """A copy of `defaults` with `given` on top, nested dicts merged key by key (a deep copy: botocore rewrites
    the `retries` dict it is given)."""
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def remote_options(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The fsspec options for `url`: `REMOTE_DEFAULTS` of its protocol under the user's `storage_options`."""
    return _merged(REMOTE_DEFAULTS.get(_protocol(url), {}), storage_options or {})


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of `url`, with the timeouts of `remote_options`."""
    return fsspec.core.url_to_fs(url, **remote_options(url, storage_options))


def zarr_store(url: str, storage_options: dict | None = None, reader: str = "zarr") -> Any:
    """What zarr and xarray accept for `url`: a path for local stores (zarr refuses storage_options there), an
    obstore store (read only) for s3:// read by `reader` "zarrs" or "obstore", else an fsspec store."""
    if is_local(url):
        return local_path(url)
    if reader != "zarr" and _protocol(url) in S3_PROTOCOLS:
        from obstore.store import S3Store

        _started_fast_io()
        return zarr.storage.ObjectStore(S3Store(**s3_client(url, storage_options)), read_only=True)
    return zarr.storage.FsspecStore.from_url(url, storage_options=remote_options(url, storage_options),
                                             read_only=False)


def s3_client(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """obstore `S3Store` arguments that do what `remote_options(url, storage_options)` asks of s3fs: the bucket
    and prefix of `url`; key, secret, token, anon, requester_pays, endpoint_url (also in client_kwargs, with
    region_name); botocore's connect_timeout, read_timeout and retries.max_attempts (config_kwargs) as obstore's
    connect_timeout, timeout (of a whole request) and max_retries. Without key or anon, obstore finds
    credentials in the environment (AWS_* variables, web identity, container and instance roles), not in ~/.aws
    profiles. Raises ValueError naming an option that has no obstore equivalent."""
    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    config: dict[str, Any] = {}
    client: dict[str, Any] = {}
    retry: dict[str, Any] = {}
    for key, value in remote_options(url, storage_options).items():
        if key in _S3_KEYS and key != "region_name":
            config[_S3_KEYS[key]] = value
        elif key == "client_kwargs" and set(value) <= {"endpoint_url", "region_name"}:
            config.update({_S3_KEYS[k]: v for k, v in value.items()})
        elif key == "config_kwargs" and set(value) <= {"connect_timeout", "read_timeout", "retries"} and set(
                value.get("retries", {})) <= {"mode", "max_attempts"}:
            # read_timeout bounds each whole request: zarrs's copy of the client knows no per-read timeout
            client.update({k: timedelta(seconds=value[b]) for k, b in (("connect_timeout", "connect_timeout"),
                                                                         ("timeout", "read_timeout")) if b in value})
            if "max_attempts" in value.get("retries", {}):  # botocore counts the first attempt, obstore does not
                retry["max_retries"] = max(0, value["retries"]["max_attempts"] - 1)
        else:
            raise ValueError(f"storage_options[{key!r}] has no obstore equivalent; read {redact(url)!r} with "
                             "reader 'zarr' (s3fs)")
    if str(config.get("endpoint", "")).startswith("http://"):
        client["allow_http"] = True
    return {"bucket": bucket, "prefix": prefix.rstrip("/") or None, "config": config, "client_options": client,
            "retry_config": retry}


def fast_io_missing() -> str | None:
    """Why the zarrs and obstore readers cannot run here (a package of the fast-io extra is missing), or None."""
    missing = [name for name in ("zarrs", "obstore") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed ({FAST_IO})" if missing else None


def _started_fast_io() -> None:
    global _fast_io_pid
    _fast_io_pid = _fast_io_pid or os.getpid()


def resolve_reader(url: str, storage_options: dict | None = None, reader: str = "auto") -> str:
    """The reader ("zarr", "zarrs" or "obstore") that reads `url` when `reader` is asked for. Where the fast-io extra
    is installed, "auto" gives "zarrs" for local paths and "obstore" for s3:// when storage_options give the
    credentials (key or anon) and where to go (endpoint_url or region_name) and have an obstore equivalent
    (`s3_client`), so that a store s3fs finds by an AWS profile or a bucket's region lookup stays with s3fs.
    "obstore" applies to s3:// only. Other URLs (memory://, gs://), and a process forked after zarrs or obstore
    started, read with "zarr". A fast reader asked for explicitly without the extra, or with options obstore
    cannot take, is a ValueError."""
    if reader not in READERS:
        raise ValueError(f"reader={reader!r}: expected one of {READERS}")
    missing = fast_io_missing() if reader != "zarr" else None
    if reader == "zarr" or (missing and reader == "auto"):
        return "zarr"
    if missing:
        raise ValueError(f"reader={reader!r}: {missing}")
    if _fast_io_pid not in (None, os.getpid()):
        return "zarr"
    if _protocol(url) in S3_PROTOCOLS:
        options = storage_options or {}
        if reader == "auto":
            kwargs = options.get("client_kwargs", {})
            credentials = "key" in options or options.get("anon") is True
            located = "endpoint_url" in options or "endpoint_url" in kwargs or "region_name" in kwargs
            if not (credentials and located):
                return "zarr"
            try:
                s3_client(url, storage_options)
            except ValueError:
                return "zarr"
            return "obstore"
        s3_client(url, storage_options)
        return reader
    return "zarrs" if is_local(url) and reader != "obstore" else "zarr"


def _unreachable(url: str, err: BaseException, what: str = "zarr store") -> OSError:
    """One line for a store that cannot be reached; never the storage_options (they may hold credentials)."""
    name = type(err).__name__
    timed_out = isinstance(err, TimeoutError) or "Timeout" in name  # fsspec, botocore and aiohttp timeouts
    return OSError(f"cannot reach {what} {redact(url)!r}: {f'no answer in time ({name})' if timed_out else name}")


def _ask(url: str, storage_options: dict | None, method: str, what: str, timeout: float) -> Any:
    """`fs.<method>(path)` for `url` as one request that fails alone, within `timeout` seconds (cancelled inside
    fsspec's event loop, cleanly), as an OSError in one line; FileNotFoundError passes through."""
    fs, path = filesystem(url, storage_options)
    try:
        return getattr(fs, method)(path, **({"timeout": timeout} if fs.async_impl else {}))
    except FileNotFoundError:
        raise
    except Exception as err:  # botocore/aiohttp connection errors, timeouts, credentials
        raise _unreachable(url, err, what) from err


def _check_reachable(url: str, storage_options: dict | None, timeout: float) -> None:
    """One request to a remote store before zarr opens it. zarr fetches several metadata keys at once, and
    when the endpoint fails the ones still retrying are dropped at exit with a traceback each; a single
    request fails alone, within `timeout` seconds."""
    if is_local(url) or url.startswith("memory://"):
        return
    try:
        _ask(url, storage_options, "info", "zarr store", timeout)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no zarr store at {redact(url)!r}") from err


def exists(url: str, storage_options: dict | None = None, *, what: str = "output",
           timeout: float | None = None) -> bool:
    """Whether something is at `url`, asked before a job's long work: a remote endpoint must answer within
    `timeout` seconds (default `REACH_TIMEOUT_S`), else an OSError in one line (`cannot reach output '<url>':
    ...`), with the timeouts and retries of `remote_options`, as reads have."""
    return _ask(url, storage_options, "exists", what, REACH_TIMEOUT_S if timeout is None else timeout)


def reading(reader: str = "zarr") -> contextlib.AbstractContextManager:
    """zarr's settings for arrays opened inside it to be read by `reader` (a resolved one, `resolve_reader`; each
    array keeps them): `READ_BATCH_CHUNKS` for zarr-python's pipeline; for "zarrs" its pipeline, checking
    checksums whatever zarr's config says (a corrupt chunk must fail, `checksummed`)."""
    if reader != "zarrs":
        return zarr.config.set({"codec_pipeline.batch_size": READ_BATCH_CHUNKS})
    _started_fast_io()
    return zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline",
                            "codec_pipeline.validate_checksums": True})


def open_store(url: str, storage_options: dict | None = None, *, dask: bool = True,
               timeout: float = REACH_TIMEOUT_S, reader: str = "auto") -> xr.Dataset:
    """Open a zarr (v2 or v3, consolidated or not) store lazily.

    By default every variable is a dask array chunked as on disk. `dask=False` gives xarray's lazy
    (non-dask) arrays, which the window loader uses so that one slice becomes one concurrent zarr read.
    `reader` is one of `READERS` (`resolve_reader` says which one reads `url`).
    Raises FileNotFoundError for a missing store, OSError for one that cannot be reached (after the
    retries of `remote_options`, and at the latest after `timeout` seconds) and DataError for a store a
    generator left incomplete.
    """
    if is_local(url) and storage_options:
        raise ValueError(f"storage_options given for local store {url!r}; they only apply to remote URLs")
    reader = resolve_reader(url, storage_options, reader)
    _check_reachable(url, storage_options, timeout)
    try:
        with warnings.catch_warnings(), reading(reader):
            # consolidated=None falls back to plain metadata with a RuntimeWarning; both are fine here, and so is
            # zarrs's note that its copy of an obstore store keeps a connection pool of its own.
            warnings.simplefilter("ignore", RuntimeWarning)
            ds = xr.open_zarr(zarr_store(url, storage_options, reader), consolidated=None,
                              chunks={} if dask else None)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no zarr store at {redact(url)!r}") from err
    except (OSError, TimeoutError) as err:  # includes botocore/aiohttp connection errors wrapped by fsspec
        raise _unreachable(url, err) from err
    except Exception as err:
        if type(err).__name__ in {"EndpointConnectionError", "ClientConnectorError", "NoCredentialsError",
                                  "ClientError", "ConnectTimeoutError", "ReadTimeoutError"}:
            raise _unreachable(url, err) from err
        raise
    if ds.attrs.get(COMPLETE_ATTR) is False:
        raise DataError(f"zarr store {redact(url)!r} is incomplete (a generator was interrupted); "
                        "re-run the generator with the same arguments to resume or rewrite it")
    return ds


def set_attrs(url: str, storage_options: dict | None, **attrs: Any) -> None:
    """Update root attributes in place and re-consolidate, so readers of consolidated metadata see them."""
    store = zarr_store(url, storage_options)
    group = zarr.open_group(store, mode="r+")
    group.attrs.update(attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr warns that consolidated metadata is not yet in the v3 spec
        zarr.consolidate_metadata(store)
