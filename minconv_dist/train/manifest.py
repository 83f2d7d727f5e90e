"""What makes a checkpoint on storage checkable: each rank's manifest, written last, with the size and sha256 of
every file that rank wrote.

A checkpoint directory is uploaded by Ray, rank by rank, in an order that is not ours (on an object store a
listing can show a manifest before a data file it lists), so no single file proves that the others are there.
`index` answers "complete?" from one listing: position.json parses and names the world size W, every
`manifest_rank{0..W-1}.json` parses, and every file they list is on storage with the listed size. `verify` also
checks every file's sha256. A missing or short file, a 0-byte or unparsable JSON file: a `CheckpointError` that
names the file, never a crash.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

POSITION = "position.json"
MANIFEST = "manifest_rank{}.json"


class CheckpointError(ValueError):
    """A checkpoint cannot be used: a file is missing, short, altered or not data-only; the message names it."""


@dataclass
class Index:
    """A complete checkpoint: its position (epoch, steps, world size) and every file with its size and sha256."""

    position: dict[str, Any]
    files: dict[str, dict[str, Any]]  # path relative to the checkpoint -> {"size": bytes, "sha256": hex}


def sha256(f: BinaryIO) -> str:
    return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; once written it is fsynced and renamed to `path`, so `path` is
    either absent or whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    yield tmp
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes) -> None:
    with atomic(path) as tmp:
        tmp.write_bytes(data)


def write(directory: Path, rank: int) -> None:
    """This rank's manifest, written last: every file of its local checkpoint folder, listed after all its writes
    (so files added to `checkpoint.save` later are covered too), each fsynced on the way."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            files[path.relative_to(directory).as_posix()] = {"size": os.fstat(f.fileno()).st_size,
                                                             "sha256": sha256(f)}
            os.fsync(f.fileno())
    write_atomic(directory / MANIFEST.format(rank), json.dumps({"rank": rank, "files": files}, indent=1).encode())


def _json(fs: fsspec.AbstractFileSystem, directory: str, name: str, sizes: dict[str, int]) -> Any:
    if name not in sizes:
        raise CheckpointError(f"{name} is missing")
    if sizes[name] == 0:
        raise CheckpointError(f"{name} is 0 bytes")
    try:
        return json.loads(fs.cat_file(f"{directory}/{name}"))
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{name} is not valid JSON ({err})") from None


def index(fs: fsspec.AbstractFileSystem, directory: str, required: tuple[str, ...] = ()) -> Index:
    """The checkpoint in `directory` if it is complete (see the module docstring), with `required` (and each rank's
    `rng_rank{r}.pt`) among its files; else a CheckpointError naming what is missing or wrong."""
    prefix = directory.rstrip("/") + "/"
    sizes = {name[len(prefix):]: info["size"] for name, info in fs.find(directory, detail=True).items()
             if name.startswith(prefix)}
    position = _json(fs, directory, POSITION, sizes)
    world = position.get("world_size") if isinstance(position, dict) else None
    if not isinstance(world, int) or world < 1 or not isinstance(position.get("global_step"), int):
        raise CheckpointError(f"{POSITION} names no world size and global step")
    files: dict[str, dict[str, Any]] = {}
    for rank in range(world):
        listed = _json(fs, directory, MANIFEST.format(rank), sizes)
        if not isinstance(listed, dict) or not isinstance(listed.get("files"), dict):
            raise CheckpointError(f"{MANIFEST.format(rank)} lists no files")
        for name, entry in listed["files"].items():
            if files.setdefault(name, entry) != entry:
                raise CheckpointError(f"{name} is listed twice with different contents (rank {rank} and another)")
    for name in (POSITION, *required, *(f"rng_rank{r}.pt" for r in range(world))):
        if name not in files:
            raise CheckpointError(f"{name} is not in the manifests")
    for name, entry in files.items():
        if name not in sizes:
            raise CheckpointError(f"{name} is missing, the manifest lists it")
        if sizes[name] != entry.get("size"):
            raise CheckpointError(f"{name} is {sizes[name]} bytes, the manifest says {entry.get('size')}")
    return Index(position, files)


def check_file(f: BinaryIO, name: str, entry: dict[str, Any]) -> None:
    """Raise unless the open file `f` has the size and sha256 of its manifest `entry`."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(0)
    if size != entry["size"]:
        raise CheckpointError(f"{name} is {size} bytes, the manifest says {entry['size']}")
    if sha256(f) != entry["sha256"]:
        raise CheckpointError(f"{name} does not match its sha256 in the manifest")
    f.seek(0)


def verify(fs: fsspec.AbstractFileSystem, directory: str, required: tuple[str, ...] = ()) -> Index:
    """`index`, and every file's sha256 checked against the manifests (reads the whole checkpoint)."""
    found = index(fs, directory, required)
    for name, entry in found.files.items():
        with fs.open(f"{directory}/{name}", "rb") as f:
            check_file(f, name, entry)
    return found
