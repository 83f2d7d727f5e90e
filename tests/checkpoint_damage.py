"""What goes wrong with checkpoints on shared storage, done on purpose: a full disk's 0-byte files, a truncated
file, a crafted pickle (with the manifests rewritten to match, as anyone who can write the storage can)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


class Planted:
    """Unpickling this creates `marker`: what a crafted checkpoint file could do instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(checkpoint: Path, name: str, marker: Path) -> None:
    """Replace `name` in `checkpoint` with a crafted pickle and reseal the manifests around it."""
    torch.save({"module": Planted(marker)}, checkpoint / name)
    data = (checkpoint / name).read_bytes()
    for manifest in checkpoint.glob("manifest_rank*.json"):
        listed = json.loads(manifest.read_text())
        if name in listed["files"]:
            listed["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            manifest.write_text(json.dumps(listed))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def zero_bytes(checkpoint: Path) -> None:
    """Every file of `checkpoint` 0 bytes: what an upload to a full disk leaves."""
    for path in checkpoint.rglob("*"):
        if path.is_file():
            path.write_bytes(b"")
