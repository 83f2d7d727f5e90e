"""Open zarr stores by URL (local, file://, memory://, s3://, gs://) and write them safely.

One function opens every store so that dimension layout, error messages and the "incomplete" marker
are handled in one place. Credentials travel only in `storage_options` and are never put in messages.
Remote stores get connect and read timeouts and retries by default (`remote_options`), so an endpoint
that never answers fails in bounded time instead of hanging a job.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from dataclasses import dataclass, replace
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
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return _merged(REMOTE_DEFAULTS.get(protocol, {}), storage_options or {})


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and path of `url`, with the timeouts of `remote_options`."""
    return fsspec.core.url_to_fs(url, **remote_options(url, storage_options))


def zarr_store(url: str, storage_options: dict | None = None) -> Any:
    """What zarr and xarray accept for `url`: a path for local stores (zarr refuses storage_options there)."""
    if is_local(url):
        return local_path(url)
    return zarr.storage.FsspecStore.from_url(url, storage_options=remote_options(url, storage_options),
                                             read_only=False)


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


def reading() -> contextlib.AbstractContextManager:
    """zarr's settings for arrays opened inside it to be read (each array keeps them): `READ_BATCH_CHUNKS`."""
    return zarr.config.set({"codec_pipeline.batch_size": READ_BATCH_CHUNKS})


def open_store(url: str, storage_options: dict | None = None, *, dask: bool = True,
               timeout: float = REACH_TIMEOUT_S) -> xr.Dataset:
    """Open a zarr (v2 or v3, consolidated or not) store lazily.

    By default every variable is a dask array chunked as on disk. `dask=False` gives xarray's lazy
    (non-dask) arrays, which the window loader uses so that one slice becomes one concurrent zarr read.
    Raises FileNotFoundError for a missing store, OSError for one that cannot be reached (after the
    retries of `remote_options`, and at the latest after `timeout` seconds) and DataError for a store a
    generator left incomplete.
    """
    if is_local(url) and storage_options:
        raise ValueError(f"storage_options given for local store {url!r}; they only apply to remote URLs")
    _check_reachable(url, storage_options, timeout)
    try:
        with warnings.catch_warnings(), reading():
            # consolidated=None falls back to plain metadata with a RuntimeWarning; both are fine here.
            warnings.simplefilter("ignore", RuntimeWarning)
            ds = xr.open_zarr(zarr_store(url, storage_options), consolidated=None, chunks={} if dask else None)
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
