"""Open zarr stores by URL (local, file://, memory://, s3://, gs://) and write them safely.

One function opens every store so that dimension layout, error messages and the "incomplete" marker
are handled in one place. Credentials travel only in `storage_options` and are never put in messages.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr
import zarr

# Attribute a generator sets to False while it writes and to True when the store is whole.
COMPLETE_ATTR = "minconv_complete"


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


def zarr_store(url: str, storage_options: dict | None = None) -> Any:
    """What zarr and xarray accept for `url`: a path for local stores (zarr refuses storage_options there)."""
    if is_local(url):
        return local_path(url)
    return zarr.storage.FsspecStore.from_url(url, storage_options=storage_options or {}, read_only=False)


def open_store(url: str, storage_options: dict | None = None, *, dask: bool = True) -> xr.Dataset:
    """Open a zarr (v2 or v3, consolidated or not) store lazily.

    By default every variable is a dask array chunked as on disk. `dask=False` gives xarray's lazy
    (non-dask) arrays, which the window loader uses so that one slice becomes one concurrent zarr read.
    Raises FileNotFoundError for a missing store, OSError for one that cannot be reached (after
    fsspec's retries) and ValueError for a store a generator left incomplete.
    """
    if is_local(url) and storage_options:
        raise ValueError(f"storage_options given for local store {url!r}; they only apply to remote URLs")
    try:
        with warnings.catch_warnings():
            # consolidated=None falls back to plain metadata with a RuntimeWarning; both are fine here.
            warnings.simplefilter("ignore", RuntimeWarning)
            ds = xr.open_zarr(zarr_store(url, storage_options), consolidated=None, chunks={} if dask else None)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no zarr store at {redact(url)!r}") from err
    except (OSError, TimeoutError) as err:  # includes botocore/aiohttp connection errors wrapped by fsspec
        raise OSError(f"cannot reach zarr store {redact(url)!r}: {type(err).__name__}") from err
    except Exception as err:
        if type(err).__name__ in {"EndpointConnectionError", "ClientConnectorError", "NoCredentialsError",
                                  "ClientError", "ConnectTimeoutError"}:
            raise OSError(f"cannot reach zarr store {redact(url)!r}: {type(err).__name__}") from err
        raise
    if ds.attrs.get(COMPLETE_ATTR) is False:
        raise ValueError(f"zarr store {redact(url)!r} is incomplete (a generator was interrupted); "
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
