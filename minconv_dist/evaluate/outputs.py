"""All-or-nothing outputs at any fsspec URL (local path, `file://`, `memory://`, `s3://`, `gs://`).

- Local: everything is written under `.tmp-<uuid>-<name>` beside the target and renamed into place when
  whole (a rename is atomic on one file system), so a crash never leaves a half output under the name.
- Object stores (no atomic rename): written in place, and a completeness marker is written last: the
  `minconv_complete` root attribute of a zarr store (False while writing, True at the end, as the data
  generators do), or the file `_COMPLETE` of an output folder. Readers (`open_store`,
  `check_complete`) refuse outputs without it.

An existing output is replaced only with `overwrite=True`; then the old one is deleted first (marker
first), so what is under the name is at every moment either whole or refused by readers.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import fsspec

from minconv_dist.data.store import exists, is_local, local_path, redact
from minconv_dist.data.store import filesystem as store_filesystem

MARKER = "_COMPLETE"  # last file of an output folder: JSON listing the files it completes


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec file system of `url` and the path on it, with the timeouts and retries reads have
    (`store.remote_options`); storage options are refused for local paths."""
    if is_local(url) and storage_options:
        raise ValueError(f"storage options given for the local output {url!r}; they only apply to remote URLs")
    return store_filesystem(local_path(url) if is_local(url) else url, storage_options)


def check_target(url: str, storage_options: dict | None = None, overwrite: bool = False) -> None:
    """Raise FileExistsError if something is at `url` and `overwrite` is off, or OSError in one line if a remote
    `url` does not answer within `store.REACH_TIMEOUT_S` (`store.exists`); call before any long work."""
    filesystem(url, storage_options)  # refuses storage options for a local path
    if exists(url, storage_options) and not overwrite:
        raise FileExistsError(f"{redact(url)} exists; pass overwrite=True (--overwrite) to replace it")


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Delete an output, its completeness marker first."""
    if fs.exists(f"{path}/{MARKER}"):
        fs.rm(f"{path}/{MARKER}")
    if fs.exists(path):
        fs.rm(path, recursive=True)


@contextmanager
def staged(url: str, storage_options: dict | None = None, overwrite: bool = False) -> Iterator[str]:
    """Yields where to write the output for `url`: a temporary local path beside it, renamed onto `url` when
    the block ends without error (and removed when it fails), or `url` itself on object stores, after
    deleting any old output there. The caller marks object-store outputs complete as its last write."""
    check_target(url, storage_options, overwrite)
    fs, path = filesystem(url, storage_options)
    if not is_local(url):
        _remove(fs, path)
        yield url
        return
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(os.path.abspath(path))}")
    try:
        yield tmp
        if os.path.exists(path):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(folder: str | Path, url: str, storage_options: dict | None = None,
                   overwrite: bool = False) -> list[str]:
    """Copy every file under the local `folder` to `url` (a folder), then `_COMPLETE` listing them; all or
    nothing as `staged` says. Returns the relative paths written."""
    files = sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file())
    with staged(url, storage_options, overwrite) as target:
        fs, root = filesystem(target, storage_options)
        for rel in files:
            fs.makedirs(os.path.dirname(f"{root}/{rel}"), exist_ok=True)
            fs.put_file(str(Path(folder) / rel), f"{root}/{rel}")
        fs.pipe_file(f"{root}/{MARKER}", json.dumps({"files": files}).encode())
    return files


def check_complete(url: str, storage_options: dict | None = None) -> list[str]:
    """The files of a complete output folder; raises FileNotFoundError if nothing is there and ValueError
    for a partial one (no `_COMPLETE`, or a file it lists is missing)."""
    fs, root = filesystem(url, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"no output at {redact(url)!r}")
    if not fs.exists(f"{root}/{MARKER}"):
        raise ValueError(f"{redact(url)} is a partial output (no {MARKER} marker: the run writing it did not "
                         "finish); write it again with --overwrite")
    files = json.loads(fs.cat_file(f"{root}/{MARKER}"))["files"]
    missing = [f for f in files if not fs.exists(f"{root}/{f}")]
    if missing:
        raise ValueError(f"{redact(url)} is a partial output: {missing[:3]} are missing; write it again")
    return files
