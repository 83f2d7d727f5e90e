"""One run per name. A run's directory `<run.storage_path>/<name>` belongs to the run that claimed it first: `claim`
creates `run.claim.json` there with an exclusive create, before the run writes anything else, so a second start
with the same name is refused, even before the first has written a checkpoint.

How exclusive: `open(..., "xb")` through fsspec. Local disks and NFS: O_EXCL, atomic. S3: a conditional PUT
(`If-None-Match: *`, honoured by AWS S3 since 2024, MinIO and moto), atomic. GCS (gcsfs): `ifGenerationMatch=0`,
atomic, marked experimental by gcsfs. A store whose fsspec implementation has no exclusive create makes the claim
an ordinary write: there two starts in the same instant can both pass.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import time

import fsspec

from minconv_dist.train.config import ConfigError

CLAIM = "run.claim.json"


def default_name(arch: str) -> str:
    """`<arch>-<YYYYmmdd-HHMMSS>-<6 hex>`: two launches in the same second still get two names."""
    return f"{arch}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _taken(name: str, directory: str, fs: fsspec.AbstractFileSystem, path: str) -> ConfigError:
    try:
        owner = json.loads(fs.cat_file(f"{path}/{CLAIM}"))
        by = f" (started {owner['started']} on {owner['host']}, pid {owner['pid']})"
    except (OSError, ValueError, KeyError, TypeError):
        by = ""
    return ConfigError(f"run.name: run {name!r} already exists in {directory}{by}; continue it with --resume "
                       f"{shlex.quote(name)}, or choose another run.name")


def check_free(directory: str, name: str) -> None:
    """Refuse a name already in use early, before the data checks; `claim` is the check that counts."""
    fs, path = fsspec.core.url_to_fs(directory)
    fs.invalidate_cache()
    if fs.exists(path) and fs.ls(path):
        raise _taken(name, directory, fs, path)


def claim(directory: str, name: str) -> None:
    """Make `directory` this run's, atomically (see the module docstring), or refuse naming the run that has it."""
    fs, path = fsspec.core.url_to_fs(directory)
    check_free(directory, name)  # a directory from before claims existed, or a stray one: not ours to take
    fs.makedirs(path, exist_ok=True)
    owner = {"run": name, "host": socket.gethostname(), "pid": os.getpid(),
             "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    try:
        with fs.open(f"{path}/{CLAIM}", "xb") as f:
            f.write(json.dumps(owner).encode())
    except FileExistsError:
        raise _taken(name, directory, fs, path) from None
